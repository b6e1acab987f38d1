"""Mixture-of-experts decode on the XLA routes (ops.moe_mlp): tokens per second and
the bandwidth of the bytes one token actually reads (attention, the router, the
routed experts, the head), for random weights of a real shape.

    python benchmarks/moe_decode.py --shape qwen3moe30b --batches 1,8 --tokens 64 --out X.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import jaxllm  # noqa: E402
from bench import weight_bytes_per_token  # noqa: E402
from jaxllm.generate import start  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3moe30b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    config = jaxllm.PRESETS[args.shape]
    t = time.perf_counter()
    params = jax.block_until_ready(jaxllm.init_params(config, jax.random.PRNGKey(0), jnp.bfloat16))
    print(f"{args.shape}: {config.param_count() / 1e9:.1f} B parameters initialised in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    per_token = weight_bytes_per_token(params, config)
    rows = []
    for batch in map(int, args.batches.split(",")):
        greedy = jaxllm.SamplerSettings.greedy()
        times = []
        for rep in range(args.reps + 1):  # the first compiles
            run = start(params, config, [[1]] * batch, max_new_tokens=args.tokens + 1, settings=greedy,
                        stop_tokens=[])
            jax.block_until_ready(run.state)
            t = time.perf_counter()
            jax.block_until_ready(run.run(params, config, args.tokens + 1).tokens)
            if rep:
                times.append(time.perf_counter() - t)
        best = min(times)
        row = {"shape": args.shape, "batch": batch, "tokens": args.tokens, "tok_s": batch * args.tokens / best,
               "times_s": times, "route": config.kernels.moe_route(batch * config.n_active_experts),
               "bytes_per_token_batch1": per_token,
               "gb_s_at_batch1_bytes": per_token * args.tokens / best / 1e9 if batch == 1 else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
                       "jax": jax.__version__, "command": "benchmarks/moe_decode.py " + " ".join(argv or sys.argv[1:]),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
