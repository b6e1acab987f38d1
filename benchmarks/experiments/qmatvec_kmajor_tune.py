"""Experiment: the K-major quantized matvec (qmatvec_kmajor.py) against the row-layout kernel on decode shapes."""
import os, sys
import jax, jax.numpy as jnp, numpy as np
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..")); sys.path.insert(0, os.path.join(here, "..")); sys.path.insert(0, here)
from matvec_tune import time_chain
from qmatvec_tune import chained_weights
from jaxllm.kernels.qmatvec import qmatvec_pallas
from qmatvec_kmajor import qmatvec_kmajor, to_kmajor
SHAPES = [(4096, 6144), (4096, 28672), (14336, 4096), (4096, 4096), (2048, 3072), (2048, 16384), (8192, 2048), (2048, 128256)]
CFGS = [(bn, gps, st, tp, nw) for bn, gps in ((128, 1), (256, 1), (512, 1), (256, 2), (128, 2))
        for st, tp, nw in ((3, 1056, 4), (4, 2112, 4))]
print(jax.devices()[0].device_kind, jax.__version__)
for K, N in SHAPES:
    for mode in ("int8", "int4"):
        x, ws, bytes_ = chained_weights(K, N, mode)
        row = bytes_ / time_chain(qmatvec_pallas, x, ws, reps=10) / 1e9
        kws = [jax.block_until_ready(to_kmajor(w)) for w in ws]
        bits = ws[0].bits
        ref = np.asarray(qmatvec_pallas(x, ws[0], jnp.float32))
        del ws
        res = []
        for bn, gps, st, tp, nw in CFGS:
            fn = lambda x, w, bn=bn, gps=gps, st=st, tp=tp, nw=nw: qmatvec_kmajor(
                x, *w, bits, block_n=bn, gps=gps, num_stages=st, target_programs=tp, num_warps=nw)
            try:
                got = np.asarray(fn(x, kws[0]).astype(jnp.float32))
                err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
                g = bytes_ / time_chain(fn, x, kws, reps=10) / 1e9
                res.append((g, (bn, gps, st, tp, nw), err))
            except Exception as e:
                print("  fail", (bn, gps, st, tp, nw), type(e).__name__, str(e)[:150])
        best = max(res) if res else (0, None, 0)
        print(f"K={K:5d} N={N:6d} {mode} row-layout default {row:6.0f} GB/s | kmajor best {best[0]:6.0f} GB/s at {best[1]} err {best[2]:.1e}", flush=True)
        print("    " + " ".join(f"{c[0]}/{c[1]}/{c[2]}/{c[3]}:{g:.0f}" for g, c, _ in res), flush=True)
        del kws
