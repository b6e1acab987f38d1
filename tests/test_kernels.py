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


def prefill_and_steps(params, config, tokens, cache=None, prompt=3):
    """Logits of a `prompt`-token prefill (row 1's one shorter) and decode steps over the
    rest of tokens [2, T], and the cache after them (by default a 16-slot cache)."""
    cache = jaxllm.init_cache(config, 2, 16, jnp.float32) if cache is None else cache
    logits, cache = jaxllm.extend(params, config, tokens[:, :prompt], jnp.array([prompt, prompt - 1]), cache)
    steps = [logits]
    for t in range(prompt, tokens.shape[1]):
        logits, cache = jaxllm.decode_step(params, config, tokens[:, t], cache)
        steps.append(logits)
    return steps, cache


def assert_same_run(got, ref):
    (got, got_cache), (ref, ref_cache) = got, ref
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    for g, r in zip(jax.tree.leaves(got_cache), jax.tree.leaves(ref_cache)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_model_with_pallas_kernels_matches_xla_path(arch):
    """Prefill, then decode steps (matvec and decode-attention kernels) against the XLA path."""
    c = ARCH_CONFIGS[arch].replace(tie_embeddings=False)
    params = jaxllm.init_params(c, jax.random.PRNGKey(np.random.randint(1 << 30)))
    tokens = jnp.asarray(np.random.randint(0, c.vocab_size, (2, 9)))  # 2 rows: the kernel path
    # float32 dots in full precision: on a GPU XLA's default is TF32, 1e-3 apart
    with jax.default_matmul_precision("highest"):
        ref = prefill_and_steps(params, c.replace(kernels="xla"), tokens)
        got = prefill_and_steps(params, c.replace(kernels="pallas"), tokens)
    assert_same_run(got, ref)


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "gemma"])
def test_deferred_norms_match_the_xla_path(arch):
    """Every RMSNorm without bias left to the projection after it (ops.DeferredNorm,
    which the library uses on the GPU before XLA's matrix multiplies, and before decode
    attention everywhere: the policy's deferred_norm="always"), the factor applied
    after the projection (by the decode-attention kernel for q/k/v, in float32 before
    the activation for the MLP): the same logits and cache as the XLA path. qwen2's
    q/k/v bias keeps the factor in linear(); gemma has a norm weight offset."""
    c = ARCH_CONFIGS[arch]
    params = jaxllm.init_params(c, jax.random.PRNGKey(np.random.randint(1 << 30)))
    tokens = jnp.asarray(np.random.randint(0, c.vocab_size, (2, 9)))
    with jax.default_matmul_precision("highest"):
        ref = prefill_and_steps(params, c.replace(kernels="xla"), tokens)
        got = prefill_and_steps(params, c.replace(
            kernels=jaxllm.KernelPolicy.for_backend("pallas", deferred_norm="always")), tokens)
    assert_same_run(got, ref)


# --- decode attention ---------------------------------------------------------------

