"""Quantized projections at serving batches (issue 28), per projection, side by side
on one GPU: bf16 through XLA's dot (the peer), int8 / int4 through the XLA path
(dequantize, then matmul) and through qmatmul_pallas at several tilings, and fp8
through XLA's FP8 matrix multiply. Each figure is the median time of a chain of
calls over distinct weights (~1 GB, so they come from HBM, not L2).

  python benchmarks/qmatmul_batch.py [--shape llama8b] [--batches 16,32,64,128,256]
      [--tilings default|sweep] [--budget SECONDS] [--out FILE.json]

Prints one line per (projection, batch, format) and writes the rows as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from matvec_tune import time_chain  # noqa: E402

from jaxllm import quant  # noqa: E402
from jaxllm.config import PRESETS  # noqa: E402
from jaxllm.kernels.qmatvec import qmatmul_pallas, qmatvec_reference  # noqa: E402
from jaxllm.policy import QMatmulTiling, matmul_tiling  # noqa: E402
from jaxllm.weights import fp8_linear  # noqa: E402

SWEEP = [QMatmulTiling(16, 64, 128, 4, 3), QMatmulTiling(32, 64, 128, 4, 3), QMatmulTiling(64, 64, 128, 4, 3),
         QMatmulTiling(64, 128, 64, 4, 3), QMatmulTiling(64, 128, 128, 8, 3), QMatmulTiling(128, 128, 64, 8, 3),
         QMatmulTiling(128, 64, 128, 8, 3), QMatmulTiling(128, 128, 128, 8, 3), QMatmulTiling(64, 64, 256, 4, 3)]


def projections(shape: str) -> list[tuple[str, int, int]]:
    c = PRESETS[shape]
    return [("qkv", c.d_model, c.q_size + 2 * c.kv_size), ("o", c.q_size, c.d_model),
            ("gate_up", c.d_model, 2 * c.d_ff), ("down", c.d_ff, c.d_model)]


def chain_of(K: int, N: int, make, bytes_per_weight: float):
    """Distinct weights made by make(key) adding up to ~1 GB of the stored format."""
    n = max(2, min(48, int(1e9 // (K * N * bytes_per_weight))))
    return [make(k) for k in jax.random.split(jax.random.PRNGKey(K * 7 + N), n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama8b")
    p.add_argument("--batches", default="16,32,64,128,256")
    p.add_argument("--formats", default="bf16,int8,int4,fp8")
    p.add_argument("--tilings", default="default", choices=["default", "sweep"])
    p.add_argument("--sweep-batches", default="32,128,256", help="batches the sweep tries every tiling at")
    p.add_argument("--budget", type=float, default=480, help="seconds; the sweep stops trying tilings after")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    device = jax.devices()[0].device_kind
    print(f"{device}, jax {jax.__version__}, {args.shape}", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    sweep_batches = {int(b) for b in args.sweep_batches.split(",")}
    formats = args.formats.split(",")
    rows = []
    for name, K, N in projections(args.shape):
        dense = chain_of(K, N, lambda k: (jax.random.normal(k, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16), 2)
        per_format = {"bf16": dense}
        for mode in ("int8", "int4", "fp8"):
            if mode in formats:
                per_format[mode] = [quant.quantize_weight(w, mode) for w in dense]
        if "bf16" not in formats:
            del per_format["bf16"]
        for M in batches:
            x = (jax.random.normal(jax.random.PRNGKey(M), (M, K), jnp.float32)).astype(jnp.bfloat16)
            base = None
            for fmt, ws in per_format.items():
                nbytes = sum(w.size * 2 if fmt == "bf16" else w.nbytes for w in ws)
                variants = {}
                if fmt == "bf16":
                    variants["xla"] = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.bfloat16)
                elif fmt == "fp8":
                    variants["xla_fp8"] = lambda x, w: fp8_linear(x, w)
                else:
                    variants["xla"] = lambda x, w: qmatvec_reference(x, w)
                    tilings = [matmul_tiling(M)]
                    if args.tilings == "sweep" and M in sweep_batches:
                        tilings += [t for t in SWEEP if t != tilings[0] and t.block_m <= max(16, M)]
                    for t in tilings:
                        variants[f"qmatmul{(t.block_m, t.block_n, t.block_k, t.num_warps, t.num_stages)}"] = (
                            lambda x, w, t=t: qmatmul_pallas(x, w, tiling=t))
                ref = np.asarray(jnp.dot(x, dense[0], preferred_element_type=jnp.float32))
                for variant, fn in variants.items():
                    if variant.startswith("qmatmul(") and variant != list(variants)[1] and \
                            time.perf_counter() - t_start > args.budget:
                        continue  # out of time: keep the default tiling only
                    try:
                        got = np.asarray(fn(x, ws[0]).astype(jnp.float32))
                        seconds = time_chain(fn, x, ws, reps=10) / len(ws)
                    except Exception as e:  # noqa: BLE001 - a tiling that does not compile
                        print(f"  {name} M={M} {fmt} {variant}: {type(e).__name__} {str(e)[:160]}", flush=True)
                        continue
                    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                    if fmt == "bf16":
                        base = seconds
                    row = {"projection": name, "K": K, "N": N, "batch": M, "weights": fmt, "variant": variant,
                           "us": seconds * 1e6, "weight_GBps": nbytes / len(ws) / seconds / 1e9,
                           "tflops": 2 * M * K * N / seconds / 1e12, "rel_err_vs_bf16_dot": err,
                           "speedup_vs_bf16": None if base is None else base / seconds}
                    rows.append(row)
                    print(f"{name:7s} K={K:5d} N={N:6d} M={M:3d} {fmt:4s} {variant:32s} {seconds * 1e6:8.1f} us "
                          f"{row['weight_GBps']:6.0f} GB/s {row['tflops']:6.1f} TFLOP/s err {err:.1e}"
                          + (f"  x{row['speedup_vs_bf16']:.2f} vs bf16" if base else ""), flush=True)
        del dense, per_format
    out = {"device": device, "jax": jax.__version__, "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
           "command": "python benchmarks/qmatmul_batch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
