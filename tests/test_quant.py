"""Quantized weights: storage forms against float64 NumPy, GGUF blocks repacked
without loss against the gguf package, the XLA path, the Pallas kernel (in
interpret mode) and the native CPU kernel, and quantized models against their
dense twins."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ARCH_CONFIGS, tiny
from gguf import GGMLQuantizationType, quants
from test_dequant import random_blocks

import jaxllm
from jaxllm import quant, weights
from jaxllm.calibration import input_importance, read_calibration_text, text_windows
from jaxllm.decoding import decode
from jaxllm.generate import start
from jaxllm.kernels import cpu_qmatvec
from jaxllm.kernels.qmatvec import KERNEL_BITS, qmatmul_pallas, qmatvec_pallas
from jaxllm.loading.dequant import FORMATS, blocks
from jaxllm.model import extend_hidden, unembed
from jaxllm.ops import linear
from jaxllm.policy import KernelPolicy
from jaxllm.weights import linear_reference, take_rows

FORMS = list(itertools.product((8, 6, 5, 4), (False, True), (16, 32)))  # bits, has mins, group


def random_host_blocks(rng, bits, mins, G, N=64, K=128, float16=False):
    """float16=True: scales and minimums that float16 holds exactly, so that `pack`
    stores them as float16 (paired where there are minimums)."""
    half = 1 << (bits - 1)
    lo, hi = (0, 2 * half - 1) if mins and bits < 8 else (-half, half - 1)
    dtype = np.float16 if float16 else np.float32
    return quant.HostBlocks(rng.integers(lo, hi + 1, (N, K)).astype(np.int8),
                            rng.uniform(0.001, 0.05, (N, K // G)).astype(dtype).astype(np.float32),
                            rng.normal(0, 0.05, (N, K // G)).astype(dtype).astype(np.float32) if mins else None,
                            bits)


def on_int8_grid(rng, M, K, G) -> np.ndarray:
    """x [M, K] float32 whose every group of G is an int8 level times the group's
    absmax / 127, so that the quantized kernels' rounding of activations to int8
    (kernels/qmatvec.py) is exact and the float64 reference needs no emulation of it."""
    levels = rng.integers(-127, 128, (M, K // G, G))
    levels[:, :, 0] = rng.choice([-127, 127], (M, K // G))
    return (levels * rng.uniform(0.005, 0.05, (M, K // G, 1))).reshape(M, K).astype(np.float32)


def dense64(b: quant.HostBlocks) -> np.ndarray:
    """W [K, N] in float64, straight from the definition."""
    N, K = b.q.shape
    G = K // b.scales.shape[1]
    w = np.repeat(b.scales.astype(np.float64), G, 1) * b.q
    if b.mins is not None:
        w = w + np.repeat(b.mins.astype(np.float64), G, 1)
    return w.T


@pytest.mark.parametrize("bits,mins,G", FORMS)
def test_pack_dequantize_and_linear_match_float64(bits, mins, G):
    rng = np.random.default_rng()
    float16 = G == 32  # float16 scales (paired with float16 minimums) and float32 ones
    b = random_host_blocks(rng, bits, mins, G, float16=float16)
    w = quant.pack(b)
    assert w.shape == (128, 64) and w.bits == bits and w.group_size == G
    assert w.has_mins == mins and w.paired == (mins and float16)
    # stored in `bits` bits per weight plus the scales (and minimums)
    assert w.nbytes == 128 * 64 * bits // 8 + (1 + mins) * (128 // G) * 64 * (2 if float16 else 4)
    np.testing.assert_allclose(np.asarray(quant.dequantize(w), np.float64), dense64(b), rtol=1e-6, atol=1e-7)
    for M in (1, 3, 6, 16, 17):
        x = on_int8_grid(rng, M, 128, G)
        ref = x.astype(np.float64) @ dense64(b)
        scale = np.abs(ref).max()
        np.testing.assert_allclose(np.asarray(linear_reference(jnp.asarray(x), w)), ref, atol=1e-5 * scale)
        if bits in KERNEL_BITS and M <= 4:  # integer dot products, and the float path
            for int8_activations in (True, False) if M == 1 else (True,):
                got = qmatvec_pallas(jnp.asarray(x), w, interpret=True, int8_activations=int8_activations)
                np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5 * scale)
        elif bits in KERNEL_BITS:
            got = qmatmul_pallas(jnp.asarray(x), w, interpret=True)
            np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5 * scale)
        if M <= cpu_qmatvec.MAX_ROWS:
            assert cpu_qmatvec.available(), "the native CPU kernel did not build"
            got = jax.jit(cpu_qmatvec.qmatvec_cpu)(jnp.asarray(x), w)
            np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5 * scale)
        # the switch: a kernel where one fits (4 or 8 bits), else XLA
        np.testing.assert_allclose(np.asarray(linear(jnp.asarray(x), w, KernelPolicy.for_backend("pallas"))), ref,
                                   atol=1e-5 * scale)
    ids = jnp.asarray(rng.integers(0, 64, (2, 7)))
    np.testing.assert_allclose(np.asarray(take_rows(w, ids)), dense64(b).T[np.asarray(ids)],
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits, mins", [(8, False), (4, True)])
def test_matmul_kernel_tiles_rows_and_splits_k(bits, mins):
    """Batches past one tile of rows (40 rows in blocks of 16, the last padded), with K
    split across programs (float32 partial sums added after) and unsplit (each program
    writes bfloat16 outputs itself), against float64."""
    rng = np.random.default_rng(7)
    b = random_host_blocks(rng, bits, mins, 32, N=128, K=256, float16=True)
    w = quant.pack(b, jnp.bfloat16)
    x = rng.standard_normal((40, 256)).astype(np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    ref = np.asarray(xb, np.float64) @ dense64(b)
    for programs in (1, 1024):  # unsplit; split into K's 4 blocks of 64
        got = qmatmul_pallas(xb, w, block_m=16, block_n=32, block_k=64, target_programs=programs, interpret=True)
        assert got.shape == (40, 128) and got.dtype == jnp.bfloat16
        err = np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref)
        assert err < 1e-2, (programs, err)  # the weight tile rounded to bfloat16, and the output


@pytest.mark.parametrize("bits, mins", [(8, False), (4, False), (4, True)])
def test_kernel_rounds_activations_to_int8_per_group(bits, mins):
    """Off the int8 grid: each group of x is rounded to int8 at absmax / 127 (half up).
    Against that rounding emulated in float64, and within the rounding's size of the
    exact product."""
    rng = np.random.default_rng()
    G, K, M = 32, 256, 2
    b = random_host_blocks(rng, bits, mins, G, K=K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x3 = x.astype(np.float64).reshape(M, K // G, G)
    step = np.abs(x3).max(-1, keepdims=True) / 127
    rounded = (np.floor(x3 / step + 0.5) * step).reshape(M, K)
    emulated = rounded @ dense64(b)
    exact = x.astype(np.float64) @ dense64(b)
    got = np.asarray(qmatvec_pallas(jnp.asarray(x), quant.pack(b), jnp.float32, interpret=True,
                                    block_k=64, target_programs=8, int8_activations=True), np.float64)
    rounding = np.linalg.norm(emulated - exact)
    assert 0 < rounding < 2e-2 * np.linalg.norm(exact)
    # float32 may round a level the other way where float64 lands within 1e-7 of a half
    assert np.linalg.norm(got - emulated) < 0.05 * rounding


def test_linear_switch_selects_kernel_or_reference():
    rng = np.random.default_rng()
    w = quant.pack(random_host_blocks(rng, 4, True, 32))
    x = jnp.asarray(rng.standard_normal((2, 3, 128)), jnp.float32)
    fast, ref = linear(x, w, KernelPolicy.for_backend("pallas")), linear(x, w, KernelPolicy.for_backend("xla"))
    assert fast.shape == ref.shape == (2, 3, 64)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("type_name", sorted(FORMATS))
def test_gguf_blocks_repack_without_loss(type_name):
    """Every GGML block format kept quantized on the device dequantizes to exactly
    what the gguf package's reference gives (float16 rounding of K-quant scales is
    avoided by keeping them in float32)."""
    rng = np.random.default_rng()
    raw = random_blocks(type_name, 96, rng).reshape(8, -1)
    ref = quants.dequantize(raw, GGMLQuantizationType[type_name]).astype(np.float32)
    w = quant.pack(blocks(raw, type_name))
    assert w.bits == FORMATS[type_name][3]
    np.testing.assert_allclose(np.asarray(quant.dequantize(w)).T, ref, rtol=1e-6, atol=1e-7)


def test_fusing_mixed_formats_promotes_without_loss():
    """Gemma's fused q/k/v mixes Q5_0 and Q8_0; llama.cpp's K-quant files mix 4- and
    6-bit parts with groups of 32 and 16."""
    rng = np.random.default_rng()
    n_blocks = {"Q4_0": 32, "Q4_1": 32, "Q4_K": 4, "Q6_K": 4}  # two rows of 512 inputs each
    parts = [blocks(random_blocks(t, n_blocks[t], rng).reshape(2, -1), t)
             for t in ("Q4_0", "Q4_K", "Q6_K", "Q4_1")]
    fused = quant.concat_rows(parts)
    assert fused.bits == 6 and fused.q.shape[1] // fused.scales.shape[1] == 16
    want = np.concatenate([p.dequantize() for p in parts])
    np.testing.assert_allclose(np.asarray(quant.dequantize(quant.pack(fused))).T, want, rtol=1e-6, atol=1e-7)
    four = quant.concat_rows([parts[0], parts[3]])  # symmetric and asymmetric 4-bit
    assert four.bits == 4 and four.mins is not None
    np.testing.assert_allclose(np.asarray(quant.dequantize(quant.pack(four))).T,
                               np.concatenate([parts[0].dequantize(), parts[3].dequantize()]),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode,levels", [("int8", 254), ("int4", 15)])
def test_quantize_weight_error_is_within_half_a_step(mode, levels):
    rng = np.random.default_rng()
    w = rng.standard_normal((256, 96)).astype(np.float32) * 0.05
    qw = quant.quantize_weight(jnp.asarray(w), mode, group_size=32)
    err = np.abs(np.asarray(quant.dequantize(qw)) - w).reshape(8, 32, 96)
    span = np.ptp(w.reshape(8, 32, 96), axis=1) if mode == "int4" else 2 * np.abs(w.reshape(8, 32, 96)).max(1)
    step = span / levels
    # Half a step from rounding, plus float16 rounding of the stored scale over up to
    # 127 steps; a clipped int4 range may lose up to 30% of the group's span at the ends.
    bound = step * 0.5 * 1.02 + (0.3 * span if mode == "int4" else 0)
    assert (err.max(1) <= bound).all()
    assert np.sqrt((err ** 2).mean()) < (0.01 if mode == "int4" else 0.0005) * 0.05 * 20


def test_fp8_weight_and_product_match_float64():
    """fp8: each output column's largest weight maps to e4m3's 448 exactly, every weight
    rounds to within e4m3's half step (2^-4 relative; 2^-10 of the scale below the
    normal range); the product equals float64 on activations rounded to e4m3 per row
    (ml_dtypes' rounding, not jax's) and is within a few percent of the exact one."""
    import ml_dtypes
    rng = np.random.default_rng()
    w = (rng.standard_normal((96, 40)) * rng.uniform(0.01, 1.0, (1, 40))).astype(np.float32)
    fw = quant.quantize_weight(jnp.asarray(w), "fp8")
    assert isinstance(fw, jaxllm.Fp8Weight) and fw.shape == (96, 40) and fw.t.shape == (40, 96)
    assert fw.nbytes == 96 * 40 + 40 * 4
    scales = np.asarray(fw.scales, np.float64)
    np.testing.assert_allclose(scales, np.abs(w).max(0) / 448, rtol=1e-6)
    t64 = np.asarray(fw.t.astype(jnp.float32), np.float64)
    dense = (t64 * scales[:, None]).T
    assert np.all(np.abs(dense - w) <= np.maximum(np.abs(w) * 2.0 ** -4, scales * 2.0 ** -10) * 1.0001)
    np.testing.assert_array_equal(np.abs(t64).max(1), 448)
    np.testing.assert_allclose(np.asarray(weights.fp8_dense(fw, jnp.float32)), dense, rtol=1e-6)
    for M in (1, 5):
        x = rng.standard_normal((M, 96)).astype(np.float32)
        x_scale = np.abs(x).max(1, keepdims=True) / 448
        xq = (x / x_scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * x_scale
        got = np.asarray(linear(jnp.asarray(x), fw, KernelPolicy.for_backend("auto")), np.float64)
        np.testing.assert_allclose(got, xq @ dense, rtol=1e-5, atol=1e-5 * np.abs(xq @ dense).max())
        exact = x.astype(np.float64) @ w
        # e4m3 keeps 3 mantissa bits: each operand's rounding is ~2.5% rms relative, the
        # product's ~3.6%; one row of 40 outputs spreads around that (0.05 failed at 5.8%
        # once in CI's random draws). The exact check is the one against xq @ dense above.
        assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.1
    ids = jnp.asarray([[3, 0], [39, 7]])
    np.testing.assert_allclose(np.asarray(weights.fp8_take_rows(fw, ids).astype(jnp.float32)),
                               dense.T[np.asarray(ids)], rtol=1e-6)


def test_fp8_model_runs_near_its_dense_twin():
    """fp8 projections (and an fp8 embedding table that is also the tied head): the
    dequantized twin differs only by the activations' rounding to e4m3 (3 mantissa
    bits: ~3% per projection's input), so forward's logits stay within 15% of it (7% is
    typical on this model); greedy decoding follows forward's argmax."""
    config = tiny(vocab_size=96, d_model=64, d_ff=96, head_dim=16)
    params = jaxllm.init_params(config, jax.random.PRNGKey(11))
    fparams = jaxllm.quantize(params, "fp8", embeddings="fp8")
    assert isinstance(fparams.embed, jaxllm.Fp8Weight) and isinstance(fparams.layers[0].wqkv, jaxllm.Fp8Weight)
    dense = jaxllm.dequantize_params(fparams)
    assert dense.embed.shape == params.embed.shape
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, config.vocab_size)
    got = np.asarray(jaxllm.forward(fparams, config, tokens), np.float64)
    want = np.asarray(jaxllm.forward(dense, config, tokens), np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.15
    out = jaxllm.generate(fparams, config, [[3, 4, 5, 6]], max_new_tokens=4,
                          settings=jaxllm.SamplerSettings.greedy(), stop_tokens=[]).tokens[0]
    full = np.asarray(jaxllm.forward(fparams, config, jnp.asarray([[3, 4, 5, 6] + out[:-1]])))
    assert out == [int(t) for t in np.argmax(full[0, 3:], -1)]
    # At decode (<= 4 rows) the kernels read the e4m3 rows and leave activations as they
    # are: the same computation as the dequantized twin's, so equal to float32 rounding.
    kernels, cache_of = config.replace(kernels="pallas"), lambda: jaxllm.init_cache(config, 2, 8, jnp.float32)
    fast, twin = cache_of(), cache_of()
    for step in range(3):
        ids = jnp.asarray([3 + step, 40 - step])
        got, fast = jaxllm.decode_step(fparams, kernels, ids, fast)
        want, twin = jaxllm.decode_step(dense, config, ids, twin)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_quantized_model_matches_its_dequantized_twin():
    """forward, prefill and decode with quantized weights (including the
    embedding lookup and the tied output head) equal the same computation on the
    dequantized weights."""
    config = tiny(vocab_size=96, d_model=64, d_ff=96, head_dim=16)
    params = jaxllm.init_params(config, jax.random.PRNGKey(np.random.randint(1 << 30)))
    for mode in ("int8", "int4"):
        qparams = jaxllm.quantize(params, mode, group_size=16)
        assert isinstance(qparams.embed, jaxllm.QuantizedWeight)
        assert isinstance(qparams.layers[0].w_in, jaxllm.QuantizedWeight)
        dense = jaxllm.dequantize_params(qparams)
        assert dense.embed.shape == params.embed.shape
        tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, config.vocab_size)
        got = jaxllm.forward(qparams, config, tokens)
        want = jaxllm.forward(dense, config, tokens)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
        out_q = jaxllm.generate(qparams, config, [[3, 4, 5], [7]], max_new_tokens=6,
                                settings=jaxllm.SamplerSettings.greedy(), stop_tokens=[])
        out_d = jaxllm.generate(dense, config, [[3, 4, 5], [7]], max_new_tokens=6,
                                settings=jaxllm.SamplerSettings.greedy(), stop_tokens=[])
        assert out_q.tokens == out_d.tokens


