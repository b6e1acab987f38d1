"""Small-batch matrix-vector products with blockwise-quantized weights, the
dequantization done in registers: y [M, N] = x [M, K] @ W [K, N], M <= 4, for a
`QuantizedWeight` (layout in jaxllm/weights.py).

Each program owns a block of value rows (for 4-bit weights, a block of packed rows
gives two blocks of outputs, N/2 apart) and walks its share of K several groups at
a time: it loads the bytes [bn, BK], the groups' scales (and minimums) for the
block's columns, sums q * x within each group, scales the group sums, and keeps
the totals in registers. Several groups a step, so that each row reads whole
128-byte lines (one group, 32 bytes a row, left HBM idle: benchmarks/NOTES.md). K is
split across programs, as in kernels/matvec.py, so that enough bytes are in flight
to fill HBM; partial sums are added afterwards.

The minimum term needs no dequantization: sum_k x_k (s q_k + m) = s (x . q) + m sum_k x_k.

Integer dot products (policy.int8_activations, on by default), as llama.cpp's MMVQ kernels
do: each program rounds its slice of x to int8 with one scale per weight group
(absmax / 127), and the group sums become integer dot products of 4 weights with 4
activations in one instruction (PTX dp4a), where the float path converts every
weight to float32 (a quarter-rate instruction on Hopper) and multiplies it. The
4-bit nibbles of 4 bytes are masked out of one 32-bit word in one instruction.
The rounding of x adds an error of about 0.4% of a group's largest activation per
element, as llama.cpp's Q8_1 activations do; the float path stays as the switch.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..policy import KERNEL_BITS, MAX_ROWS, QMATVEC_TILINGS, QMatmulTiling, QMatvecTiling, matmul_tiling
from ..weights import QuantizedWeight, linear_reference
from .matvec import _plan, _pow2, activate, finish, gated_operand, load_gated

# Per 4 packed bytes (pack=4 puts 4 consecutive elements of a thread in one 32-bit
# register): the dot product of the weight levels with the activations, in the first
# of the 4 outputs, zeros in the others, so that a sum over each group is unchanged.
# One asm per output: jax's lowering of a multi-output inline asm returns one value.
_DP4A = {
    "int8": "dp4a.s32.s32 $0, $4, $5, 0;",
    # 4 bits: the low nibbles of the 4 bytes (one output row), or the high ones (another)
    "low": "{\n.reg .b32 w;\nand.b32 w, $4, 0x0F0F0F0F;\ndp4a.u32.s32 $0, w, $5, 0;\n}",
    "high": "{\n.reg .b32 w;\nshr.u32 w, $4, 4;\nand.b32 w, w, 0x0F0F0F0F;\ndp4a.u32.s32 $0, w, $5, 0;\n}",
}
_ZEROS = "\nmov.b32 $1, 0;\nmov.b32 $2, 0;\nmov.b32 $3, 0;"


def qmatvec_reference(x: jax.Array, w: QuantizedWeight, out_dtype=None) -> jax.Array:
    """The XLA path with the kernel's signature."""
    return linear_reference(x, w, out_dtype)


def _unpack(v, h: int, bits: int, has_mins: bool):
    """float32 levels of the value tile: int8, or 4-bit half h (low/high nibbles)."""
    if bits == 8:
        return v.astype(jnp.float32)
    nibble = (v >> 4) if h else (v & 15)
    return nibble.astype(jnp.float32) - (0.0 if has_mins else 8.0)


def _quantize_activations(x, groups: int, G: int):
    """x [1, groups * G] float32 rounded to int8 per group: (levels int8 [1, groups * G],
    scales [groups], level sums [groups]) with x ~ level * scale."""
    x3 = x.reshape(groups, G)
    amax = jnp.max(jnp.abs(x3), axis=1)
    inv = jnp.where(amax > 0, 127.0 / amax, 0.0)
    levels = jnp.floor(x3 * inv[:, None] + 0.5)  # |levels| <= 127
    return levels.astype(jnp.int8).reshape(x.shape), amax * (1.0 / 127.0), jnp.sum(levels, axis=1)


