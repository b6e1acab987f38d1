"""The routed-expert kernels (kernels/expert_matvec.py) against XLA's gathered route on
the expert projections of the benchmark shapes: relative error, microseconds per
call and GB/s of the routed experts' bytes (counted once per pair), for a few
tilings; past the policy's pairs for the in-place kernel, quantized experts take the
grouped kernel.

    python benchmarks/expert_matvec_bench.py --out X.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jaxllm.kernels.expert_matvec import (expert_matmul_pallas, expert_matvec_pallas,  # noqa: E402
                                          expert_matvec_reference, sort_into_blocks)
from jaxllm.policy import ExpertTiling, KernelPolicy  # noqa: E402
from jaxllm.quant import quantize_weight, stack_experts  # noqa: E402
from jaxllm.weights import Experts  # noqa: E402

# name: (experts, active per token, K, N) of each expert projection
PROJECTIONS = {"qwen3moe30b_gate_up": (128, 8, 2048, 1536), "qwen3moe30b_down": (128, 8, 768, 2048),
               "gptoss20b_gate_up": (32, 4, 2880, 5760), "gptoss20b_down": (32, 4, 2880, 2880),
               "tiny": (8, 2, 64, 96)}  # (a check of this script on the CPU)
# "default" was block_n 128 in the first run (results/NVIDIA-H200-2026-12-01-expert-matvec.jsonl), 256 since
TILINGS = {"default": ExpertTiling(), "bn64": ExpertTiling(block_n=64), "bn128": ExpertTiling(block_n=128),
           "bk16": ExpertTiling(block_k=16), "bk64": ExpertTiling(block_k=64),
           "progs528": ExpertTiling(target_programs=528), "progs2112": ExpertTiling(target_programs=2112)}
POLICY = KernelPolicy()
LOOP = 50  # calls per timed program (a loop inside one jit: no dispatch gaps); --loop


def per_call_s(fn, x, reps: int, loop_calls: int) -> list[float]:
    """Seconds per call of fn(x), loop_calls calls chained through a vanishing dependency."""
    @jax.jit
    def loop(x):
        def body(_, x):
            return x + (fn(x)[:, :1] * 0).astype(x.dtype)
        return jax.lax.fori_loop(0, loop_calls, body, x)
    jax.block_until_ready(loop(x))
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(loop(x))
        out.append((time.perf_counter() - t) / loop_calls)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--projections", default=",".join(p for p in PROJECTIONS if p != "tiny"))
    ap.add_argument("--weights", default="bf16,int8")
    ap.add_argument("--tokens", default="1,8,32")
    ap.add_argument("--tilings", default=",".join(TILINGS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--loop", type=int, default=LOOP, help="calls per timed program")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    rows = []
    for name in args.projections.split(","):
        E, k, K, N = PROJECTIONS[name]
        dense = jax.random.normal(jax.random.PRNGKey(0), (E, K, N), jnp.bfloat16) * 0.02
        for weights in args.weights.split(","):
            w = Experts(dense) if weights == "bf16" else stack_experts(
                [quantize_weight(dense[e], weights) for e in range(E)])
            nbytes = sum(a.nbytes for a in jax.tree.leaves(w)) / E  # one expert's
            for tokens in map(int, args.tokens.split(",")):
                P = tokens * k
                ids = jax.random.permutation(jax.random.PRNGKey(tokens), E)[:P] if P <= E else \
                    jax.random.randint(jax.random.PRNGKey(tokens), (P,), 0, E)
                x = jax.random.normal(jax.random.PRNGKey(1), (P, K), jnp.bfloat16)
                ref = np.asarray(expert_matvec_reference(x, w, ids), np.float64)
                xla = per_call_s(lambda x: expert_matvec_reference(x, w, ids), x, args.reps, args.loop)
                base = {"projection": name, "weights": weights, "tokens": tokens, "pairs": P,
                        "routed_bytes": nbytes * P}
                rows.append({**base, "route": "xla_gather", "us": 1e6 * statistics.median(xla),
                             "gb_s": nbytes * P / statistics.median(xla) / 1e9, "times_s": xla})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "times_s"}), flush=True)
                for tname in (args.tilings.split(",") if weights == "bf16" else ["default"]):
                    run = lambda x, t=TILINGS[tname]: expert_matvec_pallas(x, w, ids, tiling=t, interpret=interpret)
                    if weights != "bf16" and P > POLICY.moe_kernel_max_pairs:  # the route ops takes there
                        tname, mt = "grouped", POLICY.expert_matmul_tiling(P, E)
                        blocks = sort_into_blocks(ids, E, mt.block_m)
                        run = lambda x: expert_matmul_pallas(x, w, blocks, tiling=mt, interpret=interpret)
                    err = float(np.linalg.norm(np.asarray(run(x), np.float64) - ref) / np.linalg.norm(ref))
                    ts = per_call_s(run, x, args.reps, args.loop)
                    rows.append({**base, "route": f"kernel_{tname}", "rel_err_vs_xla": err,
                                 "us": 1e6 * statistics.median(ts),
                                 "gb_s": nbytes * P / statistics.median(ts) / 1e9, "times_s": ts})
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "times_s"}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                       "command": "python benchmarks/expert_matvec_bench.py " + " ".join(argv or sys.argv[1:]),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
