"""Pallas matrix-vector kernel vs XLA on decode shapes: correctness against the XLA
reference on fresh random data, then GB/s of weight read for several tilings.
Run on the GPU: python benchmarks/matvec_tune.py"""

import itertools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxllm.kernels.matvec import matvec_pallas, matvec_reference  # noqa: E402

SHAPES = [(576, 960), (576, 3072), (1536, 576), (2048, 3072), (2048, 16384), (8192, 2048),
          (4096, 6144), (4096, 28672), (14336, 4096), (4096, 4096)]


def time_chain(fn, x, ws, reps=20):
    f = jax.jit(lambda x, ws: [fn(x, w) for w in ws])
    jax.block_until_ready(f(x, ws))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(x, ws))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    configs = list(itertools.product([128, 256], [16, 32, 64], [264, 1056]))
    for K, N in SHAPES:
        chain = max(4, min(64, int(2e9 // (K * N * 2 * 8))))  # >= ~250 MB per call, beats L2
        keys = jax.random.split(jax.random.PRNGKey(K + N), chain + 1)
        x = jax.random.normal(keys[0], (1, K), jnp.bfloat16)
        ws = [jax.random.normal(k, (K, N), jnp.bfloat16) for k in keys[1:]]
        ref = np.asarray(matvec_reference(x, ws[0]), np.float32)
        got = np.asarray(matvec_pallas(x, ws[0]), np.float32)
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        bytes_ = chain * K * N * 2
        xla = bytes_ / time_chain(matvec_reference, x, ws) / 1e9
        best = (0, None)
        for bn, bk, tp in configs:
            fn = lambda x, w, bn=bn, bk=bk, tp=tp: matvec_pallas(x, w, block_n=bn, block_k=bk, target_programs=tp)
            try:
                gbps = bytes_ / time_chain(fn, x, ws, reps=10) / 1e9
            except Exception as e:  # noqa: BLE001 - a tiling that does not compile
                print("  fail", bn, bk, tp, type(e).__name__)
                continue
            best = max(best, (gbps, (bn, bk, tp)))
        print(f"K={K:5d} N={N:5d} chain={chain:3d} rel_err={err:.1e}  xla={xla:6.0f} GB/s  "
              f"pallas best={best[0]:6.0f} GB/s at (block_n, block_k, programs)={best[1]}", flush=True)


if __name__ == "__main__":
    main()