def _group_dots(v, levels, bits: int, groups: int, G: int, interpret: bool):
    """Per half of the value tile v [bn, BK] (one for int8, the low and high nibbles
    for 4 bits), int32 [bn, groups]: the integer dot products over each group of the
    weight levels (unsigned for 4 bits) with the int8 levels [1, BK]."""
    bn, BK = v.shape
    levels = jnp.broadcast_to(levels, v.shape)
    if interpret:  # the same group sums, one product per element
        x = levels.astype(jnp.int32)
        halves = (v.astype(jnp.int32) * x,) if bits == 8 else (
            (v & 15).astype(jnp.int32) * x, (v >> 4).astype(jnp.int32) * x)
    else:
        halves = [plgpu.elementwise_inline_asm(
            _DP4A[half] + _ZEROS, args=[v, levels], constraints="=r,=r,=r,=r,r,r", pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.int32)])[0]
            for half in (("int8",) if bits == 8 else ("low", "high"))]
    return tuple(jnp.sum(d.reshape(bn, groups, G), axis=2) for d in halves)


def _halves(bits: int, Nv: int) -> tuple[int, ...]:
    """First output column of each half a value row holds: one for int8, two (N/2 apart) for 4-bit."""
    return (0,) if bits == 8 else (0, Nv)