def numpy_decode_attention(qkv, k_cache, v_cache, lengths, freq, q_norm, k_norm, spec, sinks=None):
    """float64: the new token's queries/keys normed and rotated, written at slot
    min(length, S - 1), attending to the visible filled slots (sinks [H]: one more
    logit per head in the softmax's sum)."""
    from types import SimpleNamespace

    from reference_numpy import norm, rope

    B, S, K, Dh = k_cache.shape
    H, G = spec.n_heads, spec.n_heads // spec.n_kv_heads
    qkv = qkv.astype(np.float64).reshape(B, H + 2 * K, Dh)
    k_cache, v_cache = k_cache.astype(np.float64), v_cache.astype(np.float64)
    c = SimpleNamespace(norm="rms", norm_eps=spec.norm_eps, norm_weight_offset=spec.norm_offset)
    out = np.zeros((B, H, Dh))
    for b in range(B):
        pos, slot = int(lengths[b]), min(int(lengths[b]), S - 1)
        q, k, v = qkv[b, :H], qkv[b, H:H + K], qkv[b, H + K:]
        if spec.qk_norm:
            q = norm(q, SimpleNamespace(scale=q_norm, bias=None), c)
            k = norm(k, SimpleNamespace(scale=k_norm, bias=None), c)
        if spec.rope:
            q, k = rope(q[None], [pos], freq)[0], rope(k[None], [pos], freq)[0]
        k_cache[b, slot], v_cache[b, slot] = k, v
        visible = [s for s in range(S) if s <= pos and (spec.window is None or s > pos - spec.window)]
        for h in range(H):
            s = k_cache[b, visible, h // G] @ q[h] * spec.scale
            if spec.softcap is not None:
                s = spec.softcap * np.tanh(s / spec.softcap)
            top = s.max() if sinks is None else max(s.max(), sinks[h])
            p = np.exp(s - top)
            total = p.sum() + (0.0 if sinks is None else np.exp(sinks[h] - top))
            out[b, h] = (p / total) @ v_cache[b, visible, h // G]
    return out.reshape(B, H * Dh), k_cache, v_cache


@pytest.mark.parametrize("case", [
    dict(B=2, S=40, K=2, G=3, Dh=16, lengths=[5, 39]),
    dict(B=2, S=70, K=1, G=4, Dh=24, lengths=[69, 30], qk_norm=True, window=7, softcap=5.0,
         norm_offset=1.0),
    dict(B=1, S=33, K=3, G=1, Dh=32, lengths=[20], rope=False),
    dict(B=1, S=1100, K=2, G=2, Dh=16, lengths=[1000], window=700),  # several splits
    dict(B=3, S=24, K=2, G=2, Dh=16, lengths=[27, 0, 17], dtype=jnp.bfloat16),  # past the end: clamped
    dict(B=2, S=40, K=2, G=2, Dh=32, lengths=[7, 20], qkv_splits=5),  # the projection's partial sums
    dict(B=1, S=40, K=2, G=2, Dh=32, lengths=[11], qkv_splits=40),  # too many: summed by XLA first
    # the factor of a deferred norm (model.DeferredNorm), applied by the kernel
    dict(B=2, S=40, K=2, G=2, Dh=32, lengths=[3, 30], qkv_splits=3, row_normed=True),
    dict(B=2, S=40, K=1, G=2, Dh=16, lengths=[9, 2], qk_norm=True, row_normed=True),
    # gpt-oss's sinks, in the kernel (one split, a window) and in XLA's combination of splits
    dict(B=2, S=40, K=2, G=3, Dh=16, lengths=[6, 35], window=8, sinks=True),
    dict(B=1, S=1100, K=2, G=2, Dh=16, lengths=[1000], sinks=True),
    # a paged cache (cache.PagedKVCache): the rows' pages shuffled through a pool
    dict(B=2, S=48, K=2, G=3, Dh=16, lengths=[5, 47], page=16),
    dict(B=2, S=64, K=1, G=4, Dh=24, lengths=[63, 30], qk_norm=True, window=7, softcap=5.0, page=16),
    dict(B=1, S=1104, K=2, G=2, Dh=16, lengths=[1000], window=700, page=16),  # several splits
    dict(B=3, S=32, K=2, G=2, Dh=16, lengths=[35, 0, 17], dtype=jnp.bfloat16, page=16),  # past the table
    dict(B=2, S=64, K=2, G=3, Dh=16, lengths=[6, 50], window=8, sinks=True, page=32, qkv_splits=3),
    # a row not decoding (a free serving slot) reads nothing: only the live rows' outputs count
    dict(B=3, S=48, K=2, G=2, Dh=16, lengths=[30, 40, 12], live=[1, 0, 1], page=16),
    dict(B=2, S=40, K=2, G=2, Dh=16, lengths=[30, 20], live=[0, 1]),
])
def test_decode_attention_matches_float64(case):
    from jaxllm.kernels.decode_attention import AttentionSpec, _splits, decode_attention_pallas
    from jaxllm.kernels.matvec import PartialSums

    case = dict(case)
    B, S, K, G, Dh = (case.pop(k) for k in ("B", "S", "K", "G", "Dh"))
    lengths, dtype = np.array(case.pop("lengths"), np.int32), case.pop("dtype", jnp.float32)
    qkv_splits, row_normed = case.pop("qkv_splits", None), case.pop("row_normed", False)
    page = case.pop("page", None)
    live = np.array(case.pop("live", [1] * B), bool)
    spec = AttentionSpec(n_heads=K * G, n_kv_heads=K, head_dim=Dh, scale=Dh ** -0.5,
                         rope=case.pop("rope", True), norm_eps=1e-6, **case)
    rng = np.random.default_rng(np.random.randint(1 << 30))
    # sinks as large as the scores, so that they take a real share of each softmax
    sinks = rng.normal(size=K * G).astype(np.float32) * 2 if spec.sinks else None
    qkv = rng.standard_normal((B, (K * G + 2 * K) * Dh)).astype(np.float32)
    k_cache, v_cache = (rng.standard_normal((B, S, K, Dh)).astype(np.float32) for _ in range(2))
    freq = (10000.0 ** -(np.arange(Dh // 2) / (Dh // 2))).astype(np.float32)
    q_norm, k_norm = (rng.uniform(0.5, 1.5, Dh).astype(np.float32) for _ in range(2))
    cast = lambda a: np.asarray(jnp.asarray(a, dtype).astype(jnp.float32))  # the kernel's inputs, rounded
    qkv, k_cache, v_cache = cast(qkv), cast(k_cache), cast(v_cache)
    ref_out, ref_k, ref_v = numpy_decode_attention(qkv, k_cache, v_cache, lengths, freq, q_norm,
                                                   k_norm, spec, sinks)
    # Given rows x [B, 40], the kernel multiplies row b by rsqrt(mean(x[b]^2) + eps).
    norm_rows = rng.standard_normal((B, 40)).astype(np.float32) * rng.uniform(0.3, 3.0, (B, 1))
    factor = 1 / np.sqrt((norm_rows.astype(np.float64) ** 2).mean(1) + spec.norm_eps)
    given = (qkv / factor[:, None]).astype(np.float32) if row_normed else qkv
    qkv_in = jnp.asarray(given, dtype)
    if qkv_splits:  # random parts adding up to qkv
        parts = rng.standard_normal((qkv_splits - 1, B, qkv.shape[1])).astype(np.float32)
        qkv_in = PartialSums(jnp.asarray(np.concatenate([parts, (given - parts.sum(0))[None]])))
    caches, table = (k_cache, v_cache), None
    if page:  # row b's page i is pool page table[b, i]; page 0 is the scratch page
        table = rng.permutation(np.arange(1, B * (S // page) + 1)).reshape(B, S // page)
        pools = [np.zeros((table.size + 1, page, K, Dh), np.float32) for _ in range(2)]
        for pool, cache in zip(pools, caches):
            pool[table] = cache.reshape(B, S // page, page, K, Dh)
        caches = pools
    out, new_k, new_v = decode_attention_pallas(
        qkv_in, *(jnp.asarray(c, dtype) for c in caches),
        jnp.asarray(lengths), jnp.asarray(freq), jnp.asarray(q_norm), jnp.asarray(k_norm),
        jnp.asarray(norm_rows, dtype) if row_normed else None,
        None if sinks is None else jnp.asarray(sinks), None if table is None else jnp.asarray(table),
        None if live.all() else jnp.asarray(live), spec=spec, interpret=jax.default_backend() != "gpu")
    if page:  # the rows read back through the table
        new_k, new_v = (np.asarray(pool, np.float32)[table].reshape(B, S, K, Dh) for pool in (new_k, new_v))
    assert (S > 512) == (_splits(B, spec, S) > 1)
    # float32 on the GPU: the kernel's dots run in TF32 (~3e-4), as XLA's do by default.
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3 if jax.default_backend() == "gpu" else 1e-5
    out = np.asarray(out, np.float64)
    assert out.shape == (B, K * G * Dh)
    if not live.all():  # a row that reads no cache attends to its new token alone: its value
        H, v_new = K * G, qkv.reshape(B, -1, Dh)[:, K * G + K:]
        dead = np.repeat(v_new, G, axis=1).reshape(B, H * Dh)[~live]
        assert np.linalg.norm(out[~live] - dead) / np.linalg.norm(dead) < tol
    out, ref_out = out[live], ref_out[live]
    assert np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out) < tol
    for got, ref, before in ((new_k, ref_k, k_cache), (new_v, ref_v, v_cache)):
        got = np.asarray(got, np.float64)
        written = np.zeros((B, S), bool)
        written[np.arange(B), np.minimum(lengths, S - 1)] = True
        if page:  # a position past the table goes to the scratch page, not the row's last slot
            written[lengths >= S] = False
        np.testing.assert_array_equal(got[~written], before[~written])  # nothing else touched
        assert np.linalg.norm(got[written] - ref[written]) / np.linalg.norm(ref[written]) < tol


# --- residual add + norm ------------------------------------------------------------

@pytest.mark.parametrize("D, M, splits, layer_norm, bias", [(576, 1, 48, False, False),
                                                           (100, 3, None, True, True),
                                                           (64, 2, 5, False, False)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_norm_matches_float64(D, M, splits, layer_norm, bias, dtype):
    from jaxllm.kernels.add_norm import add_norm_pallas, add_norm_reference
    from jaxllm.kernels.matvec import PartialSums

    rng = np.random.default_rng(np.random.randint(1 << 30))
    x = np.asarray(jnp.asarray(rng.standard_normal((M, D)), dtype).astype(jnp.float32))
    parts = rng.standard_normal((splits or 1, M, D)).astype(np.float32)
    delta = PartialSums(jnp.asarray(parts)) if splits else jnp.asarray(parts[0], dtype)
    if not splits:
        parts = np.asarray(delta.astype(jnp.float32))[None]
    scale, b = (rng.uniform(0.5, 1.5, D).astype(np.float32) for _ in range(2))
    kw = dict(layer_norm=layer_norm, eps=1e-5, offset=0.5)
    got_x, got_h = add_norm_pallas(jnp.asarray(x, dtype), delta, jnp.asarray(scale), jnp.asarray(b) if bias else None,
                                   interpret=jax.default_backend() != "gpu", **kw)
    x64 = x.astype(np.float64) + parts.astype(np.float64).sum(0)
    c = x64 - x64.mean(-1, keepdims=True) if layer_norm else x64
    h64 = c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-5) * (0.5 + scale) + (b if bias else 0)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for got, ref in ((got_x, x64), (got_h, h64)):
        got = np.asarray(got.astype(jnp.float32), np.float64)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tol
    ref_x, ref_h = add_norm_reference(jnp.asarray(x, dtype), delta, jnp.asarray(scale),
                                      jnp.asarray(b) if bias else None, **kw)
    np.testing.assert_allclose(np.asarray(got_h, np.float32), np.asarray(ref_h, np.float32),
                               rtol=tol * 5, atol=tol * 5)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("M, splits", [(1, 1), (3, 5)])
def test_down_projection_kernels_apply_the_gate_to_partial_sums(act, M, splits):
    """GatedInput: act(gate) * up formed from the gate-up projection's partial sums
    inside the bf16 and quantized matrix-vector kernels, against float64."""
    from jaxllm import quant
    from jaxllm.kernels.matvec import GatedInput
    from jaxllm.kernels.qmatvec import qmatvec_pallas

    rng = np.random.default_rng()
    F, N = 96, 40
    sums = rng.standard_normal((splits, M, 2 * F)).astype(np.float32)
    h = sums.astype(np.float64).sum(0)
    gate, up = h[:, :F], h[:, F:]
    if act == "silu":
        hidden = gate / (1 + np.exp(-gate)) * up
    else:
        hidden = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3))) * up
    w = rng.standard_normal((F, N)).astype(np.float32)
    x = GatedInput(jnp.asarray(sums), act)
    ref = hidden @ w.astype(np.float64)
    got = matvec_pallas(x, jnp.asarray(w), jnp.float32, block_n=16, block_k=32, target_programs=8,
                        interpret=True)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5 * np.abs(ref).max())
    qw = quant.quantize_weight(jnp.asarray(w), "int8", 32)
    dense = np.asarray(quant.dequantize(qw, jnp.float32), np.float64)
    ref = hidden @ dense
    got = qmatvec_pallas(x, qw, jnp.float32, block_k=64, target_programs=8, interpret=True,
                         int8_activations=False)  # rounded activations: test_quant.py
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(x.value(jnp.float32)), hidden, rtol=1e-5, atol=1e-5)


# --- weights stored by output row ---------------------------------------------------

@pytest.mark.parametrize("M, K, N, gate, norm, residual", [
    (1, 576, 960, None, True, False),  # q/k/v: the norm before it
    (1, 200, 70, "silu", True, False),  # gate-up
    (3, 300, 33, "gelu_tanh", False, False),
    (4, 1000, 64, None, False, True),  # o / down: the residual after it
    (2, 64, 1000, None, True, True),
    (1, 1100, 40, "silu", True, False),  # rows longer than short_row: several steps ahead
    (1, 2100, 24, None, False, True),
])
@pytest.mark.parametrize("tiling", [{}, dict(block_n=2, block_k=64, tile_acc=False, prefetch=0),
                                    dict(block_k=128, min_programs=4, prefetch=3)])
def test_rowmatvec_matches_float64(M, K, N, gate, norm, residual, tiling):
    """y = residual + act(g) * u of norm(x) @ t.T, against float64 NumPy."""
    from jaxllm.kernels.rowmatvec import rowmatvec_pallas, rowmatvec_reference

    rng = np.random.default_rng(np.random.randint(1 << 30))
    x = rng.standard_normal((M, K)).astype(np.float32) * rng.uniform(0.3, 3.0, (M, 1)).astype(np.float32)
    t = rng.standard_normal(((2 if gate else 1) * N, K)).astype(np.float32) / np.sqrt(K)
    scale = rng.uniform(0.5, 1.5, K).astype(np.float32)
    res = rng.standard_normal((M, N)).astype(np.float32)
    kw = dict(gate=gate)
    if norm:
        kw.update(norm_scale=jnp.asarray(scale), norm_offset=0.5, norm_eps=1e-5)
    if residual:
        kw.update(residual=jnp.asarray(res))
    got = np.asarray(rowmatvec_pallas(jnp.asarray(x), jnp.asarray(t), interpret=True, **kw, **tiling), np.float64)

    x64 = x.astype(np.float64)
    if norm:
        x64 = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * (0.5 + scale)
    y = x64 @ t.astype(np.float64).T
    if gate:
        g, u = y[:, :N], y[:, N:]
        y = (g / (1 + np.exp(-g)) if gate == "silu" else
             0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))) * u
    if residual:
        y = res + y
    assert got.shape == (M, N)
    assert np.linalg.norm(got - y) / np.linalg.norm(y) < 1e-5
    ref = rowmatvec_reference(jnp.asarray(x), jnp.asarray(t), **kw)
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-4, atol=1e-4 * np.abs(y).max())


@pytest.mark.parametrize("gate, norm, residual", [(None, True, False), ("silu", True, False),
                                                (None, False, True)])
def test_rowmatvec_reads_float8_rows_with_their_scales(gate, norm, residual):
    """fp8 weights at decode: e4m3 rows widened in the kernel, each row's scale applied
    before the gate and the residual, activations unrounded; against float64 NumPy on
    the stored e4m3 values."""
    from jaxllm.kernels.rowmatvec import rowmatvec_pallas, rowmatvec_reference

    rng = np.random.default_rng(np.random.randint(1 << 30))
    M, K, N = 2, 320, 48
    rows = (2 if gate else 1) * N
    # within e4m3's +-448: a value past it casts to NaN (e4m3fn has no infinity)
    t = jnp.asarray(np.clip(rng.standard_normal((rows, K)) * 100, -448, 448), jnp.float8_e4m3fn)
    scales = rng.uniform(1e-4, 1e-3, rows).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    norm_scale = rng.uniform(0.5, 1.5, K).astype(np.float32)
    res = rng.standard_normal((M, N)).astype(np.float32)
    kw = dict(gate=gate, row_scales=jnp.asarray(scales))
    if norm:
        kw.update(norm_scale=jnp.asarray(norm_scale), norm_eps=1e-5)
    if residual:
        kw.update(residual=jnp.asarray(res))
    got = np.asarray(rowmatvec_pallas(jnp.asarray(x), t, jnp.float32, interpret=True, **kw), np.float64)

    x64 = x.astype(np.float64)
    if norm:
        x64 = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * norm_scale
    y = (x64 @ np.asarray(t.astype(jnp.float32), np.float64).T) * scales
    if gate:
        y = y[:, :N] / (1 + np.exp(-y[:, :N])) * y[:, N:]
    if residual:
        y = res + y
    assert np.linalg.norm(got - y) / np.linalg.norm(y) < 1e-5
    ref = rowmatvec_reference(jnp.asarray(x), t, jnp.float32, **kw)
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-4, atol=1e-4 * np.abs(y).max())


