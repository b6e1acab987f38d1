"""The float8 KV cache (config.kv_cache = "fp8", issue 28): what it stores against an
independent rounding (ml_dtypes), the decode-attention kernel against the XLA path on
the same cache, and the serving engine on it. Its NLL cost on the real models:
test_quant.py, beside fp8 weights'."""

import copy

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import ARCH_CONFIGS, greedy_alone, serve_all, served_model, tiny
from test_kernels import prefill_and_steps

import jaxllm
from jaxllm.batching import Engine
from jaxllm.cache import FP8, cache_bytes, to_storage


def test_storage_rounds_to_e4m3_and_saturates():
    """Rounded as ml_dtypes rounds; beyond e4m3's 448 clipped, never NaN (e4m3fn has no infinity)."""
    x = np.array([0.3, -1.7, 447.0, 449.0, 1e6, -3e4, 1e-5, 0.0], np.float32)
    got = np.asarray(to_storage(jnp.asarray(x), FP8).astype(jnp.float32))
    want = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    assert got[3] == 448 and got[4] == 448 and got[5] == -448 and not np.isnan(got).any()


def test_cache_holds_the_rounded_keys_and_values_in_half_the_bytes():
    """After a prefill, layer 0's float8 cache is the float32 cache's keys and values
    rounded (the first layer's keys do not depend on any cached value)."""
    config = tiny(vocab_size=96, d_model=64, d_ff=96, head_dim=16)
    fp8 = config.replace(kv_cache="fp8")
    params = jaxllm.init_params(config, jax.random.PRNGKey(3))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 7), 0, config.vocab_size)
    caches = []
    for c in (config, fp8):
        cache = jaxllm.init_cache(c, 2, 8, jnp.float32)
        caches.append(jaxllm.extend(params, c, tokens, jnp.array([7, 5]), cache)[1])
    full, rounded = caches
    assert rounded.k[0].dtype == FP8 and full.k[0].dtype == jnp.float32
    for a, b in ((full.k[0], rounded.k[0]), (full.v[0], rounded.v[0])):
        want = np.clip(np.asarray(a), -448, 448).astype(ml_dtypes.float8_e4m3fn)
        np.testing.assert_array_equal(np.asarray(b).view(np.uint8), want.view(np.uint8))
    assert cache_bytes(fp8, 2, 8, jnp.bfloat16) * 2 == cache_bytes(config, 2, 8, jnp.bfloat16)


@pytest.mark.parametrize("arch", ["llama3", "qwen3", "gemma"])
def test_decode_attention_kernel_reads_the_float8_cache_as_xla_does(arch):
    """Prefill and decode steps on a float8 cache: the kernels (interpreted) against the
    XLA path, logits and the cache they leave (rope, query/key norms, windows, softcap)."""
    c = ARCH_CONFIGS[arch].replace(tie_embeddings=False, kv_cache="fp8")
    params = jaxllm.init_params(c, jax.random.PRNGKey(np.random.randint(1 << 30)))
    tokens = jnp.asarray(np.random.randint(0, c.vocab_size, (2, 9)))
    ref = prefill_and_steps(params, c.replace(kernels="xla"), tokens)
    got = prefill_and_steps(params, c.replace(kernels="pallas"), tokens)
    assert got[1].k[0].dtype == FP8
    # the cache compared as float32: a value on either side of a rounding boundary is
    # one e4m3 step apart, so the tolerance is e4m3's relative step, and near zero its
    # subnormal step, 2^-9 (a run failed at 0.0039 against 0.0059 with atol 1e-3)
    (g_logits, g_cache), (r_logits, r_cache) = got, ref
    widen = lambda cache: jax.tree.map(lambda a: a.astype(jnp.float32), cache)
    for g, r in zip(g_logits, r_logits):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-3)
    for g, r in zip(jax.tree.leaves(widen(g_cache)), jax.tree.leaves(widen(r_cache))):
        np.testing.assert_allclose(g, r, rtol=0.07, atol=2.0 ** -9 + 1e-6)


def test_logits_stay_near_the_full_precision_cache():
    """Within 15% of the logits (about 6% on this random model, whose logits are small
    and sensitive; the real models' NLL cost is the test that matters, below)."""
    config = tiny(vocab_size=96, d_model=64, d_ff=96, head_dim=16)
    params = jaxllm.init_params(config, jax.random.PRNGKey(5))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 9)))
    full, _ = prefill_and_steps(params, config, tokens)
    rounded, _ = prefill_and_steps(params, config.replace(kv_cache="fp8"), tokens)
    full, rounded = np.stack(full), np.stack(rounded)
    err = np.linalg.norm(rounded - full) / np.linalg.norm(full)
    assert 0 < err < 0.15, err


def test_engine_serves_from_a_float8_cache(tmp_path_factory):
    """Batched admission and prefix copies on a float8 cache: each answer equals
    `generate` alone on the same kind of cache."""
    model = copy.copy(served_model(tmp_path_factory, 4, 512))
    model.config = model.config.replace(kv_cache="fp8")
    rng = np.random.default_rng(1)
    system = rng.integers(3, 300, 40).tolist()
    prompts = [system + rng.integers(3, 300, n).tolist() for n in (3, 17, 1)]
    engine = Engine(model.params, model.config, model.tokenizer, n_slots=4, max_context=512,
                    steps_per_chunk=4, prefill_tokens=1024)
    assert engine.slots.cache.k[0].dtype == FP8
    try:
        requests = serve_all(engine, prompts, 10, start=True)
        again, = serve_all(engine, [prompts[1]], 10)  # its prefix is copied from a float8 row
    finally:
        engine.shutdown()
    for p, r in zip(prompts + [prompts[1]], requests + [again]):
        assert r.ids == greedy_alone(model, p, 10)