def _step(v_ref, s_ref, m_ref, i, *, j, split, K, Nv, G, bits, block_n, groups, steps, expert=0):
    """What loop step i of program (j, split) reads, in both kernels: the inputs' offset
    k0 and mask [BK], the value tile [bn, BK], and per half the groups' scales and
    minimums [groups, bn] in float32 (minimums None without). expert: the weight's
    index in a stack of experts whose arrays are flattened to [E * Nv, K] and
    [E * K/G, N] (kernels/expert_matvec.py; 0 for one weight)."""
    BK = G * groups
    k0 = (split * steps + i) * BK
    k_ok = k0 + jnp.arange(BK) < K
    g0 = k0 // G
    g_ok = g0 + jnp.arange(groups) < K // G
    vrow_ok = j * block_n + jnp.arange(block_n) < Nv
    v = plgpu.load(v_ref.at[pl.ds(expert * Nv + j * block_n, block_n), pl.ds(k0, BK)],
                   mask=vrow_ok[:, None] & k_ok[None, :], other=0)
    mask = g_ok[:, None] & vrow_ok[None, :]
    group_params = []
    for col0 in _halves(bits, Nv):
        at = (pl.ds(expert * (K // G) + g0, groups), pl.ds(col0 + j * block_n, block_n))
        if s_ref.dtype == jnp.uint32:  # float16 (scale, minimum) pairs, one load (quant.unpair per word)
            pairs = plgpu.load(s_ref.at[at], mask=mask, other=0)
            half = lambda u: jax.lax.bitcast_convert_type(u.astype(jnp.uint16), jnp.float16)
            scales, mins = half(pairs & 0xFFFF), half(pairs >> 16)
        else:
            scales = plgpu.load(s_ref.at[at], mask=mask, other=0.0)
            mins = None if m_ref is None else plgpu.load(m_ref.at[at], mask=mask, other=0.0)
        group_params.append((scales.astype(jnp.float32), None if mins is None else mins.astype(jnp.float32)))
    return k0, k_ok, v, group_params


def _kernel(*refs, M, gated, int8_x, interpret, routed=False, **tiling):
    """routed: the first ref holds an expert id per row of x [P, K] (a third grid axis
    over those rows), and each row is multiplied by its expert's weights (M = 1)."""
    ids_ref, (x_ref, v_ref, s_ref, *rest) = (refs[0], refs[1:]) if routed else (None, refs)
    m_ref = rest[0] if len(rest) == 2 else None  # separate float32 minimums
    o_ref = rest[-1]
    j, split = pl.program_id(0), pl.program_id(1)
    row0 = pl.program_id(2) if routed else 0
    expert = ids_ref[row0] if routed else 0
    G, block_n, Nv, bits = tiling["G"], tiling["block_n"], tiling["Nv"], tiling["bits"]
    BK = G * tiling["groups"]  # inputs per step: several groups, so each row reads >= 128 contiguous bytes
    halves = _halves(bits, Nv)

    def body(i, accs):
        k0, k_ok, v, group_params = _step(v_ref, s_ref, m_ref, i, j=j, split=split, expert=expert, **tiling)
        if gated is None:
            xs = [plgpu.load(x_ref.at[pl.ds(row0 + r, 1), pl.ds(k0, BK)], mask=k_ok[None, :],
                             other=0.0).astype(jnp.float32) for r in range(M)]  # M x [1, BK]
        else:
            xs = []
            for r in range(M):
                gate, up = load_gated(x_ref, pl.ds(r, 1), k0, BK, k_ok[None, :], gated[0], tiling["K"])
                xs.append(activate(gate, gated[1]) * up)
        new = list(accs)
        if int8_x:
            for r in range(M):
                levels, x_scale, level_sum = _quantize_activations(xs[r], tiling["groups"], G)
                dots = _group_dots(v, levels, bits, tiling["groups"], G, interpret)
                for h, ((s, mn), d) in enumerate(zip(group_params, dots)):
                    per_group = d.astype(jnp.float32)
                    if bits < 8 and mn is None:  # symmetric: level - 8
                        per_group = per_group - (1 << (bits - 1)) * level_sum[None, :]
                    out = jnp.sum(per_group * (s.T * x_scale[None, :]), axis=1)  # [bn]
                    if mn is not None:  # the rounded x here too: its error is then x's times w
                        out = out + jnp.sum(mn * (level_sum * x_scale)[:, None], axis=0)
                    new[h * M + r] = new[h * M + r] + out
            return tuple(new)
        for h, (s, mn) in enumerate(group_params):
            q3 = _unpack(v, h, bits, mn is not None).reshape(block_n, tiling["groups"], G)
            for r in range(M):
                x3 = xs[r].reshape(tiling["groups"], G)
                per_group = jnp.sum(q3 * x3[None, :, :], axis=2)  # [bn, groups]
                out = jnp.sum(per_group * s.T, axis=1)  # [bn]
                if mn is not None:
                    out = out + jnp.sum(mn * jnp.sum(x3, axis=1)[:, None], axis=0)
                new[h * M + r] = new[h * M + r] + out
        return tuple(new)

    zeros = tuple(jnp.zeros((block_n,), jnp.float32) for _ in range(len(halves) * M))
    accs = jax.lax.fori_loop(0, tiling["steps"], body, zeros)
    vrow_ok = j * block_n + jnp.arange(block_n) < Nv
    for h, col0 in enumerate(halves):
        for r in range(M):
            plgpu.store(o_ref.at[split, pl.ds(row0 + r, 1), pl.ds(col0 + j * block_n, block_n)],
                        accs[h * M + r][None, :], mask=vrow_ok[None, :])


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiling", "block_n", "block_k", "target_programs",
                                             "num_warps", "num_stages", "interpret", "sum_splits",
                                             "int8_activations"))
def qmatvec_pallas(x: jax.Array, w: QuantizedWeight, out_dtype=None, *,
                   tiling: Optional[QMatvecTiling] = None, block_n: int | None = None,
                   block_k: int | None = None, target_programs: int | None = None,
                   num_warps: int | None = None, num_stages: int | None = None,
                   interpret: bool = False, sum_splits: bool = True,
                   int8_activations: bool = True):
    """x [M, K] @ W [K, N] for M <= 4 and a QuantizedWeight W; float32 accumulation.
    x may be a `GatedInput` (whose dtype is float32). int8_activations: x rounded to
    int8 per weight group and integer dot products. Tiling arguments left None take
    `tiling`'s (default: the policy's default for the weight's width)."""
    default = tiling or qmatvec_tiling(w.bits)
    block_n, block_k = block_n or default.block_n, block_k or default.block_k
    target_programs = target_programs or default.target_programs
    num_warps, num_stages = num_warps or default.num_warps, num_stages or default.num_stages
    _, M, _, _ = gated_operand(x)
    if M > MAX_ROWS:
        raise ValueError(f"qmatvec_pallas handles at most {MAX_ROWS} rows, got {M}")
    return _launch(functools.partial(_kernel, int8_x=int8_activations, interpret=interpret), x, w, out_dtype,
                   block_n, block_k, target_programs, num_warps, num_stages, interpret,
                   "qmatvec_pallas", with_rows=True, sum_splits=sum_splits)


def qmatvec_tiling(bits: int) -> QMatvecTiling:
    """The default tiling for weights of `bits` (other widths than KERNEL_BITS fail later)."""
    return dict(QMATVEC_TILINGS).get(bits, dict(QMATVEC_TILINGS)[8])


def _launch(kernel, x, w: QuantizedWeight, out_dtype, block_n, block_k, target_programs, num_warps,
            num_stages, interpret, name, with_rows, sum_splits=True):
    """The grid both kernels share: blocks of value rows x splits of K, each program
    writing partial sums [rows, N] that are added afterwards. x's rows are passed to
    the kernel as M (with_rows) or taken from its (padded) shape."""
    if w.bits not in KERNEL_BITS:
        raise ValueError(f"{name} handles {KERNEL_BITS}-bit weights, not {w.bits}-bit")
    x, M, K, gated = gated_operand(x)
    N = w.shape[1]
    G = w.group_size
    Nv = w.values.shape[0]
    groups = max(1, min(block_k, _pow2(K)) // G)  # groups per step (a power of two)
    row_blocks, splits, steps = _plan(M, K, Nv, block_n, G * groups, target_programs)
    kernel = functools.partial(kernel, K=K, Nv=Nv, G=G, bits=w.bits,
                               block_n=block_n, groups=groups, steps=steps,
                               **({"M": M, "gated": gated} if with_rows else {}))
    operands = (x, w.values, w.scales) + ((w.mins,) if w.mins is not None else ())  # else paired or none
    compiler_params = None
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    partial_sums = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, M, N), jnp.float32),
        grid=(row_blocks, splits),
        interpret=interpret,
        compiler_params=compiler_params,
    )(*operands)
    return finish(partial_sums, out_dtype or x.dtype, sum_splits)


