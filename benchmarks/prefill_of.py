"""pp512 (batch 1) of the library in another checkout, with that checkout's own
bench.py measure_prefill, for before/after comparisons in one device call
(benchmarks/before_after.sh):

    python benchmarks/prefill_of.py CODE OUT.json smol135m,llama1b,llama8b bf16,int8
"""
import json
import os
import sys

code = os.path.abspath(sys.argv[1])
sys.path.insert(0, os.path.join(code, "scripts"))
sys.path.insert(0, code)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxllm  # noqa: E402
import jaxllm.layout as layout  # noqa: E402
from bench import block, measure_prefill  # noqa: E402
from jaxllm import PRESETS  # noqa: E402

out = {"code": code, "jax": jax.__version__, "device": jax.devices()[0].device_kind, "results": []}
for shape in sys.argv[3].split(","):
    for mode in sys.argv[4].split(","):
        config = PRESETS[shape]
        params = block(jaxllm.init_params(config, jax.random.PRNGKey(0), jnp.bfloat16))
        if mode != "bf16":
            params = block(jaxllm.quantize(params, mode, group_size=32))
        # this checkout's layout for the GPU: for_policy, or for_backend before the policy
        params = block(layout.for_policy(params, config.kernels) if hasattr(layout, "for_policy")
                       else layout.for_backend(params))
        r = measure_prefill(params, config, 1, 512, 5)
        out["results"].append({"shape": shape, "weights": mode, **r})
        print(code[-12:], shape, mode, round(r["tok_s"]), flush=True)
        del params
        with open(sys.argv[2], "w") as f:
            json.dump(out, f, indent=1)