@pytest.mark.parametrize("bits", [4, 8])
def test_native_cpu_kernel_wide_inputs_and_both_code_paths(bits):
    """K spanning several 512-input chunks, groups of 32 (the vectorised path) and 64,
    float16 and float32 scales, symmetric and with minimums, 1-4 rows."""
    rng = np.random.default_rng()
    for G, mins, half in ((32, False, True), (64, True, False), (32, True, True)):
        b = random_host_blocks(rng, bits, mins, G, N=96, K=1344, float16=half)
        w = quant.pack(b)
        assert (w.scales.dtype in (jnp.float16, jnp.uint32)) == half
        for M in (1, 2, 4):
            x = rng.standard_normal((M, 1344)).astype(np.float32)
            ref = x.astype(np.float64) @ dense64(b)
            got = jax.jit(cpu_qmatvec.qmatvec_cpu)(jnp.asarray(x), w)
            np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5 * np.abs(ref).max())


def test_decode_loop_keeps_weights_quantized_on_the_cpu():
    """XLA:CPU hoists a dequantization out of the decode loop, holding the whole model
    in float32 while it decodes; through the native kernel the loop's scratch memory
    stays a small fraction of the dense weights."""
    config = tiny(vocab_size=512, d_model=256, d_ff=512, head_dim=32, n_layers=2)
    params = jaxllm.quantize(jaxllm.init_params(config, jax.random.PRNGKey(0)), "int4", group_size=32)
    dense_bytes = sum(w.shape[0] * w.shape[1] * 4 for w in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, jaxllm.QuantizedWeight)) if isinstance(w, jaxllm.QuantizedWeight))
    settings = jaxllm.SamplerSettings.greedy()
    run = start(params, config, [[1, 2, 3]], max_new_tokens=8, settings=settings, stop_tokens=[])
    compiled = decode.lower(params, config, settings, run.state, run.tokens, run.column, run.stop_ids,
                            jnp.int32(8)).compile()
    assert "jaxllm_qmatvec_cpu" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < 0.1 * dense_bytes