# ---- batches of 5 rows and more: the dequantized tile feeds a tensor-core dot ----

def _matmul_kernel(*refs, block_m, split_k, routed=False, **tiling):
    """routed: the first ref holds the expert of each block of block_m rows of x (-1: a
    block of padding, skipped), the weights a flattened stack (_step's expert)."""
    blocks_ref, (x_ref, v_ref, s_ref, *rest) = (refs[0], refs[1:]) if routed else (None, refs)
    m_ref = rest[0] if len(rest) == 2 else None  # separate float32 minimums
    o_ref = rest[-1]
    i_m, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    expert = blocks_ref[i_m] if routed else 0
    if routed:
        pl.when(expert >= 0)(lambda: _matmul_program(x_ref, v_ref, s_ref, m_ref, o_ref, i_m, j, split,
                                                     jnp.maximum(expert, 0), block_m, split_k, tiling))
    else:
        _matmul_program(x_ref, v_ref, s_ref, m_ref, o_ref, i_m, j, split, 0, block_m, split_k, tiling)


def _matmul_program(x_ref, v_ref, s_ref, m_ref, o_ref, i_m, j, split, expert, block_m, split_k, tiling):
    G, block_n, Nv, bits = tiling["G"], tiling["block_n"], tiling["Nv"], tiling["bits"]
    BK = G * tiling["groups"]
    halves = _halves(bits, Nv)
    rows = pl.ds(i_m * block_m, block_m)

    def body(i, accs):
        k0, k_ok, v, group_params = _step(v_ref, s_ref, m_ref, i, j=j, split=split, expert=expert, **tiling)
        x = plgpu.load(x_ref.at[rows, pl.ds(k0, BK)], mask=k_ok[None, :], other=0.0)  # [block_m, BK]
        new = []
        for h, (s, mn) in enumerate(group_params):
            w = _unpack(v, h, bits, mn is not None).reshape(block_n, tiling["groups"], G) * s.T[:, :, None]
            if mn is not None:
                w = w + mn.T[:, :, None]
            w = w.reshape(block_n, BK).astype(x.dtype)
            new.append(accs[h] + plgpu.dot(x, w, trans_b=True))  # [block_m, bn], float32
        return tuple(new)

    zeros = tuple(jnp.zeros((block_m, block_n), jnp.float32) for _ in halves)
    accs = jax.lax.fori_loop(0, tiling["steps"], body, zeros)
    vrow_ok = j * block_n + jnp.arange(block_n) < Nv
    for h, col0 in enumerate(halves):
        cols = pl.ds(col0 + j * block_n, block_n)
        at = o_ref.at[split, rows, cols] if split_k else o_ref.at[rows, cols]
        plgpu.store(at, accs[h].astype(o_ref.dtype), mask=vrow_ok[None, :])


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiling", "block_m", "block_n", "block_k",
                                             "target_programs", "num_warps", "num_stages", "interpret"))
