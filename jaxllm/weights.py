"""The kinds of weight a projection can be, at the bottom of the package: every
layer above reads them, none of them imports upward.

  a dense array w [K, N]            (`x @ w`)
  TransposedWeight: w stored by output row, t = w.T [N, K] (layout.py chooses where)
  QuantizedWeight: blockwise-quantized, GGUF's row order (below; quant.py makes them)
  Fp8Weight: float8 (e4m3) output rows with one scale per output, multiplied with
             activations rounded to float8 per row (Hopper's FP8 tensor cores)
  InputTap: a weight that records its inputs (calibration.py), standing for its weight

`ops.linear` dispatches on the kind once; the decoder never branches on it.

## QuantizedWeight

A QuantizedWeight stands for a dense [In, Out] = [K, N] weight. It is stored in
GGUF's row order, one row per output, with groups of G consecutive inputs sharing
a scale (and a minimum):

    W[k, n] = scales[k // G, n] * q[n, k] + mins[k // G, n]      (mins: 0 if None)

  bits 8:    values int8 [N, K] hold q.
  bits 4:    values uint8 [N/2, K] hold two nibbles per byte: the low nibble is
             output row i, the high nibble row i + N/2 ("row-split" packing).
  bits 5, 6: the low 4 bits as for 4 bits, and `high` uint8 [N/R, K] the remaining
             1 or 2 bits of R = 8 or 4 row slices N/R apart (slice r at bit
             r * (bits - 4)). Q5_0/Q5_1/Q5_K and Q6_K keep their file's size this way.
  Levels below 8 bits are unsigned: without mins q = level - 2^(bits-1)
  (symmetric, Q4_0/Q5_0/Q6_K), with mins q = level (Q4_1, Q4_K, Q5_K).

Why row-split packing rather than neighbouring inputs in one byte: each half of
the output is then a plain elementwise dequantization of the same bytes, which
XLA:CPU fuses into its matrix-vector loop, faster than float32 weights, where nibble
pairs along K need per-element index arithmetic that does not vectorise
(benchmarks/NOTES.md). On the GPU the Pallas kernel
(kernels/qmatvec.py) unpacks both halves from one load.

Scales are [K/G, N] so a GPU program reads the scales of its output columns
contiguously. GGUF's float16 scales stay float16; K-quant scales (a float16 super
scale times a 6-bit sub-scale) are kept in float32 when float16 cannot hold them
exactly, so repacking loses nothing beyond the file's own quantization.

float16 minimums are paired with their scales: `scales` is then uint32 [K/G, N],
the scale in the low 16 bits and the minimum in the high 16, and `mins` is None.
The GPU kernels then read one 32-bit word per group and output column where they
read two 16-bit tiles from two arrays (benchmarks/NOTES.md). `group_scales` and `group_mins` read either form.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class QuantizedWeight:
    values: jax.Array  # int8 [N, K] (bits 8) or uint8 [N/2, K] (bits 4-6: the low nibbles)
    scales: jax.Array  # [K/G, N] float16 or float32, or uint32 (scale, minimum) float16 pairs
    mins: Optional[jax.Array] = None  # [K/G, N] float32; None: symmetric, or paired in scales
    high: Optional[jax.Array] = None  # bits 5, 6: uint8 [N/8, K] or [N/4, K], the bits above 4
    bits: int = struct.field(pytree_node=False, default=8)
    compute_dtype: str = struct.field(pytree_node=False, default="float32")

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N): the shape of the dense [in, out] weight this stands for."""
        return self.values.shape[1], self.scales.shape[1]

    @property
    def group_size(self) -> int:
        return self.values.shape[1] // self.scales.shape[0]

    @property
    def paired(self) -> bool:
        """Minimums stored in the high halves of `scales` (module docstring)."""
        return self.scales.dtype == jnp.uint32

    @property
    def has_mins(self) -> bool:
        return self.paired or self.mins is not None

    def group_scales(self) -> jax.Array:
        """float32 [K/G, N]."""
        return (unpair(self.scales)[0] if self.paired else self.scales).astype(jnp.float32)

    def group_mins(self) -> Optional[jax.Array]:
        """float32 [K/G, N], or None for symmetric weights."""
        if self.paired:
            return unpair(self.scales)[1].astype(jnp.float32)
        return None if self.mins is None else self.mins.astype(jnp.float32)

    @property
    def dtype(self):
        """The dtype activations take when multiplied by this weight."""
        return jnp.dtype(self.compute_dtype)

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (self.values, self.scales, self.mins, self.high)
                   if a is not None)


