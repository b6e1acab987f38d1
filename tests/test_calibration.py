"""Calibration statistics (calibration.py) and the int4 quantization they weigh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ARCH_CONFIGS, tiny
from reference_numpy import forward_one, to64

import jaxllm
from jaxllm import quant
from jaxllm.calibration import input_importance, read_calibration_text, text_windows
from jaxllm.errors import JaxllmError


@pytest.mark.parametrize("arch", ["llama3", "gemma"])
def test_input_importance_matches_float64_reference(arch):
    """Mean squares of every projection's inputs over windows of several sequences,
    the last window of each shorter than the rest (padded inside), against the
    float64 decoder run on each window alone."""
    config = ARCH_CONFIGS[arch]
    params = jaxllm.init_params(config, jax.random.PRNGKey(np.random.randint(1 << 30)))
    rng = np.random.default_rng()
    sequences = [list(rng.integers(0, config.vocab_size, n)) for n in (13, 5)]
    window = 6
    got = input_importance(params, config, sequences, window=window)

    p64 = to64(params)
    sums = [{name: 0.0 for name in quant.PROJECTIONS} for _ in range(config.n_layers)]

    def tap(layer, name, x):
        sums[layer][name] = sums[layer][name] + (x ** 2).sum(0)
    pieces = [ids[i:i + window] for ids in sequences for i in range(0, len(ids), window)]
    for ids in pieces:
        forward_one(p64, config, np.asarray(ids), tap)
    count = sum(map(len, pieces))
    assert len(got) == config.n_layers
    for layer_got, layer_sums in zip(got, sums):
        for name in quant.PROJECTIONS:
            np.testing.assert_allclose(np.asarray(layer_got[name]), layer_sums[name] / count,
                                       rtol=2e-4, atol=1e-7)


def test_importance_weighs_the_int4_error():
    """With a few inputs much larger than the rest, weighing by their mean squares
    lowers the error a projection's output sees (sum over inputs of importance x
    squared weight error); uniform importance quantizes exactly as none does."""
    rng = np.random.default_rng()
    K, N = 256, 64
    w = jnp.asarray(rng.standard_normal((K, N)).astype(np.float32) * 0.05)
    importance = rng.lognormal(0.0, 2.0, K).astype(np.float32)

    def output_error(qw):
        err = np.asarray(quant.dequantize(qw), np.float64) - np.asarray(w, np.float64)
        return float((importance[:, None] * err ** 2).sum())
    plain = quant.quantize_weight(w, "int4", 32)
    weighted = quant.quantize_weight(w, "int4", 32, jnp.asarray(importance))
    assert output_error(weighted) < 0.8 * output_error(plain)
    uniform = quant.quantize_weight(w, "int4", 32, jnp.full((K,), 3.0))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(uniform)), np.asarray(quant.dequantize(plain)))


def test_quantize_gives_each_projection_its_own_importance():
    config = tiny(vocab_size=96, d_model=64, d_ff=96, head_dim=16)
    params = jaxllm.init_params(config, jax.random.PRNGKey(np.random.randint(1 << 30)))
    tokens = np.random.default_rng().integers(0, 96, (3, 20))
    importance = input_importance(params, config, tokens.tolist(), window=8)
    qparams = jaxllm.quantize(params, "int4", group_size=16, importance=importance)
    dense = lambda w: np.asarray(quant.dequantize(w))
    for i, layer in enumerate(params.layers):
        for name in quant.PROJECTIONS:
            w = getattr(layer, name)
            want = quant.quantize_weight(w, "int4", 16, importance[i][name])
            np.testing.assert_array_equal(dense(getattr(qparams.layers[i], name)), dense(want))


def test_calibration_rejects_bad_input():
    config = tiny(d_model=64, head_dim=16, d_ff=96)
    params = jaxllm.init_params(config, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="at least one token"):
        input_importance(params, config, [[], []])
    with pytest.raises(ValueError, match="already quantized"):
        input_importance(jaxllm.quantize(params, "int8", 16), config, [[1, 2, 3]])
    importance = input_importance(params, config, [[1, 2, 3]])
    with pytest.raises(ValueError, match="layers"):
        jaxllm.quantize(params, "int4", 16, importance=importance[:1])
    with pytest.raises(ValueError, match="inputs"):
        quant.quantize_weight(params.layers[0].wo, "int4", 16, jnp.ones(7))
    with pytest.raises(JaxllmError, match="no-such"):
        read_calibration_text("/tmp/no-such-calibration.txt")


def test_builtin_text_windows_begin_as_the_model_expects():
    class Bytes:  # a byte-level tokenizer with BOS 1
        bos_id, add_bos = 1, True

        def encode(self, text, add_bos=None, parse_special=True):
            return list(text.encode())
    text = read_calibration_text("builtin")
    windows = text_windows(Bytes(), text, window=256)
    assert all(w[0] == 1 and len(w) <= 256 for w in windows)
    assert sum(len(w) - 1 for w in windows) == len(text.encode())