def test_rowmatvec_takes_the_wide_tiling_for_many_rows():
    """Weights of at least `wide_rows` rows (tied heads) take the tiling's `wide`
    settings: the grid shows block_n, and the result still matches float64."""
    from jaxllm.kernels import rowmatvec
    from jaxllm.policy import RowTiling

    tiling = RowTiling(wide_rows=600, wide=(("block_n", 32), ("block_k", 64), ("prefetch", 2), ("num_warps", 8)))
    rng = np.random.default_rng(np.random.randint(1 << 30))
    x = rng.standard_normal((2, 300)).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, 300).astype(np.float32)
    # 300 inputs make a short row: fewer rows than wide_rows take the short-row rule
    for N, block_n in ((1000, 32), (500, rowmatvec.rows_per_program(500, dict(tiling.short)["min_programs"]))):
        t = rng.standard_normal((N, 300)).astype(np.float32) / np.sqrt(300)
        run = lambda x, t: rowmatvec.rowmatvec_pallas(x, t, norm_scale=jnp.asarray(scale), tiling=tiling,
                                                      interpret=True)
        assert f"grid=({-(-N // block_n)},)" in str(jax.make_jaxpr(run)(x, t))
        x64 = x.astype(np.float64)
        y = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * scale @ t.astype(np.float64).T
        got = np.asarray(run(jnp.asarray(x), jnp.asarray(t)), np.float64)
        assert np.linalg.norm(got - y) / np.linalg.norm(y) < 1e-5