def qmatmul_pallas(x: jax.Array, w: QuantizedWeight, out_dtype=None, *,
                   tiling: Optional[QMatmulTiling] = None, block_m: int | None = None,
                   block_n: int | None = None, block_k: int | None = None,
                   target_programs: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None, interpret: bool = False) -> jax.Array:
    """x [M, K] @ W [K, N], any M: each program dequantizes a [block_n, block_k] tile in
    registers (in x's dtype) and multiplies it with a [block_m, block_k] tile of x on
    the tensor cores (float32 x: TF32); float32 accumulation. The XLA path writes the
    whole dequantized weight to memory and reads it back. Programs: blocks of rows of
    x x blocks of value rows x splits of K (split only while the first two leave fewer
    than target_programs); unsplit, each program writes its outputs in out_dtype.
    Tiling arguments left None take `tiling`'s (default: the policy's for M rows)."""
    M, K = x.shape
    default = tiling or matmul_tiling(M)
    block_m = block_m or min(default.block_m, max(16, _pow2(M)))
    block_n, block_k = block_n or default.block_n, block_k or default.block_k
    target_programs = target_programs or default.target_programs
    num_warps, num_stages = num_warps or default.num_warps, num_stages or default.num_stages
    if w.bits not in KERNEL_BITS:
        raise ValueError(f"qmatmul_pallas handles {KERNEL_BITS}-bit weights, not {w.bits}-bit")
    N, G, Nv = w.shape[1], w.group_size, w.values.shape[0]
    m_blocks = pl.cdiv(M, block_m)
    xp = jnp.pad(x, ((0, m_blocks * block_m - M), (0, 0)))
    groups = max(1, min(block_k, _pow2(K)) // G)
    row_blocks, splits, steps = _plan(M, K, Nv, block_n, G * groups, max(1, target_programs // m_blocks))
    out_dtype = out_dtype or x.dtype
    kernel = functools.partial(_matmul_kernel, block_m=block_m, split_k=splits > 1, K=K, Nv=Nv, G=G,
                               bits=w.bits, block_n=block_n, groups=groups, steps=steps)
    operands = (xp, w.values, w.scales) + ((w.mins,) if w.mins is not None else ())
    out_shape = ((splits, m_blocks * block_m, N), jnp.float32) if splits > 1 else ((m_blocks * block_m, N), out_dtype)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(*out_shape),
        grid=(m_blocks, row_blocks, splits),
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )(*operands)
    return (finish(y, out_dtype, True) if splits > 1 else y)[:M]
