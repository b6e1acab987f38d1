"""The kernel policy (jaxllm/policy.py): decided once, part of every jit key, and the
plans it gives each kind of weight on each backend."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ARCH_CONFIGS

import jaxllm
from jaxllm.layout import for_policy
from jaxllm.policy import KernelPolicy, RowTiling


def decode_logits(params, config, tokens):
    cache = jaxllm.init_cache(config, tokens.shape[0], 16, jnp.float32)
    _, cache = jaxllm.extend(params, config, tokens, jnp.full((tokens.shape[0],), tokens.shape[1]), cache)
    logits, _ = jaxllm.decode_step(params, config, tokens[:, 0], cache)
    return np.asarray(logits, np.float64)


def test_a_changed_policy_value_recompiles_and_takes_the_new_path():
    """int8 weights on the quantized kernel (interpreted): rounding the activations to
    int8 moves the logits away from the XLA path, the float path does not. Switching
    the policy value back and forth in one process, with no cache clearing, gives each
    value's own result and one compilation per value."""
    c = ARCH_CONFIGS["llama3"]
    params = jaxllm.quantize(jaxllm.init_params(c, jax.random.PRNGKey(0)), "int8", group_size=16)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, c.vocab_size, (1, 5)))
    rounded = c.replace(kernels=KernelPolicy.for_backend("pallas", int8_activations=True))
    exact = c.replace(kernels=KernelPolicy.for_backend("pallas", int8_activations=False))
    assert rounded != exact and hash(rounded) != hash(exact)
    with jax.default_matmul_precision("highest"):
        ref = decode_logits(params, c.replace(kernels="xla"), tokens)
        compiled = jaxllm.decode_step._cache_size()
        first = decode_logits(params, rounded, tokens)
        second = decode_logits(params, exact, tokens)
        third = decode_logits(params, rounded, tokens)
    err = lambda x: np.linalg.norm(x - ref) / np.linalg.norm(ref)
    assert err(second) < 1e-5 < 1e-3 < err(first)
    np.testing.assert_array_equal(first, third)
    assert jaxllm.decode_step._cache_size() == compiled + 2


def test_names_become_policies_for_the_default_backend():
    c = ARCH_CONFIGS["llama3"]
    assert isinstance(c.kernels, KernelPolicy) and c.kernels.mode == "auto"
    assert c.kernels.platform == jax.default_backend()
    assert c.replace(kernels="xla").kernels == KernelPolicy.for_backend("xla")
    with pytest.raises(ValueError, match="kernels must be"):
        c.replace(kernels="fast")
    hash(KernelPolicy.for_backend("auto", platform="gpu", rowmatvec=RowTiling(prefetch=2)))