def test_quantize_rejects_bad_arguments():
    params = jaxllm.init_params(tiny(), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="unknown quantization mode"):
        jaxllm.quantize(params, "int3")
    with pytest.raises(ValueError, match="does not divide"):
        jaxllm.quantize(params, "int8", group_size=7)


def token_nll(params, config, texts, cache: bool = False, chunk: int = 2) -> float:
    """Mean per-text NLL. The texts run `chunk` at a time, padded at the end to one
    width (one compile), and only each position's log-probability of its next token
    leaves the device: Gemma's 262k-entry logits for ten 256-token windows at once took
    ~11 GB, which with the other test worker ran the 24 GB CI machine out of memory.
    cache=True: a prefill into a KV cache, so that attention reads what the cache holds
    (its dtype)."""
    width = max(map(len, texts))

    @jax.jit
    def target_logprobs(params, ids, n):
        if cache:
            x, _ = extend_hidden(params, config, ids, n, jaxllm.init_cache(config, chunk, width, jnp.float32))
            logits = unembed(params, config, x[:, :-1])
        else:
            logits = jaxllm.forward(params, config, ids)[:, :-1]
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return jnp.take_along_axis(lp, ids[:, 1:, None], 2)[..., 0]
    per_text = []
    for i in range(0, len(texts), chunk):
        part = texts[i:i + chunk]
        part = part + [part[-1]] * (chunk - len(part))  # a short last chunk repeats a text
        ids = jnp.asarray([list(t) + [0] * (width - len(t)) for t in part])
        lp = np.asarray(target_logprobs(params, ids, jnp.asarray([len(t) for t in part], jnp.int32)), np.float64)
        per_text += [-lp[j, :len(t) - 1].mean() for j, t in enumerate(part)][:len(texts) - i]
    return float(np.mean(per_text))


