"""Matrix-vector products through routed experts: y [P, N] with y[p] = x[p] @ W[ids[p]]
for a few (token, expert) pairs p (decode) and a stack of expert weights W [E, K, N]
(`weights.Experts`: dense, or a QuantizedWeight with a leading E axis).

XLA's route (ops._experts_gathered) gathers the routed experts' weights as a
[P, K, N] operand of its dot (fused into it on the H200, at 1.2-3.4 TB/s, slowest at
batch 1 and for int8 experts: benchmarks/NOTES.md). Here each program reads its
expert's weights in place:
the expert id of its pair is loaded from `ids`, and the stack, flattened to
[E * K, N] (quantized: values [E * Nv, K], scales [E * K/G, N]), is read from that
expert's first row. Programs: blocks of columns x splits of K x pairs, K split until
about target_programs programs, as in kernels/matvec.py and kernels/qmatvec.py (whose
kernel reads quantized experts, `routed=True`); the float32 partial sums over the
splits are added afterwards.

A pair per program row means a batch whose tokens share an expert reads it once per
token: the route for a few pairs only (policy.moe_route). Many pairs of quantized
experts take `expert_matmul_pallas`: the pairs sorted by expert into blocks of
block_m rows (each expert's rows padded to whole blocks), each block multiplied by its
expert's tiles, dequantized in registers, on the tensor cores (qmatvec's qmatmul
kernel, `routed=True`); XLA's grouped route (ragged_dot) would first dequantize every
expert into memory. Dense experts keep ragged_dot there.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..policy import KERNEL_BITS, ExpertTiling, QMatmulTiling, QMatvecTiling
from ..weights import Experts, QuantizedWeight
from . import qmatvec
from .matvec import _plan, _pow2


def expert_matvec_reference(x: jax.Array, w: Experts, ids: jax.Array) -> jax.Array:
    """float32 [P, N]: row p of x [P, K] through expert ids[p] (XLA: the gathered weights)."""
    return jnp.einsum("pk,pkn->pn", x, w.dense(ids).astype(x.dtype), preferred_element_type=jnp.float32)


def _dense_kernel(ids_ref, x_ref, w_ref, o_ref, *, K, N, block_n, block_k, steps):
    j, split, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row0 = ids_ref[p] * K  # the expert's first row in the flattened stack [E * K, N]
    col_ok = j * block_n + jnp.arange(block_n) < N

    def body(i, acc):
        k0 = (split * steps + i) * block_k
        k_ok = k0 + jnp.arange(block_k) < K
        w = plgpu.load(w_ref.at[pl.ds(row0 + k0, block_k), pl.ds(j * block_n, block_n)],
                       mask=k_ok[:, None] & col_ok[None, :], other=0.0).astype(jnp.float32)
        x = plgpu.load(x_ref.at[pl.ds(p, 1), pl.ds(k0, block_k)], mask=k_ok[None, :],
                       other=0.0).astype(jnp.float32)
        return acc + jnp.sum(x[:, :, None] * w[None, :, :], axis=1)  # [1, block_n]

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((1, block_n), jnp.float32))
    plgpu.store(o_ref.at[split, pl.ds(p, 1), pl.ds(j * block_n, block_n)], acc, mask=col_ok[None, :])


@functools.partial(jax.jit, static_argnames=("tiling", "qtiling", "int8_activations", "interpret"))
def expert_matvec_pallas(x: jax.Array, w: Experts, ids: jax.Array, *, tiling: ExpertTiling = ExpertTiling(),
                         qtiling: QMatvecTiling | None = None, int8_activations: bool = True,
                         interpret: bool = False) -> jax.Array:
    """float32 [P, N]: row p of x [P, K] through expert ids[p] [P] of w, reading only
    those experts' weights. Dense experts take `tiling`; quantized ones (4 or 8 bits)
    kernels/qmatvec.py's kernel with `qtiling` (default: the policy's for the width)
    and, with int8_activations, its integer dot products."""
    P, K = x.shape
    E, wK, N = w.shape
    if wK != K:
        raise ValueError(f"input width {K} does not match the experts' {w.shape}")
    ids = ids.astype(jnp.int32)
    params = lambda t: None if interpret else plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)
    if isinstance(w.w, QuantizedWeight):
        return _quantized(x, w.w, ids, E, K, N, qtiling, int8_activations, interpret, params)
    if not isinstance(w.w, jax.Array):
        raise ValueError(f"expert_matvec_pallas reads dense or quantized experts, not {type(w.w).__name__}")
    col_blocks, splits, steps = _plan(1, K, N, tiling.block_n, tiling.block_k, max(1, tiling.target_programs // P))
    kernel = functools.partial(_dense_kernel, K=K, N=N, block_n=tiling.block_n, block_k=tiling.block_k,
                               steps=steps)
    partial_sums = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((splits, P, N), jnp.float32),
        grid=(col_blocks, splits, P), interpret=interpret, compiler_params=params(tiling),
    )(ids, x, w.w.reshape(E * K, N))
    return partial_sums.sum(0)


def _quantized(x, w: QuantizedWeight, ids, E, K, N, tiling, int8_activations, interpret, params):
    if w.bits not in KERNEL_BITS:
        raise ValueError(f"expert_matvec_pallas handles {KERNEL_BITS}-bit experts, not {w.bits}-bit")
    tiling = tiling or qmatvec.qmatvec_tiling(w.bits)
    P = x.shape[0]
    Nv, G = w.values.shape[1], K // w.scales.shape[1]
    groups = max(1, min(tiling.block_k, _pow2(K)) // G)
    row_blocks, splits, steps = _plan(1, K, Nv, tiling.block_n, G * groups, max(1, tiling.target_programs // P))
    kernel = functools.partial(qmatvec._kernel, M=1, gated=None, int8_x=int8_activations, interpret=interpret,
                               routed=True, K=K, Nv=Nv, G=G, bits=w.bits, block_n=tiling.block_n,
                               groups=groups, steps=steps)
    flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])
    operands = (ids, x, flat(w.values), flat(w.scales)) + ((flat(w.mins),) if w.mins is not None else ())
    partial_sums = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((splits, P, N), jnp.float32),
        grid=(row_blocks, splits, P), interpret=interpret, compiler_params=params(tiling),
    )(*operands)
    return partial_sums.sum(0)


class ExpertBlocks(NamedTuple):
    """Pairs sorted by expert into blocks of rows (sort_into_blocks): pair p (in sorted
    order `order[p]`) goes to padded row dest[p]; block b holds expert block_expert[b]'s
    rows, or none (-1)."""

    order: jax.Array  # [P]
    dest: jax.Array  # [P]
    block_expert: jax.Array  # [blocks], int32


def sort_into_blocks(ids: jax.Array, n_experts: int, block_m: int) -> ExpertBlocks:
    """The blocks of block_m rows that pairs routed to ids [P] fill, each expert's rows
    padded to whole blocks. The block count is static: at most cdiv(P, block_m) plus one
    partial block per expert that has rows."""
    P = ids.shape[0]
    ids = ids.astype(jnp.int32)
    sizes = jnp.bincount(ids, length=n_experts)
    blocks_per = (sizes + block_m - 1) // block_m
    block_end = jnp.cumsum(blocks_per)
    block_start = block_end - blocks_per
    b = jnp.arange(pl.cdiv(P, block_m) + min(n_experts, P))
    block_expert = jnp.where(b < block_end[-1], jnp.searchsorted(block_end, b, side="right"), -1)
    order = jnp.argsort(ids, stable=True)
    sorted_ids = ids[order]
    rank = jnp.arange(P) - (jnp.cumsum(sizes) - sizes)[sorted_ids]  # place among its expert's rows
    return ExpertBlocks(order, block_start[sorted_ids] * block_m + rank, block_expert.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def expert_matmul_pallas(x: jax.Array, w: Experts, blocks: ExpertBlocks, *, tiling: QMatmulTiling,
                         interpret: bool = False) -> jax.Array:
    """float32 [P, N]: row p of x [P, K] through the expert `blocks` routes it to, for
    quantized experts (4 or 8 bits) and blocks of tiling.block_m rows (sort_into_blocks).
    A block multiplies its [block_m, K] rows by its expert's tiles, dequantized in
    registers, on the tensor cores; blocks of padding are skipped."""
    q = w.w
    if not isinstance(q, QuantizedWeight) or q.bits not in KERNEL_BITS:
        raise ValueError(f"expert_matmul_pallas reads {KERNEL_BITS}-bit quantized experts")
    P, K = x.shape
    E, _, N = w.shape
    bm, n_blocks = tiling.block_m, blocks.block_expert.shape[0]
    xp = jnp.zeros((n_blocks * bm, K), x.dtype).at[blocks.dest].set(x[blocks.order])
    Nv, G = q.values.shape[1], K // q.scales.shape[1]
    groups = max(1, min(tiling.block_k, _pow2(K)) // G)
    row_blocks, splits, steps = _plan(bm, K, Nv, tiling.block_n, G * groups,
                                      max(1, tiling.target_programs // n_blocks))
    kernel = functools.partial(qmatvec._matmul_kernel, block_m=bm, split_k=splits > 1, routed=True, K=K,
                               Nv=Nv, G=G, bits=q.bits, block_n=tiling.block_n, groups=groups, steps=steps)
    flat = lambda a: a.reshape(-1, a.shape[-1])
    operands = (blocks.block_expert, xp, flat(q.values), flat(q.scales)) + (
        (flat(q.mins),) if q.mins is not None else ())
    out_shape = (splits, n_blocks * bm, N) if splits > 1 else (n_blocks * bm, N)
    y = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
        grid=(n_blocks, row_blocks, splits), interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=tiling.num_warps,
                                                                    num_stages=tiling.num_stages),
    )(*operands)
    y = (y.sum(0) if splits > 1 else y)[blocks.dest]
    return jnp.zeros((P, N), jnp.float32).at[blocks.order].set(y)