@pytest.mark.parametrize("mode, platform, kind, rows, shape, bits, kernel", [
    # the GPU: weights by output row on the row-major kernel at decode, XLA's dot for prefill
    ("auto", "gpu", "by_row", 1, (2048, 3072), 16, "rowmatvec"),
    ("auto", "gpu", "by_row", 4, (2048, 128256), 16, "rowmatvec"),
    ("auto", "gpu", "by_row", 5, (2048, 3072), 16, "xla"),
    # dense weights: llama8b's (both sides >= 4096) on XLA; a small untied head split-K
    ("auto", "gpu", "dense", 1, (4096, 14336), 16, "xla"),
    ("auto", "gpu", "dense", 1, (2048, 32000), 16, "matvec"),
    # quantized: the matrix-vector kernel to 4 rows, the matmul kernel to 256, then XLA
    ("auto", "gpu", "quantized", 1, (4096, 4096), 4, "qmatvec"),
    ("auto", "gpu", "quantized", 8, (4096, 4096), 8, "qmatmul"),
    ("auto", "gpu", "quantized", 256, (4096, 4096), 4, "qmatmul"),
    ("auto", "gpu", "quantized", 512, (4096, 4096), 8, "xla"),
    ("auto", "gpu", "quantized", 1, (4096, 4096), 6, "xla"),
    # fp8: the row-major kernel at decode where dense weights take it, else XLA's FP8 dot
    ("auto", "gpu", "fp8", 1, (2048, 8192), 8, "rowmatvec"),
    ("auto", "gpu", "fp8", 1, (4096, 14336), 8, "xla"),
    ("auto", "gpu", "fp8", 64, (2048, 8192), 8, "xla"),
    ("auto", "cpu", "fp8", 1, (576, 1536), 8, "xla"),
    ("pallas", "cpu", "fp8", 2, (4096, 14336), 8, "rowmatvec"),
    # the CPU: the native kernel at decode, XLA otherwise
    ("auto", "cpu", "quantized", 1, (576, 1536), 4, "native"),
    ("auto", "cpu", "quantized", 5, (576, 1536), 4, "xla"),
    ("auto", "cpu", "dense", 1, (576, 1536), 16, "xla"),
    ("auto", "cpu", "by_row", 1, (576, 1536), 16, "xla"),
    # "pallas" runs every small-batch kernel (interpreted off the GPU); "xla" none
    ("pallas", "cpu", "dense", 1, (4096, 14336), 16, "matvec"),
    ("pallas", "cpu", "by_row", 2, (4096, 14336), 16, "rowmatvec"),
    ("pallas", "cpu", "quantized", 3, (64, 64), 8, "qmatvec"),
    ("xla", "gpu", "by_row", 1, (2048, 3072), 16, "xla"),
    ("xla", "gpu", "quantized", 1, (2048, 3072), 4, "xla"),
])
def test_plans(mode, platform, kind, rows, shape, bits, kernel):
    plan = KernelPolicy.for_backend(mode, platform=platform).plan(kind, rows, shape, bits)
    assert plan.kernel == kernel


def kernel_calls(params, config, batch=1):
    """The Pallas kernels of one decode step's program, traced (not compiled) under the
    config's policy: the GPU's choices can be read on the CPU."""
    cache = jax.eval_shape(lambda: jaxllm.init_cache(config, batch, 64, jnp.bfloat16))
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32)
    text = str(jax.make_jaxpr(lambda p, t, kv: jaxllm.decode_step(p, config, t, kv))(params, tokens, cache))
    return re.findall(r"name=(\w+_pallas)\b", text)


def gpu_model(config, weights="bf16"):
    """Shapes only: the params the loader would lay out for the GPU's policy."""
    policy = KernelPolicy.for_backend("auto", platform="gpu")
    config = config.replace(kernels=policy)

    def build():
        params = jaxllm.init_params(config, jax.random.PRNGKey(0), jnp.bfloat16)
        if weights != "bf16":
            params = jaxllm.quantize(params, weights, group_size=32)
        return for_policy(params, policy)
    return jax.eval_shape(build), config


def test_the_gpu_policy_decodes_small_models_in_five_kernels_a_layer():
    """SmolLM2-135M's shape on the GPU's policy: q/k/v with the norm, attention, o with
    the residual, gate-up with the norm and gate, down with the residual; the tied head
    with the final norm."""
    params, c = gpu_model(jaxllm.PRESETS["smol135m"].replace(n_layers=2))
    calls = kernel_calls(params, c)
    assert calls.count("rowmatvec_pallas") == 4 * c.n_layers + 1
    assert calls.count("decode_attention_pallas") == c.n_layers
    assert len(calls) == 5 * c.n_layers + 1


def test_the_gpu_policy_leaves_llama8b_projections_to_xla_and_quantized_ones_to_kernels():
    """llama8b's dense projections (>= 4096 on both sides) stay on XLA's dots, with only
    decode attention as a kernel; int8 weights take the quantized kernel for each of
    the 4 projections and the head (their partial sums, too many for add_norm's one
    program, are added by XLA)."""
    shape = jaxllm.PRESETS["llama8b"].replace(n_layers=1)
    params, c = gpu_model(shape)
    assert kernel_calls(params, c) == ["decode_attention_pallas"]
    params, c = gpu_model(shape, "int8")
    calls = kernel_calls(params, c)
    assert calls == ["qmatvec_pallas", "decode_attention_pallas"] + ["qmatvec_pallas"] * 4
