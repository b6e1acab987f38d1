"""Decode speed split over devices (sharding.py) against one device, in one run.

    python benchmarks/tp_decode.py --shape llama8b --devices 1,2 --batches 1,32 --out X.json

Random bf16 weights of a preset shape; tg128 (128 tokens decoded after a 16-token
prompt, greedy) per batch, median of --reps runs after one warm-up. One device runs
twice: with the default kernels and with the XLA paths. Several devices run both ways
of sharding.shard: "per-shard" (each layer under shard_map with the default kernels
on a device's share) and "xla" (XLA's partitioner over the XLA paths).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from envelope import write_results

import jaxllm
from jaxllm import sharding
from jaxllm.layout import for_policy


def tg(params, config, batch: int, reps: int) -> float:
    prompts = [[1 + b] * 16 for b in range(batch)]
    run = lambda: jaxllm.generate(params, config, prompts, max_new_tokens=128,
                                  settings=jaxllm.SamplerSettings.greedy(), stop_tokens=())
    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return batch * 128 / statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama8b")
    p.add_argument("--devices", default="1,2")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    config = jaxllm.PRESETS[args.shape]
    params = jax.block_until_ready(jaxllm.init_params(config, jax.random.PRNGKey(0), jnp.bfloat16))
    rows = []
    for n in map(int, args.devices.split(",")):
        if n == 1:
            variants = [("auto", for_policy(params, config.kernels), config),
                        ("xla", params, config.replace(kernels="xla"))]
        else:
            mesh = sharding.make_mesh(n)
            variants = [("per-shard", *sharding.shard(params, config, mesh, layers="per_shard")),
                        ("xla", *sharding.shard(params, config, mesh, layers="xla"))]
        for kernels, ps, cs in variants:
            for batch in map(int, args.batches.split(",")):
                tok_s = tg(ps, cs, batch, args.reps)
                rows.append({"shape": args.shape, "weights": "bf16", "devices": n, "kernels": kernels,
                             "batch": batch, "tg128_tok_s": tok_s})
                print(f"devices {n} kernels {kernels:9} batch {batch:3}: {tok_s:9.1f} tok/s", file=sys.stderr,
                      flush=True)
    write_results("tp_decode.py", argv, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