def test_rowmatvec_rejects_a_mismatched_weight():
    from jaxllm.kernels.rowmatvec import rowmatvec_pallas

    with pytest.raises(ValueError, match="does not match"):
        rowmatvec_pallas(jnp.ones((1, 64)), jnp.ones((32, 48)), interpret=True)


@pytest.mark.parametrize("arch, tied", [("llama3", False), ("llama3", True), ("gemma", False), ("gemma", True),
                                        ("qwen2", False), ("phi2", False)])
def test_model_with_transposed_projections_matches_xla_path(arch, tied):
    """Projections stored by output row (jaxllm.layout): decode through the row-major
    kernel, with the norm, gate and residual add inside it where the architecture
    allows (Gemma's sandwich norms and Phi-2's parallel block do not), and prefill
    through XLA's dot on the transposed weights: the same logits and cache as the XLA
    path on the usual layout. A tied head (the embedding table, stored by row) takes
    the kernel with the final norm inside, Gemma's final soft-cap after it."""
    from jaxllm.layout import TransposedWeight, transpose_projections

    c = ARCH_CONFIGS[arch].replace(tie_embeddings=tied)
    params = jaxllm.init_params(c, jax.random.PRNGKey(np.random.randint(1 << 30)))
    rows = transpose_projections(params)
    assert isinstance(rows.layers[0].w_in, TransposedWeight)
    assert (rows.lm_head is None) if tied else isinstance(rows.lm_head, TransposedWeight)
    tokens = jnp.asarray(np.random.randint(0, c.vocab_size, (2, 9)))
    with jax.default_matmul_precision("highest"):
        ref = prefill_and_steps(params, c.replace(kernels="xla"), tokens)
        assert_same_run(prefill_and_steps(rows, c.replace(kernels="pallas"), tokens), ref)
        assert_same_run(prefill_and_steps(rows, c.replace(kernels="xla"), tokens), ref)


def test_a_llama_layer_decodes_in_five_kernels_with_transposed_projections():
    """q/k/v (with the attention norm), decode attention, o (with the residual add),
    gate-up (with the MLP norm and the gate), down (with the residual add): nothing
    between them falls back to a separate projection or norm. The tied head is one
    more call, with the final norm inside."""
    import re

    from jaxllm.layout import transpose_projections

    c = ARCH_CONFIGS["llama3"].replace(kernels="pallas", tie_embeddings=True)
    params = transpose_projections(jaxllm.init_params(c, jax.random.PRNGKey(0)))
    cache = jaxllm.init_cache(c, 1, 16, jnp.float32)
    text = str(jax.make_jaxpr(lambda p, t, kv: jaxllm.decode_step(p, c, t, kv))(params, jnp.array([1]), cache))
    calls = re.findall(r"name=(\w+_pallas)\b", text)
    assert calls.count("rowmatvec_pallas") == 4 * c.n_layers + 1
    assert calls.count("decode_attention_pallas") == c.n_layers
    assert "add_norm_pallas" not in calls and "matvec_pallas" not in calls
