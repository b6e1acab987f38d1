"""Decode-attention kernel (kernels/decode_attention.py): microseconds per call for
block sizes, warps and pipeline depths, on the benchmark shapes' heads at a short and
a long context, batch 1. Each figure is a compiled loop of 64 dependent calls (the
cache is carried), so launch costs count as they do inside the decode loop.
Run on the GPU: python benchmarks/attention_tune.py"""

import itertools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxllm.kernels.decode_attention import AttentionSpec, decode_attention_pallas  # noqa: E402

HEADS = {"smol135m": (9, 3, 64), "llama1b": (32, 8, 64), "llama8b": (32, 8, 128)}  # H, K, Dh
CALLS = int(os.environ.get("CALLS", 64))


def time_loop(spec, S, pos, **tiling):
    H, K, Dh = spec.n_heads, spec.n_kv_heads, spec.head_dim
    keys = jax.random.split(jax.random.PRNGKey(S + Dh), 3)
    qkv = jax.random.normal(keys[0], (1, (H + 2 * K) * Dh), jnp.bfloat16)
    cache = tuple(jax.random.normal(k, (1, S, K, Dh), jnp.bfloat16) for k in keys[1:])
    lengths = jnp.array([pos], jnp.int32)
    freq = 1e-4 ** (jnp.arange(Dh // 2) / (Dh // 2))

    @jax.jit
    def loop(qkv, cache):
        def body(i, carry):
            out, kc, vc = decode_attention_pallas(carry[1] * 0 + qkv, carry[2], carry[3], lengths, freq,
                                                  None, None, spec=spec, **tiling)
            return carry[0] + out[0, 0].astype(jnp.float32), qkv, kc, vc
        return jax.lax.fori_loop(0, CALLS, body, (jnp.float32(0), qkv, *cache))

    jax.block_until_ready(loop(qkv, cache))
    times = []
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(loop(qkv, cache))
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times) / CALLS


def main():
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    rows = []
    for (name, (H, K, Dh)), (S, pos) in itertools.product(HEADS.items(), [(256, 128), (4096, 4000)]):
        spec = AttentionSpec(n_heads=H, n_kv_heads=K, head_dim=Dh, scale=Dh ** -0.5, rope=True)
        tilings = [(bs, w, 2) for bs in (32, 64, 128) for w in (4, 8)] + [(64, 4, 1), (64, 4, 3)]
        for bs, warps, stages in tilings:
            try:
                us = time_loop(spec, S, pos, block_slots=bs, num_warps=warps, num_stages=stages)
            except Exception as e:  # a tiling that does not compile is reported, not fatal
                print(f"{name} S={S} bs={bs} warps={warps} stages={stages}: {type(e).__name__}")
                continue
            rows.append((name, S, pos, bs, warps, stages, us))
            print(f"{name:9} S={S:5} pos={pos:5} bs={bs:4} warps={warps} stages={stages}: {us:6.2f} us",
                  flush=True)
    print("\nbest per shape and context (us per call):")
    for key in sorted({(r[0], r[1]) for r in rows}):
        best = min((r for r in rows if (r[0], r[1]) == key), key=lambda r: r[-1])
        default = [r for r in rows if (r[0], r[1]) == key and r[3:6] == (64, 4, 3)]
        print(f"  {key[0]:9} S={key[1]:5}: best bs={best[3]} warps={best[4]} stages={best[5]} "
              f"{best[6]:.2f} us; default (64, 4, 3) {default[0][6] if default else float('nan'):.2f} us")


if __name__ == "__main__":
    main()
