"""Measure the two KV-cache layouts on one layer's decode work: write one token's
keys/values per row, then attend over the cache. Run: python benchmarks/cache_layout.py"""

import sys
import time

import jax
import jax.numpy as jnp


def step_bskd(k, v, q, nk, nv, pos):  # cache [B, S, K, D]
    k = jax.vmap(lambda c, u, p: jax.lax.dynamic_update_slice_in_dim(c, u, p, 0))(k, nk, pos)
    v = jax.vmap(lambda c, u, p: jax.lax.dynamic_update_slice_in_dim(c, u, p, 0))(v, nv, pos)
    s = jnp.einsum("bkgd,bskd->bkgs", q, k, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(s, -1).astype(v.dtype)
    return k, v, jnp.einsum("bkgs,bskd->bkgd", p, v)


def step_bksd(k, v, q, nk, nv, pos):  # cache [B, K, S, D]
    k = jax.vmap(lambda c, u, p: jax.lax.dynamic_update_slice_in_dim(c, u, p, 1))(k, nk.transpose(0, 2, 1, 3), pos)
    v = jax.vmap(lambda c, u, p: jax.lax.dynamic_update_slice_in_dim(c, u, p, 1))(v, nv.transpose(0, 2, 1, 3), pos)
    s = jnp.einsum("bkgd,bksd->bkgs", q, k, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(s, -1).astype(v.dtype)
    return k, v, jnp.einsum("bkgs,bksd->bkgd", p, v)


def bench(fn, layout, B, S, K, G, D, dtype, steps=64):
    shape = (B, S, K, D) if layout == "bskd" else (B, K, S, D)
    key = jax.random.PRNGKey(0)
    k = jax.random.normal(key, shape, dtype)
    v = jax.random.normal(jax.random.fold_in(key, 1), shape, dtype)
    q = jax.random.normal(jax.random.fold_in(key, 2), (B, K, G, D), dtype)
    nk = jax.random.normal(jax.random.fold_in(key, 3), (B, 1, K, D), dtype)

    @jax.jit
    def run(k, v):
        def body(i, carry):
            k, v, acc = carry
            # The output feeds the next query so that no step's attention is dead code.
            k, v, out = fn(k, v, q + acc, nk, nk, jnp.full((B,), i, jnp.int32))
            return k, v, (out * 1e-3).astype(acc.dtype)
        return jax.lax.fori_loop(0, steps, body, (k, v, jnp.zeros_like(q)))

    run = jax.jit(run, donate_argnums=(0, 1))
    k, v, out = run(k, v)
    jax.block_until_ready(out)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        k, v, out = run(k, v)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / steps)
    return sorted(times)[2] * 1e6


if __name__ == "__main__":
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, dtype {dtype.__name__}")
    for B, S, K, G, D in [(1, 1024, 3, 3, 64), (8, 1024, 3, 3, 64), (1, 4096, 8, 4, 64), (8, 4096, 8, 4, 128)]:
        a = bench(step_bskd, "bskd", B, S, K, G, D, dtype)
        b = bench(step_bksd, "bksd", B, S, K, G, D, dtype)
        print(f"B={B} S={S} K={K} G={G} D={D}: [B,S,K,D] {a:8.1f} us/step   [B,K,S,D] {b:8.1f} us/step")
    sys.stdout.flush()
