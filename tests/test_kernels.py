"""Pallas kernels against their XLA references, in interpret mode on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ARCH_CONFIGS

import jaxllm
from jaxllm.kernels.matvec import matvec_pallas, matvec_reference


@pytest.mark.parametrize("M, K, N", [(1, 576, 960), (3, 100, 70), (4, 1536, 576), (1, 64, 64),
                                     (2, 300, 1000)])
@pytest.mark.parametrize("tiling", [dict(block_n=64, block_k=32, target_programs=16),
                                    dict(block_n=128, block_k=16, target_programs=4)])
def test_matvec_matches_reference(M, K, N, tiling):
    kx, kw = jax.random.split(jax.random.PRNGKey(np.random.randint(1 << 30)))
    x = jax.random.normal(kx, (M, K), jnp.float32)
    w = jax.random.normal(kw, (K, N), jnp.float32)
    got = np.asarray(matvec_pallas(x, w, interpret=True, **tiling))
    ref64 = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert got.shape == (M, N)
    assert np.linalg.norm(got - ref64) / np.linalg.norm(ref64) < 1e-5
    np.testing.assert_allclose(got, matvec_reference(x, w), rtol=1e-4, atol=1e-4)


def test_model_with_pallas_kernels_matches_xla_path():
    c = ARCH_CONFIGS["qwen2"].replace(tie_embeddings=False)
    params = jaxllm.init_params(c, jax.random.PRNGKey(np.random.randint(1 << 30)))
    tokens = jnp.asarray(np.random.randint(0, c.vocab_size, (1, 4)))  # 3 + 1 rows: the kernel path
    results = []
    for config in (c, c.replace(kernels="pallas")):
        cache = jaxllm.init_cache(config, 1, 16, jnp.float32)
        first, cache = jaxllm.extend(params, config, tokens[:, :3], jnp.array([3]), cache)
        second, _ = jaxllm.decode_step(params, config, tokens[:, 3], cache)
        results.append((first, second))
    for got, ref in zip(results[1], results[0]):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
