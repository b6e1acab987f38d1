"""The row-major matrix-vector kernel (kernels/rowmatvec.py) on decode shapes, with
the fusions the model uses at each (qkv: norm; o: residual; gate-up: norm and gate;
down: residual): error against its XLA reference, then TB/s of weight read for
tilings, against the split-K kernel (kernels/matvec.py, without its reductions).
Run on the GPU: python benchmarks/rowmatvec_tune.py [--quick]

The figures rank tilings; they are not the kernels' bandwidth inside the model: a
chain of separately dispatched small kernels reached only 0.4-1.0 TB/s here on the
H200, where benchmarks/profile_decode.py measures the same kernels at 1.8-3.4 TB/s
inside the compiled decode loop (benchmarks/NOTES.md, variant 22)."""

import argparse
import itertools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxllm.kernels.matvec import matvec_pallas  # noqa: E402
from jaxllm.kernels.rowmatvec import rowmatvec_pallas, rowmatvec_reference  # noqa: E402
from jaxllm.policy import RowTiling  # noqa: E402
from matvec_tune import time_chain  # noqa: E402

# (name, K, N, fusion): N counts the outputs (a gated weight has 2N rows)
SHAPES = [("llama1b qkv", 2048, 3072, "norm"), ("llama1b o", 2048, 2048, "residual"),
          ("llama1b gate-up", 2048, 8192, "gate"), ("llama1b down", 8192, 2048, "residual"),
          ("llama8b gate-up", 4096, 14336, "gate"), ("llama8b down", 14336, 4096, "residual")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tilings")
    args = ap.parse_args()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; default tiling {RowTiling()}")
    blocks_n = [4, 8, 16]
    blocks_k = [512, 1024, 2048]
    pipes = [(3, 4), (3, 8)] if args.quick else [(3, 4), (4, 4), (3, 8), (2, 8)]
    for name, K, N, fusion in SHAPES[:4] if args.quick else SHAPES:
        rows_t = 2 * N if fusion == "gate" else N
        chain = max(4, min(64, int(2e9 // (K * rows_t * 2 * 8))))  # >= ~250 MB per call, beats L2
        keys = jax.random.split(jax.random.PRNGKey(K + N), chain + 3)
        x = jax.random.normal(keys[0], (1, K), jnp.bfloat16)
        ts = [jax.random.normal(k, (rows_t, K), jnp.bfloat16) / 30 for k in keys[3:]]
        kw = {"gate": "silu"} if fusion == "gate" else {}
        if fusion in ("norm", "gate"):
            kw.update(norm_scale=jax.random.normal(keys[1], (K,), jnp.bfloat16))
        if fusion == "residual":
            kw.update(residual=jax.random.normal(keys[2], (1, N), jnp.bfloat16))
        ref = rowmatvec_reference(x, ts[0], **kw)
        got = rowmatvec_pallas(x, ts[0], **kw)
        err = float(jnp.linalg.norm((got - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
        bytes_ = chain * K * rows_t * 2
        ws = [t.T for t in ts]
        split_k = bytes_ / time_chain(lambda x, w: matvec_pallas(x, w, sum_splits=False).sums, x, ws) / 1e12
        default = bytes_ / time_chain(lambda x, t: rowmatvec_pallas(x, t, **kw), x, ts) / 1e12
        results = []
        for bn, bk, (stages, warps), tile in itertools.product(blocks_n, blocks_k, pipes, [True, False]):
            fn = lambda x, t, bn=bn, bk=bk, s=stages, w=warps, tile=tile: rowmatvec_pallas(
                x, t, block_n=bn, block_k=bk, num_stages=s, num_warps=w, tile_acc=tile, **kw)
            try:
                results.append((bytes_ / time_chain(fn, x, ts, reps=10) / 1e12, (bn, bk, stages, warps, tile)))
            except Exception as e:  # noqa: BLE001 - a tiling that does not compile
                print(f"  {bn} {bk} {stages} {warps} {tile}: {type(e).__name__}")
        results.sort(reverse=True)
        top = ", ".join(f"{tb:.2f} at {c}" for tb, c in results[:4])
        print(f"{name:16} K={K:5d} N={N:5d} {fusion:8} err {err:.1e}  split-K {split_k:.2f} TB/s  "
              f"rows default {default:.2f}  best (block_n, block_k, stages, warps, tile_acc): {top}", flush=True)


if __name__ == "__main__":
    main()