def unpair(pairs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of `pair`."""
    halves = jax.lax.bitcast_convert_type(pairs, jnp.float16)
    return halves[..., 0], halves[..., 1]


def interleave(parts: jax.Array, slices: int, width: int) -> jax.Array:
    """uint8 [N, K] of `width`-bit numbers -> [N/slices, K]: row slice r at bit r * width."""
    rows = parts.reshape(slices, parts.shape[0] // slices, parts.shape[1])
    out = rows[0]
    for r in range(1, slices):
        out = out | (rows[r] << (r * width))
    return out


def _split(packed: jax.Array, slices: int, width: int) -> jax.Array:
    """Inverse of interleave: [N/slices, K] -> uint8 [N, K]. Elementwise in the
    stored bytes, so XLA fuses it into the dot that consumes it."""
    both = jnp.broadcast_to(packed[None], (slices, *packed.shape))
    shifts = (jnp.arange(slices, dtype=jnp.uint8) * width)[:, None, None]
    return ((both >> shifts) & ((1 << width) - 1)).reshape(-1, packed.shape[1])


def permute_outputs(w, order):
    """w (dense [K, N] or a QuantizedWeight standing for one) with its output columns
    in `order` [N] (numpy ints). Packed rows are unpacked, reordered and packed again."""
    if isinstance(w, Fp8Weight):
        return w.replace(t=w.t[order], scales=w.scales[order])
    if not isinstance(w, QuantizedWeight):
        return w[:, order]

    def rows(packed, slices, width):
        return interleave(_split(packed, slices, width)[order], slices, width)
    values = w.values[order] if w.bits == 8 else rows(w.values, 2, 4)
    high = None if w.high is None else rows(w.high, PLANE_SLICES[w.bits], w.bits - 4)
    return w.replace(values=values, scales=w.scales[:, order], high=high,
                     mins=None if w.mins is None else w.mins[:, order])


def pack_by_block(w: QuantizedWeight, blocks: int) -> QuantizedWeight:
    """A packed (4-6-bit) weight's planes repacked so that each of `blocks` equal runs
    of packed rows holds one block of N/blocks outputs, packed as a weight of those
    outputs alone: the layout a device's share of a column-parallel weight needs
    (sharding.py). The whole is no longer one weight's packing: only the blocks are
    read, each on its own device. 8-bit weights come back unchanged."""
    if w.bits == 8:
        return w

    def planes(packed, slices, width):
        rows = _split(packed, slices, width)
        n = rows.shape[0] // blocks
        return jnp.concatenate([interleave(rows[b * n:(b + 1) * n], slices, width) for b in range(blocks)])
    return w.replace(values=planes(w.values, 2, 4),
                     high=None if w.high is None else planes(w.high, PLANE_SLICES[w.bits], w.bits - 4))


def level_offset(bits: int) -> int:
    return 1 << (bits - 1)


PLANE_SLICES = {4: 2, 5: 8, 6: 4, 8: 1}  # rows sharing a byte of the highest plane


def _levels(w: QuantizedWeight) -> jax.Array:
    """q as float32 rows [N, K] (minimums not added)."""
    if w.bits == 8:
        return w.values.astype(jnp.float32)
    levels = _split(w.values, 2, 4)
    if w.high is not None:
        levels = levels | (_split(w.high, PLANE_SLICES[w.bits], w.bits - 4) << 4)
    return levels.astype(jnp.float32) - (0.0 if w.has_mins else level_offset(w.bits))


def _scaled_levels(w: QuantizedWeight, dtype) -> jax.Array:
    """scales * q as rows [N, K] in dtype, minimums not added. Elementwise in the
    stored bytes, so XLA fuses it into the dot that consumes it."""
    N, K = w.shape[1], w.shape[0]
    G = w.group_size
    scales = w.group_scales().T.reshape(N, K // G, 1)
    return (_levels(w).reshape(N, K // G, G) * scales).reshape(N, K).astype(dtype)


def dequantize(w: QuantizedWeight, dtype=None) -> jax.Array:
    """The dense [K, N] weight (reference path, training, tests)."""
    dense = _scaled_levels(w, jnp.float32).T
    if w.has_mins:
        dense = dense + jnp.repeat(w.group_mins(), w.group_size, axis=0)
    return dense.astype(dtype or w.dtype)


def linear_reference(x: jax.Array, w: QuantizedWeight, out_dtype=None) -> jax.Array:
    """x [M, K] @ W [K, N] in XLA, float32 accumulation.

    On the CPU with one row XLA fuses the dequantization into its matrix-vector
    loop; with more rows it dequantizes, then multiplies (benchmarks/NOTES.md)."""
    K, G = w.shape[0], w.group_size
    y = jnp.dot(_scaled_levels(w, x.dtype), x.T, preferred_element_type=jnp.float32).T
    if w.has_mins:
        # sum_k x_k m_g(k) = (sum of x over each group) @ mins: kept out of the big loop.
        group_sums = x.astype(jnp.float32).reshape(x.shape[0], K // G, G).sum(-1)
        y = y + group_sums @ w.group_mins()
    return y.astype(out_dtype or x.dtype)


def take_rows(w: QuantizedWeight, ids: jax.Array) -> jax.Array:
    """Rows ids [...] of the [N, K] row-order matrix (an embedding table [V, D]),
    dequantized: [..., K] in the compute dtype."""
    N, K = w.shape[1], w.shape[0]
    G = w.group_size

    def plane(packed, slices, width):  # the `width`-bit numbers of rows ids
        rows = N // slices
        shift = ((ids // rows) * width).astype(jnp.uint8)[..., None]
        return (packed[ids % rows] >> shift) & ((1 << width) - 1)
    if w.bits == 8:
        q = w.values[ids].astype(jnp.float32)
    else:
        levels = plane(w.values, 2, 4)
        if w.high is not None:
            levels = levels | (plane(w.high, PLANE_SLICES[w.bits], w.bits - 4) << 4)
        q = levels.astype(jnp.float32) - (0.0 if w.has_mins else level_offset(w.bits))
    out = q * jnp.repeat(w.group_scales().T[ids], G, axis=-1)
    if w.has_mins:
        out = out + jnp.repeat(w.group_mins().T[ids], G, axis=-1)
    return out.reshape(*ids.shape, K).astype(w.dtype)




FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448


@struct.dataclass
class Fp8Weight:
    """A weight w [K, N] stored as float8 e4m3 output rows, w[k, n] = t[n, k] * scales[n].
    By output row because FP8 matrix multiplies (cuBLASLt) take both operands with K
    contiguous; an embedding table [V, D] is this layout already, like a QuantizedWeight
    head. `fp8_linear` rounds each row of activations to e4m3 at its own scale."""

    t: jax.Array  # float8_e4m3fn [N, K]
    scales: jax.Array  # float32 [N]
    compute_dtype: str = struct.field(pytree_node=False, default="bfloat16")

    @property
    def shape(self) -> tuple[int, int]:
        return self.t.shape[::-1]

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    @property
    def nbytes(self) -> int:
        return self.t.size + self.scales.size * 4


def to_fp8(w: jax.Array) -> Fp8Weight:
    """A dense [K, N] weight -> Fp8Weight computing in w's dtype: each output column's
    largest magnitude maps to e4m3's largest value (448), rounded to nearest."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=0)
    scales = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    return Fp8Weight((w32 / scales).T.astype(FP8), scales, jnp.dtype(w.dtype).name)


def _fp8_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, 1]): each row at its own scale."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    return (x32 / scale).astype(FP8), scale


