"""The generic decoder as pure functions over a `Params` pytree.

Three entry points share one layer function:
  forward      logits for whole sequences, no cache (scoring, training)
  extend       append T tokens per row to a KV cache; logits of each row's last
               new token (prefill, chunked prefill, and decode with T = 1)
  decode_step  extend with one token per row

Axes: B batch, T new tokens, S cache slots, H query heads, K kv heads,
G = H / K query heads per kv head, Dh head dim, D model width, V vocab.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .cache import KVCache, write_rows
from .calibration import InputTap
from .config import ModelConfig
from .kernels.add_norm import Delta, add_norm_pallas, use_add_norm
from .kernels.cpu_qmatvec import qmatvec_cpu, use_native
from .kernels.decode_attention import AttentionSpec, decode_attention_pallas
from .kernels.matvec import MAX_GATED_SPLITS, GatedInput, PartialSums, activate, matvec_pallas, use_pallas
from .kernels.qmatvec import KERNEL_BITS, qmatmul_pallas, qmatvec_pallas, use_qmatmul
from .kernels.rowmatvec import rowmatvec_pallas, use_rowmatvec
from .layout import TransposedWeight
from .params import Layer, Norm, Params
from .quant import QuantizedWeight, linear_reference, take_rows


class DeferredNorm(NamedTuple):
    """An RMSNorm of x [..., D] left to the kernels around the projection after it:
    norm(x) @ W = (x * weight) @ W * factor, weight = offset + scale, factor =
    rsqrt(mean(x^2) + eps) [..., 1]. The row-major kernel (kernels/rowmatvec.py)
    takes x and the weight and does both. Before the other kernels, XLA forms the
    product `scaled` (together with the residual add) and the kernel after the
    projection applies the factor: decode attention computes it from x itself, so
    the norm costs no kernel of its own; before XLA's matrix multiplies, the
    activation's kernel applies it, and XLA computes the product and the sum of
    squares in one kernel where a norm written out took two (benchmarks/NOTES.md,
    variant 15)."""

    x: jax.Array
    scale: jax.Array
    offset: float
    eps: float

    @property
    def scaled(self) -> jax.Array:
        return (self.x.astype(jnp.float32) * (self.offset + self.scale.astype(jnp.float32))).astype(self.x.dtype)

    @property
    def factor(self) -> jax.Array:
        return rms_factor(self.x.astype(jnp.float32), self.eps)

    @property
    def shape(self):
        return self.x.shape

    @property
    def dtype(self):
        return self.x.dtype


# On by default; benchmarks/decode_variants.py switches it off to compare.
DEFERRED_NORM = True


def defer_norm(config: ModelConfig, norm: Norm, w, rows: int, kernel_applies: bool = False) -> bool:
    """Whether the norm before projection w is left to the kernels after it
    (`DeferredNorm`): RMSNorm without bias, either where the kernel after w applies the
    factor itself (kernel_applies: decode attention, on any fast path), or on the GPU
    where w takes XLA's matrix multiply. (The final norm is deferred only into the
    row-major kernel, `unembed`: before XLA's gemm on the H100 that gained nothing
    measurable, one kernel per step.)"""
    if not (DEFERRED_NORM and config.norm == "rms" and norm.bias is None and config.kernels != "xla"):
        return False
    if kernel_applies or fused_projection(w, config.kernels, rows):
        return True
    return (config.kernels == "auto" and jax.default_backend() == "gpu"
            and not isinstance(w, QuantizedWeight) and not use_pallas(config.kernels, rows, w.shape))


def fused_projection(w, kernels: str, rows: int) -> bool:
    """Whether w's kernel takes a DeferredNorm whole and applies a gate and a residual
    add itself: a TransposedWeight on the row-major kernel (kernels/rowmatvec.py)."""
    return isinstance(w, TransposedWeight) and use_rowmatvec(kernels, rows, w.shape)


def linear(x: jax.Array, w, b: Optional[jax.Array] = None, kernels: str = "auto",
           out_dtype=None, partial: bool = False, gate: Optional[str] = None,
           residual: Optional[jax.Array] = None):
    """x [..., In] @ w [In, Out] (+ b [Out]) with float32 accumulation, in out_dtype
    (default x's). Every projection goes through here; w is a dense array, or a
    QuantizedWeight or TransposedWeight standing for one. partial=True lets a split-K
    kernel return its `PartialSums` [S, rows, Out] for `add_norm` to add up. x may be
    a `GatedInput` [S, rows, 2 In] (the MLP's down projection at decode), which the
    kernels take whole. gate ("silu" or "gelu_tanh"): act(y1) * y2 of the output's two
    halves; residual [..., Out]: residual + y in its dtype. Both are applied by the
    row-major kernel where it runs (`fused_projection`). An `InputTap` w
    (calibration.py) records x, then stands for its weight."""
    if isinstance(w, InputTap):
        w.observe(x)
        w = w.weight
    rows = math.prod(x.shape[:-1]) if not isinstance(x, GatedInput) else x.sums.shape[1]
    interpret = jax.default_backend() != "gpu"
    if b is None and fused_projection(w, kernels, rows):
        norm, x_in = {}, x
        if isinstance(x, DeferredNorm):
            norm, x_in = dict(norm_scale=x.scale, norm_offset=x.offset, norm_eps=x.eps), x.x
        y = rowmatvec_pallas(
            x_in.reshape(rows, -1), w.t, out_dtype, gate=gate, **norm,
            residual=None if residual is None else residual.reshape(rows, -1), interpret=interpret)
        return y.reshape(*x.shape[:-1], -1)
    if gate is not None or residual is not None:
        y = linear(x, w, b, kernels, jnp.float32)
        if gate is not None:
            g, u = jnp.split(y, 2, axis=-1)
            y = activate(g, gate) * u
        return (y.astype(out_dtype or x.dtype) if residual is None
                else residual + y.astype(residual.dtype))
    if isinstance(x, DeferredNorm):
        # The projection returns x's dtype (asking XLA for float32 outputs changes its
        # fusions, NOTES variant 7); the factor is applied in float32 after it.
        y = (linear(x.scaled, w, None, kernels).astype(jnp.float32) * x.factor).astype(out_dtype or x.dtype)
        return y if b is None else y + b.astype(y.dtype)
    partial = partial and b is None
    if isinstance(x, GatedInput):
        quantized = isinstance(w, QuantizedWeight)
        if (use_pallas(kernels, rows, w.shape, quantized)
                and (not quantized or w.bits in KERNEL_BITS)):
            kernel = qmatvec_pallas if quantized else matvec_pallas
            y = kernel(x, w, out_dtype, interpret=interpret, sum_splits=not partial)
            return y if b is None or isinstance(y, PartialSums) else y + b.astype(y.dtype)
        x = x.value(out_dtype or jnp.float32)
    if isinstance(w, QuantizedWeight):
        x2 = x.reshape(rows, x.shape[-1])
        if w.bits in KERNEL_BITS and use_pallas(kernels, rows, w.shape, quantized=True):
            y = qmatvec_pallas(x2, w, out_dtype, interpret=interpret, sum_splits=not partial)
            if isinstance(y, PartialSums):
                return y
        elif use_native(kernels, rows, w):
            y = qmatvec_cpu(x2, w, out_dtype)
        elif w.bits in KERNEL_BITS and use_qmatmul(kernels, rows):
            y = qmatmul_pallas(x2, w, out_dtype, interpret=interpret)
        else:
            y = linear_reference(x2, w, out_dtype)
        y = y.reshape(*x.shape[:-1], w.shape[1])
    elif isinstance(w, TransposedWeight):
        y = jnp.einsum("...i,oi->...o", x, w.t.astype(x.dtype), preferred_element_type=out_dtype)
    elif use_pallas(kernels, rows, w.shape):
        y = matvec_pallas(x.reshape(rows, x.shape[-1]), w, out_dtype, interpret=interpret,
                          sum_splits=not partial)
        if isinstance(y, PartialSums):
            return y
        y = y.reshape(*x.shape[:-1], w.shape[1])
    else:
        # A float32 result only where asked for: requesting it on every projection
        # changes XLA's fusions of batch-1 dots and cost ~10% on llama8b decode.
        y = jnp.einsum("...i,io->...o", x, w.astype(x.dtype), preferred_element_type=out_dtype)
    return y if b is None else y + b.astype(y.dtype)


def add_norm(x: jax.Array, delta: Optional[Delta], p: Norm, config: ModelConfig, deferred: bool = False):
    """The residual add of a block's output and the norm after it: (x + delta, its norm),
    x [..., D]. delta is None before the first layer, an array like x, or the
    PartialSums of a split-K projection, which one kernel adds together with the
    residual and the norm when there are few (kernels/add_norm.py). deferred: the norm
    as a `DeferredNorm` for the projection after it."""
    if deferred:
        x = add_delta(x, delta)
        return x, DeferredNorm(x, p.scale, config.norm_weight_offset, config.norm_eps)
    if delta is None:
        return x, apply_norm(x, p, config)
    rows, D = math.prod(x.shape[:-1]), x.shape[-1]
    if use_add_norm(config.kernels, delta, D):
        x2, h2 = add_norm_pallas(
            x.reshape(rows, D), delta, p.scale, p.bias, layer_norm=config.norm == "layer",
            eps=config.norm_eps, offset=config.norm_weight_offset,
            interpret=jax.default_backend() != "gpu")
        return x2.reshape(x.shape), h2.reshape(x.shape)
    x = x + total(delta, x)
    return x, apply_norm(x, p, config)


def add_delta(x: jax.Array, delta: Optional[Delta]) -> jax.Array:
    """The residual stream x plus a layer's output delta (None: already added)."""
    return x if delta is None else x + total(delta, x)


def total(delta: Delta, like: jax.Array) -> jax.Array:
    """delta as an array shaped and typed like `like`."""
    if isinstance(delta, PartialSums):
        return delta.total(like.dtype).reshape(like.shape)
    return delta


def rms_factor(x32: jax.Array, eps: float) -> jax.Array:
    """rsqrt(mean(x^2) + eps) over the last axis, kept as [..., 1]."""
    return jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + eps)


def norm_weight(p: Norm, config: ModelConfig) -> jax.Array:
    """The norm's float32 weight, with the architecture's offset (Gemma's 1 + scale)."""
    return config.norm_weight_offset + p.scale.astype(jnp.float32)


def apply_norm(x: jax.Array, p: Norm, config: ModelConfig) -> jax.Array:
    """RMSNorm or LayerNorm over the last axis, computed in float32."""
    x32 = x.astype(jnp.float32)
    if config.norm == "layer":
        x32 = x32 - x32.mean(-1, keepdims=True)
    y = x32 * rms_factor(x32, config.norm_eps) * norm_weight(p, config)
    if p.bias is not None:
        y = y + p.bias.astype(jnp.float32)
    return y.astype(x.dtype)


def rope_inv_freq(config: ModelConfig, theta: float) -> np.ndarray:
    """Rotary inverse frequencies [R/2] (R = rotary_dim), with Llama-3 scaling when configured."""
    dim = config.rotary_dim
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    s = config.rope_scaling
    if s is not None:
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        mid = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
        inv_freq = np.where(wavelen > low_wavelen, inv_freq / s.factor,
                            np.where(wavelen < high_wavelen, inv_freq, mid))
    if config.rope_freq_factors is not None:
        inv_freq = inv_freq / np.asarray(config.rope_freq_factors, np.float64)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x [B, T, N, Dh] rotated by positions [B, T] (rotate-half pairing, as in HF).
    Only the first R = 2 * len(inv_freq) dims rotate; the rest pass through (Phi-2)."""
    rot = 2 * inv_freq.shape[0]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, R/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x[..., :rot].astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return out if rot == x.shape[-1] else jnp.concatenate([out, x[..., rot:]], axis=-1)


def attend(q, k, v, q_pos, k_pos, config: ModelConfig, window: Optional[int]) -> jax.Array:
    """Causal grouped-query attention.

    q [B, T, H, Dh]; k, v [B, S, K, Dh]; q_pos [B, T] and k_pos [B, S] are the
    sequence positions of queries and keys. A key is visible when
    q_pos - window < k_pos <= q_pos. Returns [B, T, H, Dh].
    """
    B, T, H, Dh = q.shape
    K = k.shape[2]
    scale = config.query_scale if config.query_scale is not None else Dh ** -0.5
    q = q.reshape(B, T, K, H // K, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if config.attn_softcap is not None:
        scores = config.attn_softcap * jnp.tanh(scores / config.attn_softcap)
    visible = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if window is not None:
        visible &= k_pos[:, None, :] > q_pos[:, :, None] - window
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    # A padded query row may see no key at all; its output is never used.
    probs = jnp.where(visible[:, None, None], probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(B, T, H, Dh)


def use_decode_attention(config: ModelConfig) -> bool:
    """The switch between the fused decode-attention kernel and the XLA path (one new
    token per row with a cache). Partial rotary (Phi-2) and LayerNorm'd query/key
    heads take the XLA path."""
    if config.kernels == "xla" or (config.kernels == "auto" and jax.default_backend() != "gpu"):
        return False
    if config.position == "rope" and config.rotary_dim != config.head_dim:
        return False
    return not config.qk_norm or config.norm == "rms"


def decode_attention(p: Layer, config: ModelConfig, index: int, qkv: Delta, kv, starts, dtype,
                     norm_rows: Optional[jax.Array] = None):
    """qkv [B, 1, q + 2kv] (or its PartialSums [S, B, q + 2kv]) of one new token per
    row at positions starts [B] -> (attention output [B, 1, q_size] in dtype, kv)
    through kernels/decode_attention.py. norm_rows [B, D]: the projection's input was
    a DeferredNorm of these rows, whose factor the kernel applies."""
    rope = config.position == "rope"
    spec = AttentionSpec(
        n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
        scale=config.query_scale if config.query_scale is not None else config.head_dim ** -0.5,
        rope=rope, window=config.layer_window(index), softcap=config.attn_softcap,
        qk_norm=config.qk_norm, norm_eps=config.norm_eps, norm_offset=config.norm_weight_offset)
    inv_freq = jnp.asarray(rope_inv_freq(config, config.layer_rope_theta(index))) if rope else None
    norms = (p.q_norm.scale, p.k_norm.scale) if config.qk_norm else (None, None)
    out, k_cache, v_cache = decode_attention_pallas(
        qkv if isinstance(qkv, PartialSums) else qkv[:, 0], kv[0], kv[1], starts, inv_freq, *norms,
        norm_rows, spec=spec, interpret=jax.default_backend() != "gpu", out_dtype=dtype)
    return out[:, None], (k_cache, v_cache)


def mlp(x: jax.Array, p: Layer, config: ModelConfig, partial: bool = False,
        residual: Optional[jax.Array] = None) -> Delta:
    """The MLP's output delta, or residual + delta when a residual is given."""
    gated = config.mlp == "swiglu" or (config.mlp == "geglu" and config.gelu_approximate)
    act = "silu" if config.mlp == "swiglu" else "gelu_tanh"
    if gated and p.b_in is None and fused_projection(p.w_in, config.kernels, math.prod(x.shape[:-1])):
        hidden = linear(x, p.w_in, None, config.kernels, gate=act)  # the kernel applies the gate
        return linear(hidden, p.w_out, p.b_out, config.kernels, residual=residual)
    if residual is not None:
        return residual + total(mlp(x, p, config), residual)
    # A deferred norm's factor is applied in float32, in the activation's kernel.
    h_dtype = jnp.float32 if isinstance(x, DeferredNorm) else None
    if gated and x.shape[1] == 1 and p.b_in is None and p.b_out is None:
        # Decode: the down projection's kernel applies the activation to the gate-up
        # partial sums itself (kernels/matvec.py, GatedInput).
        h = linear(x, p.w_in, None, config.kernels, h_dtype, partial=True)
        if isinstance(h, PartialSums) and h.sums.shape[0] <= MAX_GATED_SPLITS:
            out = linear(GatedInput(h.sums, act), p.w_out, None, config.kernels, out_dtype=x.dtype,
                         partial=partial)
            return out if isinstance(out, PartialSums) else out.reshape(*x.shape[:-1], -1)
        if isinstance(h, PartialSums):
            h = h.total(x.dtype).reshape(*x.shape[:-1], -1)
    else:
        h = linear(x, p.w_in, p.b_in, config.kernels, h_dtype)
    if config.mlp == "gelu":
        hidden = jax.nn.gelu(h, approximate=config.gelu_approximate)
    else:
        gate, up = jnp.split(h, 2, axis=-1)
        act = jax.nn.silu(gate) if config.mlp == "swiglu" else jax.nn.gelu(
            gate, approximate=config.gelu_approximate)
        hidden = act * up
    return linear(hidden.astype(x.dtype), p.w_out, p.b_out, config.kernels, partial=partial)


def layer_forward(p: Layer, config: ModelConfig, index: int, x, delta: Optional[Delta], positions,
                  kv=None, starts=None, span: Optional[int] = None):
    """One decoder layer.

    The residual stream arrives as x [B, T, D] plus the previous layer's output delta
    (None for the first layer, or when the row-major kernels added it already), added
    here together with the attention norm, and leaves the same way: (x, delta, kv). positions [B, T]. With `kv` = (k_cache, v_cache) [B, S, K, Dh],
    the new keys and values are written at slots starts[b] + t and attention reads
    the whole cache, or its first `span` slots when every row's keys lie there;
    without, attention reads the T tokens themselves.
    """
    B, T, _ = x.shape
    Dh, window = config.head_dim, config.layer_window(index)
    fused_attention = kv is not None and T == 1 and use_decode_attention(config)
    x, h = add_norm(x, delta, p.attn_norm, config, defer_norm(
        config, p.attn_norm, p.wqkv, B * T, kernel_applies=fused_attention and p.bqkv is None))
    if fused_attention:
        qkv_in, norm_rows = h, None
        if (isinstance(h, DeferredNorm) and p.bqkv is None  # decode attention applies the factor
                and not fused_projection(p.wqkv, config.kernels, B)):
            qkv_in, norm_rows = h.scaled, h.x.reshape(B, -1)
        qkv = linear(qkv_in, p.wqkv, p.bqkv, config.kernels, partial=True)
        attn, kv = decode_attention(p, config, index, qkv, kv, starts, x.dtype, norm_rows)
        return _after_attention(p, config, x, h, attn, kv)
    qkv = linear(h, p.wqkv, p.bqkv, config.kernels)
    q, k, v = jnp.split(qkv, [config.q_size, config.q_size + config.kv_size], axis=-1)
    q = q.reshape(B, T, config.n_heads, Dh)
    k = k.reshape(B, T, config.n_kv_heads, Dh)
    v = v.reshape(B, T, config.n_kv_heads, Dh)
    if config.qk_norm:
        q, k = apply_norm(q, p.q_norm, config), apply_norm(k, p.k_norm, config)
    if config.position == "rope":
        inv_freq = rope_inv_freq(config, config.layer_rope_theta(index))
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if kv is None:
        attn = attend(q, k, v, positions, positions, config, window)
    else:
        k_cache, v_cache = write_rows(kv[0], k, starts), write_rows(kv[1], v, starts)
        S = min(span or k_cache.shape[1], k_cache.shape[1])
        slots = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        attn = attend(q, k_cache[:, :S], v_cache[:, :S], positions, slots, config, window)
        kv = (k_cache, v_cache)
    return _after_attention(p, config, x, h, attn.reshape(B, T, config.q_size), kv)


def _after_attention(p: Layer, config: ModelConfig, x, h, attn, kv):
    """Output projection, residual and the MLP: attn [B, T, q_size] -> (x, delta, kv)."""
    plain = not (config.sandwich_norm or config.parallel_block)
    rows = math.prod(x.shape[:-1])
    if plain and p.bo is None and p.b_out is None and fused_projection(p.wo, config.kernels, rows):
        # The row-major kernels add the residual themselves: the stream leaves complete.
        x = linear(attn, p.wo, None, config.kernels, residual=x)
        _, h = add_norm(x, None, p.mlp_norm, config, defer_norm(config, p.mlp_norm, p.w_in, rows))
        return mlp(h, p, config, residual=x), None, kv
    attn = linear(attn, p.wo, p.bo, config.kernels, partial=plain)
    if config.sandwich_norm:
        attn = apply_norm(attn, p.post_attn_norm, config)
    if config.parallel_block:
        return x, attn + mlp(h, p, config), kv
    x, h = add_norm(x, attn, p.mlp_norm, config,
                    defer_norm(config, p.mlp_norm, p.w_in, math.prod(x.shape[:-1])))
    out = mlp(h, p, config, partial=not config.sandwich_norm)
    if config.sandwich_norm:
        out = apply_norm(out, p.post_mlp_norm, config)
    return x, out, kv


def embed(params: Params, config: ModelConfig, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    if isinstance(params.embed, QuantizedWeight):
        x = take_rows(params.embed, tokens)
    else:
        x = params.embed[tokens]
    if config.embed_scale is not None:
        # Gemma rounds the scale to the activation dtype before multiplying.
        x = x * jnp.asarray(config.embed_scale, x.dtype)
    if params.pos_embed is not None:
        x = x + params.pos_embed[positions]
    return x


# The tied embedding table [V, D] is stored by output row already: where the row-major
# kernel reads weights of its width, it projects the head with the final norm inside
# (benchmarks/decode_variants.py's head-xla variant switches this off to compare).
ROW_MAJOR_HEAD = True


def unembed(params: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm and output projection: x [..., D] -> float32 logits [..., V]."""
    if ROW_MAJOR_HEAD and params.lm_head is None and not isinstance(params.embed, QuantizedWeight):
        head, rows = TransposedWeight(params.embed), math.prod(x.shape[:-1])
        if fused_projection(head, config.kernels, rows) and defer_norm(config, params.final_norm, head, rows):
            x = DeferredNorm(x, params.final_norm.scale, config.norm_weight_offset, config.norm_eps)
            return softcap_logits(linear(x, head, None, config.kernels, out_dtype=jnp.float32), config)
    x = apply_norm(x, params.final_norm, config)
    if params.lm_head is None and isinstance(params.embed, QuantizedWeight):
        logits = linear(x, params.embed, None, config.kernels, out_dtype=jnp.float32)  # stored [D, V]
    elif params.lm_head is None:
        logits = jnp.einsum("...d,vd->...v", x, params.embed, preferred_element_type=jnp.float32)
    else:
        logits = linear(x, params.lm_head, params.lm_head_bias, config.kernels, out_dtype=jnp.float32)
    return softcap_logits(logits, config)


def softcap_logits(logits: jax.Array, config: ModelConfig) -> jax.Array:
    if config.final_softcap is not None:
        return config.final_softcap * jnp.tanh(logits / config.final_softcap)
    return logits


@partial(jax.jit, static_argnames=("config",))
def forward(params: Params, config: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Logits [B, T, V] (float32) for token sequences [B, T], no cache.

    Rows shorter than T are right-padded: causal masking keeps padding out of
    every real position, so the padded tail's logits are simply ignored.
    """
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x, delta = embed(params, config, tokens, positions), None
    for i, layer in enumerate(params.layers):
        x, delta, _ = layer_forward(layer, config, i, x, delta, positions)
    return unembed(params, config, add_delta(x, delta))


def extend_hidden(params: Params, config: ModelConfig, tokens: jax.Array, n_new: jax.Array,
                  cache: KVCache, span: Optional[int] = None):
    """Append tokens [B, T] (the first n_new[b] of each row are real) to the cache.

    Returns (hidden [B, T, D] before the final norm, cache with lengths += n_new).
    `span` (static): attention reads only the first `span` cache slots, which the
    caller guarantees hold every key of every row that matters.
    """
    B, T = tokens.shape
    positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)
    x, delta = embed(params, config, tokens, positions), None
    ks, vs = [], []
    for i, layer in enumerate(params.layers):
        x, delta, (k, v) = layer_forward(layer, config, i, x, delta, positions,
                                         (cache.k[i], cache.v[i]), cache.lengths, span)
        ks.append(k)
        vs.append(v)
    return add_delta(x, delta), KVCache(k=tuple(ks), v=tuple(vs), lengths=cache.lengths + n_new.astype(jnp.int32))


@partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def extend(params: Params, config: ModelConfig, tokens: jax.Array, n_new: jax.Array,
           cache: KVCache):
    """Prefill: append tokens [B, T] to the cache (row b's first n_new[b] are real).

    Returns (logits [B, V] of each row's last real new token, updated cache).
    The caller guarantees lengths + T <= capacity.
    """
    x, cache = extend_hidden(params, config, tokens, n_new, cache)
    last = jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]
    return unembed(params, config, last), cache


@partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def decode_step(params: Params, config: ModelConfig, tokens: jax.Array, cache: KVCache):
    """One incremental step: tokens [B] at position lengths[b] -> (logits [B, V], cache)."""
    x, cache = extend_hidden(params, config, tokens[:, None], jnp.ones_like(tokens), cache)
    return unembed(params, config, x[:, 0]), cache
