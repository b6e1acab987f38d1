"""Quantized matrix-vector kernel (kernels/qmatvec.py) vs its XLA reference and the
bf16 kernel on decode shapes: correctness against float64 NumPy on fresh random
data, then GB/s of weight bytes read (values + scales + minimums) per tiling.
Run on the GPU: python benchmarks/qmatvec_tune.py [--quick | --batch ROWS | --activations]

--activations compares the batch-1 kernel's integer dot products (activations rounded
to int8) with its float path, at the default tiling and a few others."""

import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from matvec_tune import time_chain  # noqa: E402

from jaxllm import quant  # noqa: E402
from jaxllm.kernels.matvec import matvec_pallas  # noqa: E402
from jaxllm.kernels.qmatvec import qmatmul_pallas, qmatvec_pallas, qmatvec_reference  # noqa: E402

SHAPES = [(2048, 3072), (2048, 16384), (8192, 2048), (4096, 6144), (4096, 28672), (14336, 4096),
          (4096, 4096), (2048, 128256)]


def chained_weights(K, N, mode, rows=1):
    """x [rows, K] and enough distinct quantized [K, N] weights (>= ~500 MB in all) that
    a chain of calls reads from HBM, not L2; their bytes."""
    per = {"int8": K * N * (1 + 2 / 32), "int4": K * N * (0.5 + 4 / 32)}[mode]
    chain = max(4, min(64, int(2e9 // (per * 4))))
    keys = jax.random.split(jax.random.PRNGKey(K + N), chain + 1)
    x = jax.random.normal(keys[0], (rows, K), jnp.bfloat16)
    ws = [quant.quantize_weight(jax.random.normal(k, (K, N), jnp.bfloat16), mode) for k in keys[1:]]
    return x, ws, sum(w.nbytes for w in ws)


def random_blocks(rng, bits, mins, G, N=384, K=1024) -> quant.HostBlocks:
    """Random levels, scales (and minimums) of one storage form: float16 for groups of
    32 (minimums paired with the scales, as `jaxllm.quantize` stores them), float32 else."""
    lo, hi = ((-8, 7) if not mins else (0, 15)) if bits == 4 else (-127, 127)
    dtype = np.float16 if G == 32 else np.float32
    return quant.HostBlocks(rng.integers(lo, hi + 1, (N, K)).astype(np.int8),
                            rng.uniform(0.001, 0.02, (N, K // G)).astype(dtype).astype(np.float32),
                            rng.normal(0, 0.05, (N, K // G)).astype(dtype).astype(np.float32) if mins else None,
                            bits)


def check(rng):
    """Every storage form and row count against float64 NumPy."""
    worst = 0.0
    for bits, mins, G, M in itertools.product((8, 4), (False, True), (16, 32), (1, 2, 4)):
        N, K = 384, 1024
        blocks = random_blocks(rng, bits, mins, G, N, K)
        w = quant.pack(blocks, jnp.bfloat16)
        x = rng.standard_normal((M, K)).astype(np.float32)
        ref = x.astype(np.float64) @ blocks.dequantize().T.astype(np.float64)
        xb = jnp.asarray(x, jnp.bfloat16)
        for name, fn in (("pallas", qmatvec_pallas), ("xla", qmatvec_reference)):
            got = np.asarray(fn(xb, w, jnp.float32), np.float64)
            err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            worst = max(worst, err)
            if err > 1e-2:
                print(f"MISMATCH {name} bits={bits} mins={mins} G={G} M={M}: rel err {err:.2e}")
    print(f"correctness: worst relative error vs float64 over all forms {worst:.1e} "
          "(bfloat16 activations)")
    # float32 activations on the int8 grid of each group: the integer path is exact
    for bits, mins, M in itertools.product((8, 4), (False, True), (1, 3)):
        G, N, K = 32, 384, 1024
        blocks = random_blocks(rng, bits, mins, G, N, K)
        levels = rng.integers(-127, 128, (M, K // G, G))
        levels[:, :, 0] = 127
        x = (levels * rng.uniform(0.005, 0.05, (M, K // G, 1))).reshape(M, K).astype(np.float32)
        ref = x.astype(np.float64) @ blocks.dequantize().T.astype(np.float64)
        got = np.asarray(qmatvec_pallas(jnp.asarray(x), quant.pack(blocks), jnp.float32,
                                        int8_activations=True), np.float64)
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        worst = max(worst, err)
        print(f"int8 activations on the grid bits={bits} mins={mins} M={M}: rel err {err:.1e}"
              + ("  MISMATCH" if err > 1e-5 else ""))
    return worst


def activations():
    """The integer path against the float path (GB/s of weight bytes), default tiling,
    then a few tilings of the integer path."""
    tilings = [(32, 512, 3, 1056, 4), (64, 512, 3, 1056, 4), (64, 256, 4, 1056, 4),
               (32, 256, 4, 2112, 4), (128, 512, 3, 1056, 8)]
    for K, N in SHAPES:
        for mode in ("int8", "int4"):
            x, ws, bytes_ = chained_weights(K, N, mode)
            ref = np.asarray(qmatvec_pallas(x, ws[0], jnp.float32, int8_activations=False))
            fl = bytes_ / time_chain(lambda x, w: qmatvec_pallas(x, w, int8_activations=False), x, ws,
                                     reps=10) / 1e9
            i8 = bytes_ / time_chain(lambda x, w: qmatvec_pallas(x, w, int8_activations=True), x, ws,
                                     reps=10) / 1e9
            got = np.asarray(qmatvec_pallas(x, ws[0], jnp.float32, int8_activations=True))
            err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            line = f"K={K:5d} N={N:6d} {mode} float={fl:6.0f} GB/s  int8={i8:6.0f} (rel diff {err:.1e})"
            for bn, bk, st, tp, nw in tilings:
                fn = lambda x, w, bn=bn, bk=bk, st=st, tp=tp, nw=nw: qmatvec_pallas(
                    x, w, block_n=bn, block_k=bk, num_stages=st, target_programs=tp, num_warps=nw,
                    int8_activations=True)
                try:
                    line += f"  {(bn, bk, st, tp, nw)}={bytes_ / time_chain(fn, x, ws, reps=10) / 1e9:.0f}"
                except Exception as e:  # noqa: BLE001 - a tiling that does not compile
                    line += f"  {(bn, bk, st, tp, nw)}=fail:{type(e).__name__}"
            print(line, flush=True)
            del ws


def small_batch(rows=8):
    """qmatmul_pallas (5-16 rows) against the XLA path (dequantize, then matmul)."""
    tilings = [(64, 128, 3, 528, 4), (32, 128, 3, 1056, 4), (64, 256, 3, 528, 4), (128, 128, 3, 528, 8)]
    for K, N in SHAPES:
        for mode in ("int8", "int4"):
            x, ws, bytes_ = chained_weights(K, N, mode, rows)
            ref = np.asarray(qmatvec_reference(x, ws[0], jnp.float32))
            xla = bytes_ / time_chain(qmatvec_reference, x, ws, reps=10) / 1e9
            results = []
            for bn, bk, st, tp, nw in tilings:
                fn = lambda x, w, bn=bn, bk=bk, st=st, tp=tp, nw=nw: qmatmul_pallas(
                    x, w, block_n=bn, block_k=bk, num_stages=st, target_programs=tp, num_warps=nw)
                try:
                    got = np.asarray(fn(x, ws[0]).astype(jnp.float32))
                    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
                    results.append((bytes_ / time_chain(fn, x, ws, reps=10) / 1e9, (bn, bk, st, tp, nw), err))
                except Exception as e:  # noqa: BLE001 - a tiling that does not compile
                    print("  fail", (bn, bk, st, tp, nw), type(e).__name__, str(e)[:200])
            default = bytes_ / time_chain(qmatmul_pallas, x, ws, reps=10) / 1e9
            best = max(results) if results else (0, None, 0)
            print(f"K={K:5d} N={N:6d} {mode} rows={rows} xla={xla:6.0f} GB/s  qmatmul default={default:6.0f}  "
                  f"best={best[0]:6.0f} at {best[1]} (rel err vs xla {best[2]:.1e})", flush=True)
            del ws


def main():
    if "--batch" in sys.argv:
        print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
        return small_batch(int(sys.argv[sys.argv.index("--batch") + 1]))
    quick = "--quick" in sys.argv
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    check(np.random.default_rng())
    if "--activations" in sys.argv:
        return activations()
    configs = [(32, 256, 4, 1056), (64, 256, 4, 1056), (128, 256, 4, 1056), (64, 128, 4, 1056),
               (64, 512, 3, 1056), (32, 512, 3, 1056), (64, 256, 3, 2112), (32, 256, 4, 2112)]
    if quick:
        configs = configs[:3]
    for K, N in SHAPES:
        for mode in ("int8", "int4"):
            x, ws, bytes_ = chained_weights(K, N, mode)
            xla = bytes_ / time_chain(qmatvec_reference, x, ws, reps=10) / 1e9
            best = (0, None)
            for bn, bk, stages, tp in configs:
                fn = lambda x, w, bn=bn, bk=bk, st=stages, tp=tp: qmatvec_pallas(
                    x, w, block_n=bn, block_k=bk, num_stages=st, target_programs=tp)
                try:
                    gbps = bytes_ / time_chain(fn, x, ws, reps=10) / 1e9
                except Exception as e:  # noqa: BLE001 - a tiling that does not compile
                    print("  fail", bn, bk, stages, tp, type(e).__name__, str(e)[:200])
                    continue
                best = max(best, (gbps, (bn, bk, stages, tp)))
            default = bytes_ / time_chain(qmatvec_pallas, x, ws, reps=10) / 1e9
            print(f"K={K:5d} N={N:6d} {mode} chain={len(ws):3d} xla={xla:6.0f} GB/s  default={default:6.0f}  "
                  f"best={best[0]:6.0f} GB/s at (block_n, block_k, stages, programs)={best[1]}", flush=True)
            del ws
        ws = [jax.random.normal(k, (K, N), jnp.bfloat16) for k in jax.random.split(jax.random.PRNGKey(1), 8)]
        bf = 8 * K * N * 2 / time_chain(matvec_pallas, x, ws, reps=10) / 1e9
        print(f"K={K:5d} N={N:6d} bf16 matvec_pallas {bf:6.0f} GB/s", flush=True)
        del ws


if __name__ == "__main__":
    main()