def fp8_linear(x: jax.Array, w: Fp8Weight, out_dtype=None) -> jax.Array:
    """x [M, K] @ W [K, N]: x rounded to e4m3 per row, an FP8 x FP8 product with
    float32 accumulation, both scales applied to the result."""
    xq, x_scale = _fp8_rows(x)
    y = jax.lax.dot_general(xq, w.t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * x_scale * w.scales).astype(out_dtype or x.dtype)


def fp8_dense(w: Fp8Weight, dtype=None) -> jax.Array:
    """The dense [K, N] weight."""
    return (w.t.astype(jnp.float32) * w.scales[:, None]).T.astype(dtype or w.dtype)


def fp8_take_rows(w: Fp8Weight, ids: jax.Array) -> jax.Array:
    """Rows ids [...] of the [N, K] table (an embedding table [V, D]): [..., K]."""
    return (w.t[ids].astype(jnp.float32) * w.scales[ids][..., None]).astype(w.dtype)


@struct.dataclass
class TransposedWeight:
    """A weight w [K, N] (`x @ w`) stored as its output rows t = w.T [N, K]. Decode on
    the GPU reads it with kernels/rowmatvec.py; every other path with XLA's dot."""

    t: jax.Array

    @property
    def shape(self):
        return self.t.shape[::-1]

    @property
    def dtype(self):
        return self.t.dtype