def nll(model, params, texts):
    return token_nll(params, model.config, texts)


@pytest.mark.slow
def test_smollm2_quantized_on_device_matches_dequantized(reference_texts):
    """Issue 7: the file's Q4_1/Q8_0 tensors kept quantized on the device cost < 1%
    NLL against the dequantized path, take within 5% of the file's bytes; int8
    quantization of the dense weights costs < 2%."""
    texts = reference_texts("smollm2-135m-instruct-q4_1")
    on_device = jaxllm.load("smollm2-135m-instruct", weights="file")
    dense = jaxllm.load("smollm2-135m-instruct", weights="dense")
    assert abs(quant.weight_bytes(on_device.params) / on_device.file_bytes - 1) < 0.05
    base = nll(dense, dense.params, texts)
    assert abs(nll(on_device, on_device.params, texts) / base - 1) < 0.01
    assert nll(dense, jaxllm.quantize(dense.params, "int8"), texts) / base - 1 < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_fp8_weights_and_fp8_cache_cost_under_one_percent(name):
    """Issue 28: fp8 weights (e4m3 activations per row) and, apart, the float8 KV cache
    each cost < 1% NLL over the bundled ~2,400-token text (the reference texts' 40 tokens
    are too few to resolve 1%). Measured 2026-11-30 (2-core CPU): weights +0.80% on
    SmolLM2 135M, +0.70% on Gemma 3 270M; cache +0.13% / +0.17%. Neither is calibrated,
    so that text is as foreign to them as any. Every pass prefills a cache, the same
    computation as forward's but with attention reading the cache."""
    dense = jaxllm.load(name, weights="dense")
    windows = text_windows(dense.tokenizer, read_calibration_text("builtin"))
    base = token_nll(dense.params, dense.config, windows, cache=True)
    weights = token_nll(jaxllm.quantize(dense.params, "fp8"), dense.config, windows, cache=True)
    cache = token_nll(dense.params, dense.config.replace(kv_cache="fp8"), windows, cache=True)
    assert 0 < weights / base - 1 < 0.01
    assert 0 < cache / base - 1 < 0.01


