"""Teacher-forced NLL of a GGUF model (weights as in the file) through the decode
path, one token at a time, on the llama.cpp reference texts: the XLA path against
the quantized Pallas kernel with float activations and with activations rounded to
int8 (kernels/qmatvec.py). On the CPU the kernel runs in interpret mode (a few
minutes for SmolLM2); prefill-based NLL (scripts, tests) never reaches this kernel.

    python benchmarks/decode_path_nll.py [--model smollm2-135m-instruct] [--out F.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jaxllm  # noqa: E402
from jaxllm.policy import QMATVEC_TILINGS  # noqa: E402

REFERENCES = {"smollm2-135m-instruct": "smollm2-135m-instruct-q4_1.llamacpp.json",
              "gemma-3-270m": "gemma-3-270m-q4_k_m.llamacpp.json"}


def decode_nll(m, config, ids) -> list[float]:
    """-log p(ids[t] | ids[:t]) for t >= 1, each step one decode_step."""
    cache = jaxllm.init_cache(config, 1, len(ids) + 1, jnp.float32)
    logits, cache = jaxllm.extend(m.params, config, jnp.asarray([ids[:1]]), jnp.array([1]), cache)
    out = []
    for t in range(1, len(ids)):
        logp = jax.nn.log_softmax(np.asarray(logits, np.float64).reshape(-1))
        out.append(-float(logp[ids[t]]))
        logits, cache = jaxllm.decode_step(m.params, config, jnp.asarray([ids[t]]), cache)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", choices=sorted(REFERENCES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")
    with open(os.path.join(shared, "reference", REFERENCES[args.model])) as f:
        texts = json.load(f)["score"]
    m = jaxllm.load(args.model)
    tilings = QMATVEC_TILINGS
    if jax.default_backend() != "gpu":  # interpret mode runs programs one by one: fewer, longer ones
        tilings = tuple((bits, dataclasses.replace(t, target_programs=8)) for bits, t in tilings)
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
              "command": "python " + " ".join(sys.argv), "model": args.model, "paths": {}}
    for name, mode, int8 in (("xla", "xla", True), ("kernel, float activations", "pallas", False),
                             ("kernel, int8 activations", "pallas", True)):
        kernels = jaxllm.KernelPolicy.for_backend(mode, int8_activations=int8, qmatvec=tilings)
        start = time.perf_counter()
        nll = [decode_nll(m, m.config.replace(kernels=kernels), t["ids"]) for t in texts]
        mean = float(np.mean(np.concatenate(nll)))
        report["paths"][name] = {"mean_nll": mean, "per_token": nll}
        print(f"{name:28s} mean NLL {mean:.5f} over {sum(map(len, nll))} tokens "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    base = report["paths"]["xla"]["mean_nll"]
    for name, r in report["paths"].items():
        r["vs_xla_percent"] = 100 * (r["mean_nll"] / base - 1)
        print(f"{name:28s} {r['vs_xla_percent']:+.3f}% against the XLA path")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
