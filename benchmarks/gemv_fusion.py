"""Why batch-1 projections move so few bytes under XLA: time y = f(x) @ W on decode
shapes where f is nothing, an RMSNorm, or an RMSNorm behind an optimization
barrier. Run under different XLA_FLAGS to compare; prints GB/s of W read."""

import statistics
import time

import jax
import jax.numpy as jnp


def rms(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + 1e-5)).astype(x.dtype)


VARIANTS = {
    "plain": lambda x, s: x,
    "norm": lambda x, s: rms(x) * s,
    "norm+barrier": lambda x, s: jax.lax.optimization_barrier(rms(x) * s),
}


def bench(k, n, variant, chain=8):
    keys = jax.random.split(jax.random.PRNGKey(0), chain + 2)
    x = jax.random.normal(keys[0], (1, k), jnp.bfloat16)
    s = jax.random.normal(keys[1], (k,), jnp.bfloat16)
    ws = [jax.random.normal(kk, (k, n), jnp.bfloat16) for kk in keys[2:]]
    f = VARIANTS[variant]

    @jax.jit
    def run(x, s, ws):
        outs = []
        for w in ws:  # distinct weights: the chain does not run from L2
            outs.append(f(x, s) @ w)
            x = x + outs[-1][:, :k] * 0 if n >= k else x
        return outs

    jax.block_until_ready(run(x, s, ws))
    times = []
    for _ in range(20):
        t = time.perf_counter()
        jax.block_until_ready(run(x, s, ws))
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    return chain * k * n * 2 / sec / 1e9


if __name__ == "__main__":
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    for k, n in [(576, 960), (576, 3072), (1536, 576), (2048, 3072), (2048, 16384), (8192, 2048),
                 (4096, 6144), (4096, 28672), (14336, 4096)]:
        row = "  ".join(f"{v}={bench(k, n, v):7.0f}" for v in VARIANTS)
        print(f"K={k:5d} N={n:5d}  GB/s  {row}")