@pytest.mark.slow
def test_gemma_file_weights_and_int4_quantization_cost(reference_texts):
    """Gemma 3 270M's Q5_0/Q4_K/Q6_K/Q8_0 tensors on the device (5- and 6-bit planes)
    take within 5% of the file's bytes and cost < 1% NLL against the dequantized
    path. Issue 7: int8 / int4 (groups of 32) of the dense weights cost < 2% / < 6%
    on these texts. int4 is calibrated on the bundled text, which shares nothing
    with them: +2.7% (2026-11-29) where uncalibrated int4 costs +8.2%."""
    texts = reference_texts("gemma-3-270m-q4_k_m")
    on_device = jaxllm.load("gemma-3-270m", weights="file")
    assert {w.bits for w in jax.tree.leaves(on_device.params, is_leaf=lambda x: isinstance(
        x, jaxllm.QuantizedWeight)) if isinstance(w, jaxllm.QuantizedWeight)} == {4, 5, 6, 8}
    assert abs(quant.weight_bytes(on_device.params) / on_device.file_bytes - 1) < 0.05
    dense = jaxllm.load("gemma-3-270m", weights="dense")
    base = nll(dense, dense.params, texts)
    assert abs(nll(on_device, on_device.params, texts) / base - 1) < 0.01
    assert nll(dense, jaxllm.quantize(dense.params, "int8"), texts) / base - 1 < 0.02
    # what load(..., weights="int4") does, without reading the file a third time
    windows = text_windows(dense.tokenizer, read_calibration_text("builtin"))
    importance = input_importance(dense.params, dense.config, windows)
    int4 = jaxllm.quantize(dense.params, "int4", importance=importance)
    assert nll(dense, int4, texts) / base - 1 < 0.06


