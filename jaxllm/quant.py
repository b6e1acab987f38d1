"""Quantizing weights: GGUF's blocks repacked for the device (`pack`), and dense
checkpoints quantized to int8, int4 or fp8 (`quantize`). The layouts of the results,
`QuantizedWeight` and `Fp8Weight`, are described in weights.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .weights import (PLANE_SLICES, Experts, Fp8Weight, QuantizedWeight, dense, dequantize, fp8_dense,
                      interleave, level_offset, to_fp8)

MODES = {"int8": 8, "int4": 4, "fp8": 8}  # bits per weight
# int4: (low, high) fractions of each group's minimum and maximum tried as its range
CLIP_SEARCH = tuple((lo, hi) for lo in (1.0, 0.9, 0.8, 0.7) for hi in (1.0, 0.9, 0.8, 0.7))
PROJECTIONS = ("wqkv", "wo", "w_in", "w_out")


@dataclass
class HostBlocks:
    """A blockwise weight on the host before packing, GGUF row order:
    W[n, k] = scales[n, k // G] * q[n, k] + mins[n, k // G]. Rows can be permuted
    and concatenated freely; `pack` then writes the device layout."""

    q: np.ndarray  # int8 [N, K]
    scales: np.ndarray  # float32 [N, K/G]
    mins: Optional[np.ndarray]  # float32 [N, K/G] or None
    bits: int  # 4, 5, 6 or 8: the range q lies in

    def rows(self, index) -> "HostBlocks":
        pick = lambda a: None if a is None else a[index]
        return HostBlocks(self.q[index], self.scales[index], pick(self.mins), self.bits)

    def dequantize(self) -> np.ndarray:
        """float32 [N, K], computed as llama.cpp does (scale * q + min)."""
        N, K = self.q.shape
        G = K // self.scales.shape[1]
        w = self.scales[:, :, None] * self.q.reshape(N, -1, G).astype(np.float32)
        if self.mins is not None:
            w = w + self.mins[:, :, None]
        return w.reshape(N, K)


def _regroup(b: HostBlocks, group: int) -> HostBlocks:
    """The same weight with smaller groups (scales repeated): lossless."""
    G = b.q.shape[1] // b.scales.shape[1]
    if G == group:
        return b
    rep = lambda a: None if a is None else np.repeat(a, G // group, axis=1)
    return HostBlocks(b.q, rep(b.scales), rep(b.mins), b.bits)


def _with_mins(b: HostBlocks) -> HostBlocks:
    """Asymmetric form of a symmetric weight, lossless: below 8 bits the unsigned
    level q + 2^(bits-1) with min -2^(bits-1) * scale (exact: a power-of-two multiple)."""
    if b.mins is not None:
        return b
    if b.bits < 8:
        offset = level_offset(b.bits)
        return HostBlocks((b.q + offset).astype(np.int8), b.scales, -offset * b.scales, b.bits)
    return HostBlocks(b.q, b.scales, np.zeros_like(b.scales), b.bits)


def concat_rows(parts: list[HostBlocks]) -> HostBlocks:
    """Stack weights along the output axis (fused q/k/v, gate/up), promoting to
    a common form without loss: the wider bit width, the smaller group, and
    minimums if any part has them."""
    if len(parts) == 1:
        return parts[0]
    group = min(p.q.shape[1] // p.scales.shape[1] for p in parts)
    if any((p.q.shape[1] // p.scales.shape[1]) % group for p in parts):
        raise ValueError("cannot fuse weights whose group sizes do not divide each other")
    parts = [_regroup(p, group) for p in parts]
    bits = max(p.bits for p in parts)
    if any(p.mins is not None for p in parts) or len({p.mins is None for p in parts}) > 1:
        parts = [_with_mins(p) for p in parts]
    mins = None if parts[0].mins is None else np.concatenate([p.mins for p in parts])
    return HostBlocks(np.concatenate([p.q for p in parts]), np.concatenate([p.scales for p in parts]),
                      mins, bits)


def _scale_dtype(a: np.ndarray):
    """float16 when it holds every value exactly (GGUF's own scales), else float32."""
    with np.errstate(over="ignore"):
        return np.float16 if np.array_equal(a.astype(np.float16).astype(np.float32), a) else np.float32


def pack(b: HostBlocks, compute_dtype=jnp.float32) -> QuantizedWeight:
    """Host blocks -> device QuantizedWeight (see the module docstring's layout)."""
    bits = b.bits if b.q.shape[0] % PLANE_SLICES[b.bits] == 0 else 8  # int8 holds every level exactly
    if bits < 8:
        levels = b.q.astype(np.int16) + (level_offset(bits) if b.mins is None else 0)
        if levels.min() < 0 or levels.max() >= 1 << bits:
            raise ValueError(f"{bits}-bit values out of range")
    dtype = np.float32 if b.mins is not None and _scale_dtype(b.mins) == np.float32 else _scale_dtype(b.scales)
    dev = lambda a: None if a is None else jnp.asarray(a)
    return _pack(dev(b.q), dev(b.scales), dev(b.mins), bits, dtype, jnp.dtype(compute_dtype).name)


@partial(jax.jit, static_argnums=(3, 4, 5))
def _pack(q, scales, mins, bits: int, scale_dtype, compute_dtype: str) -> QuantizedWeight:
    """q int8 [N, K], scales/mins [N, K/G] -> QuantizedWeight, on the device."""
    values, high = q.astype(jnp.int8), None
    if bits < 8:
        levels = (q.astype(jnp.int16) + (level_offset(bits) if mins is None else 0)).astype(jnp.uint8)
        values = interleave(levels & 15, 2, 4)
        if bits > 4:
            high = interleave(levels >> 4, PLANE_SLICES[bits], bits - 4)
    cols = lambda a: None if a is None else a.T.astype(scale_dtype)
    if mins is not None and jnp.dtype(scale_dtype) == jnp.float16:
        return QuantizedWeight(values, pair(cols(scales), cols(mins)), None, high, bits, compute_dtype)
    return QuantizedWeight(values, cols(scales), cols(mins), high, bits, compute_dtype)


def pair(scales: jax.Array, mins: jax.Array) -> jax.Array:
    """float16 scales and minimums [K/G, N] -> uint32 [K/G, N], the scale in the low half."""
    return jax.lax.bitcast_convert_type(jnp.stack([scales, mins], axis=-1), jnp.uint32)


# ---- quantizing dense weights --------------------------------------------------

@partial(jax.jit, static_argnums=(1, 2))
def _quantize_rows(w: jax.Array, bits: int, group_size: int, importance: Optional[jax.Array] = None):
    """Dense rows w [N, K] -> (q int8 [N, K], scales, mins or None [N, K/G]).
    8 bits: symmetric, scale = max|w| / 127 (llama.cpp's Q8_0). 4 bits: asymmetric
    (Q4_1's form: 16 levels from a minimum), the range searched per group. Scales and minimums are rounded to
    float16 first, so the values are chosen for the scales actually stored.
    importance [K] (4 bits): how much an error on each input costs, the mean square
    of that input over calibration text (`calibration.py`); the search and the
    refits then minimise the weighted squared error. None weighs inputs alike."""
    N, K = w.shape
    g = w.astype(jnp.float32).reshape(N, K // group_size, group_size)
    f16 = lambda a: a.astype(jnp.float16).astype(jnp.float32)
    safe_inv = lambda a: jnp.where(a > 0, 1 / jnp.where(a > 0, a, 1), 0)
    if bits == 8:
        scale = f16(jnp.abs(g).max(-1) / 127)
        q = jnp.clip(jnp.round(g * safe_inv(scale)[..., None]), -127, 127)
        return q.astype(jnp.int8).reshape(N, K), scale, None
    if importance is None:
        a = jnp.ones((1, K // group_size, group_size), jnp.float32)
    else:  # normalised per group, so a group's weights sum to G and all-zero inputs count alike
        a = importance.astype(jnp.float32).reshape(1, K // group_size, group_size)
        total = a.sum(-1, keepdims=True)
        a = jnp.where(total > 0, a * group_size / jnp.where(total > 0, total, 1), 1.0)
    mean = lambda v: (a * v).sum(-1, keepdims=True) / a.sum(-1, keepdims=True)
    g_mean = mean(g)[..., 0]

    # Clipping the range of a group trades a few large errors for finer steps
    # everywhere else; try ranges shrunk at either end and keep, per group, the one
    # with the least squared error (a small version of llama.cpp's make_qkx search).
    # Ends shrunk independently beat shrinking both alike on a 1,270-token text
    # (Gemma 3 270M: +4.1% NLL against +5.2%; benchmarks/NOTES.md).
    def candidate(fractions):
        low, high = fractions[0], fractions[1]
        lo = f16(g.min(-1) * low)
        scale = f16((g.max(-1) * high - g.min(-1) * low) / 15)
        q = jnp.clip(jnp.round((g - lo[..., None]) * safe_inv(scale)[..., None]), 0, 15)
        for _ in range(2):  # refit scale and minimum to the chosen levels (weighted least squares)
            qm = mean(q)
            var = (a * (q - qm) ** 2).sum(-1)
            fit = jnp.where(var > 0, (a * (q - qm) * g).sum(-1) / jnp.where(var > 0, var, 1), scale)
            scale = f16(jnp.maximum(fit, 0))
            lo = f16(g_mean - scale * qm[..., 0])
            q = jnp.clip(jnp.round((g - lo[..., None]) * safe_inv(scale)[..., None]), 0, 15)
        err = jnp.sum(a * (q * scale[..., None] + lo[..., None] - g) ** 2, axis=-1)
        return err, q, scale, lo

    def keep_better(best, fractions):  # a loop, not an unrolled search: compiles once
        new = candidate(fractions)
        better = new[0] < best[0]
        return tuple(jnp.where(better[..., None] if old.ndim == 3 else better, n, old)
                     for old, n in zip(best, new)), None
    search = jnp.asarray(CLIP_SEARCH, jnp.float32)
    best, _ = jax.lax.scan(keep_better, candidate(search[0]), search[1:])
    _, q, scale, lo = best
    return q.astype(jnp.int8).reshape(N, K), scale, lo


def quantize_weight(w: jax.Array, mode: str, group_size: int = 32,
                    importance: Optional[jax.Array] = None):
    """A dense [K, N] weight -> QuantizedWeight (int8, int4) or Fp8Weight (fp8: one scale
    per output, group_size and importance unused) computing in w's dtype, on the device.
    importance [K]: the mean square of each input over calibration text (int4)."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r} (choose from {', '.join(MODES)})")
    if mode == "fp8":
        return jax.jit(to_fp8)(w)
    K, N = w.shape
    if K % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input width {K}")
    if importance is not None and importance.shape != (K,):
        raise ValueError(f"importance has shape {importance.shape}; the weight has {K} inputs")
    bits = MODES[mode] if N % 2 == 0 else 8
    q, scales, mins = _quantize_rows(w.T, MODES[mode], group_size, importance)
    return _pack(q, scales, mins, bits, jnp.float16, jnp.dtype(w.dtype).name)


def quantize(params, mode: str, group_size: int = 32, embeddings: str | None = "int8",
             importance=None):
    """Quantize a dense Params pytree (bf16, float32, or a Hugging Face checkpoint).

    Every layer projection becomes `mode`: "int8" or "int4" with groups of
    `group_size` inputs, or "fp8" (e4m3, one scale per output; activations rounded
    to e4m3 per row at run time). The embedding table (and untied output head) become
    `embeddings` ("int8" by default; None keeps them dense): the output layer is
    the most sensitive to quantization, which is why llama.cpp's 4-bit files keep
    it at 6 or 8 bits.

    importance: per layer, a dict from projection name to the mean square [K] of its
    inputs over calibration text, as `calibration.input_importance` returns. int4
    then fits each group's range to the inputs that matter (llama.cpp's imatrix).
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r} (choose from {', '.join(MODES)})")
    if embeddings is not None and embeddings not in MODES:
        raise ValueError(f"unknown embeddings mode {embeddings!r}")
    if importance is not None and len(importance) != len(params.layers):
        raise ValueError(f"importance has {len(importance)} layers; the model has {len(params.layers)}")

    layers = tuple(quantize_layer(layer, mode, group_size, None if importance is None else importance[i])
                   for i, layer in enumerate(params.layers))
    params = params.replace(layers=layers)
    if embeddings is not None:
        if not isinstance(params.embed, (QuantizedWeight, Fp8Weight)):  # stored [V, D]; quantized as the [D, V] head
            params = params.replace(embed=quantize_weight(params.embed.T, embeddings, group_size))
        if params.lm_head is not None:
            params = params.replace(lm_head=_quantized(params.lm_head, embeddings, group_size))
    return params


def quantize_layer(layer, mode: str, group_size: int = 32, importance: dict | None = None):
    """One layer's projections as `quantize` makes them (already quantized ones kept):
    what init_params(each_layer=...) applies as each random layer is made, so a
    model whose dense weights would not fit is made quantized."""
    return layer.replace(**{name: _quantized(getattr(layer, name), mode, group_size,
                                             None if importance is None else importance.get(name))
                            for name in PROJECTIONS})


def _quantized(w, mode: str, group_size: int, importance=None):
    if isinstance(w, (QuantizedWeight, Fp8Weight)) or (
            isinstance(w, Experts) and isinstance(w.w, (QuantizedWeight, Fp8Weight))):
        return w
    if isinstance(w, Experts):  # each expert alone, stacked again
        return stack_experts([quantize_weight(e, mode, group_size) for e in w.w])
    return quantize_weight(dense(w), mode, group_size, importance)


def stack_experts(weights: list) -> Experts:
    """Experts from one QuantizedWeight (or Fp8Weight) per expert, alike in shape and format."""
    return Experts(jax.tree.map(lambda *arrays: jnp.stack(arrays), *weights))


def dequantize_params(params):
    """Every QuantizedWeight (and quantized Experts) replaced by its dense weight
    (training, export)."""
    is_q = lambda x: isinstance(x, (QuantizedWeight, Fp8Weight, Experts))

    def dense_of(w):
        if isinstance(w, Experts):
            return Experts(w.dense())
        if isinstance(w, Fp8Weight):
            return fp8_dense(w)
        return dequantize(w) if isinstance(w, QuantizedWeight) else w
    if isinstance(params.embed, (QuantizedWeight, Fp8Weight)):  # stored as the [D, V] head; the table is [V, D]
        params = params.replace(embed=dense_of(params.embed).T)
    return jax.tree.map(dense_of, params, is_leaf=is_q)


def weight_bytes(params) -> int:
    """Bytes of every array in the params, quantized or not."""
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