@struct.dataclass
class Experts:
    """A mixture-of-experts projection: one weight per expert, `x @ w[e]`, stacked:
    dense [E, K, N], or a QuantizedWeight or Fp8Weight whose every array has a leading
    E axis (a GGUF file's experts kept packed, or quant.quantize's). ops.moe_mlp reads
    it; ops.linear's tables never see one."""

    w: Union[jax.Array, QuantizedWeight, Fp8Weight]

    @property
    def shape(self) -> tuple[int, int, int]:
        if isinstance(self.w, QuantizedWeight):
            return self.w.values.shape[0], self.w.values.shape[-1], self.w.scales.shape[-1]
        if isinstance(self.w, Fp8Weight):
            return self.w.t.shape[0], self.w.t.shape[2], self.w.t.shape[1]
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def kind(self) -> str:
        """"dense", "quantized" or "fp8": how the stacked weights are stored."""
        return kind_of(self.w)

    @property
    def bits(self) -> int:
        return self.w.bits if isinstance(self.w, QuantizedWeight) else 8 * self.w.dtype.itemsize

    def dense(self, experts: Optional[jax.Array] = None) -> jax.Array:
        """The experts' dense weights [E, K, N], or those of the ids `experts` [...] as
        [..., K, N], in the compute dtype (quantized ones dequantized in XLA)."""
        w = self.w if experts is None else jax.tree.map(lambda a: a[experts], self.w)
        if isinstance(w, Fp8Weight):  # t [..., N, K], scales [..., N]
            return jnp.swapaxes(w.t.astype(jnp.float32) * w.scales[..., None], -1, -2).astype(w.dtype)
        if not isinstance(w, QuantizedWeight):
            return w
        one = dequantize
        for _ in range(w.values.ndim - 2):
            one = jax.vmap(one)
        return one(w)


def dense(w):
    """w [K, N] as an array, whether stored so or as a TransposedWeight."""
    return w.t.T if isinstance(w, TransposedWeight) else w


class InputTap:
    """A projection weight that records the sum of squares of its inputs per input
    channel (calibration.py). It exists only inside one trace of the calibration
    pass: the recorded sums are tracers that pass returns, so nothing leaks out."""

    def __init__(self, weight, valid: jax.Array):
        self.weight = weight
        self.valid = valid.astype(jnp.float32).reshape(-1, 1)  # 0 on padding rows
        self.squares: Optional[jax.Array] = None  # [K], summed over every valid row seen

    def observe(self, x: jax.Array) -> None:
        x32 = x.astype(jnp.float32).reshape(-1, x.shape[-1])
        squares = (self.valid * x32 * x32).sum(0)
        self.squares = squares if self.squares is None else self.squares + squares

    @property
    def shape(self):
        return self.weight.shape


KINDS = {TransposedWeight: "by_row", QuantizedWeight: "quantized", Fp8Weight: "fp8", Experts: "experts"}


def kind_of(w) -> str:
    """"dense", "by_row", "quantized", "fp8" or "experts": which table entry of ops.linear
    (or, for experts, ops.moe_mlp) reads w."""
    return KINDS.get(type(w.weight if isinstance(w, InputTap) else w), "dense")


def tied_head(embed):
    """The output head [D, V] of a model whose head is its embedding table: a dense
    table [V, D] is the head stored by output row; a quantized one is stored as the
    head already (quant.quantize, loading/gguf.py), as is an Fp8Weight."""
    return embed if isinstance(embed, (QuantizedWeight, Fp8Weight)) else TransposedWeight(embed)