def test_transposed_projections_quantize_and_merge_like_the_usual_layout():
    """jaxllm.layout: weights stored by output row quantize to the same weights, take
    LoRA merges, and are left alone off the GPU and above the size limit."""
    from jaxllm import train
    from jaxllm.layout import TransposedWeight, dense, for_policy, transpose_projections

    c = ARCH_CONFIGS["llama3"]
    params = jaxllm.init_params(c, jax.random.PRNGKey(np.random.randint(1 << 30)))
    rows = transpose_projections(params)
    w = params.layers[0].wqkv
    assert rows.layers[0].wqkv.shape == w.shape
    np.testing.assert_array_equal(dense(rows.layers[0].wqkv), w)
    for a, b in zip(jax.tree.leaves(jaxllm.quantize(rows, "int4", group_size=16)),
                    jax.tree.leaves(jaxllm.quantize(params, "int4", group_size=16))):
        np.testing.assert_array_equal(a, b)
    lora = train.init_lora(params, 2, jax.random.PRNGKey(1))
    lora = jax.tree.map(lambda a: a + 0.1, lora)
    merged_rows, merged = train.merge_lora(rows, lora, 0.5), train.merge_lora(params, lora, 0.5)
    assert isinstance(merged_rows.layers[1].wo, TransposedWeight)  # the layout is kept
    for a, b in zip(merged_rows.layers, merged.layers):
        for name in train.LORA_TARGETS:
            np.testing.assert_allclose(dense(getattr(a, name)), getattr(b, name), rtol=1e-6)
    small = transpose_projections(params, max_small_side=min(w.shape) - 1)
    assert not any(isinstance(x, TransposedWeight) for x in jax.tree.leaves(
        small, is_leaf=lambda x: isinstance(x, TransposedWeight)))
    is_row = lambda x: isinstance(x, TransposedWeight)
    for policy in (KernelPolicy.for_backend("auto", platform="cpu"), KernelPolicy.for_backend("pallas"),
                   KernelPolicy.for_backend("auto", platform="gpu", rowmatvec_max_small_side=min(w.shape) - 1)):
        assert not any(map(is_row, jax.tree.leaves(for_policy(params, policy), is_leaf=is_row)))
    # On the GPU: the layer projections the row-major kernel reads; an untied head stays.
    untied = jaxllm.init_params(c.replace(tie_embeddings=False), jax.random.PRNGKey(0))
    on_gpu = for_policy(untied, KernelPolicy.for_backend("auto", platform="gpu"))
    assert all(isinstance(getattr(layer, name), TransposedWeight)
               for layer in on_gpu.layers for name in ("wqkv", "wo", "w_in", "w_out"))
    assert not isinstance(on_gpu.lm_head, TransposedWeight)


def test_layers_quantized_as_they_are_made_equal_the_model_quantized_after():
    """init_params(each_layer=quantize_layer) (bench.py's way to a model whose dense
    weights would not fit) gives quantize(init_params(...))'s weights."""
    c = tiny(vocab_size=64, d_model=64, d_ff=128, head_dim=16, n_heads=4, n_kv_heads=2)
    after = jaxllm.quantize(jaxllm.init_params(c, jax.random.PRNGKey(2)), "int8")
    made = jaxllm.quantize(jaxllm.init_params(c, jax.random.PRNGKey(2),
                                              each_layer=lambda layer: jaxllm.quantize_layer(layer, "int8")), "int8")
    assert isinstance(made.layers[0].wqkv, jaxllm.QuantizedWeight)
    for a, b in zip(jax.tree.leaves(made), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
