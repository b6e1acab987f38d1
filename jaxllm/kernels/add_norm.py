"""The residual add and the norm that follows it, in one launch:
x_new = x + delta, h = norm(x_new) * (offset + scale) [+ bias].

XLA runs this as two or three kernels per site (the add with the split-K sum, the
sum of squares, the scaling), each a launch for a few kB of work; two sites per
layer (benchmarks/NOTES.md, `benchmarks/profile_decode.py`). One
program per row reads the row whole (D <= 16384), so the norm needs no second pass.

delta is an array [M, D] or the split-K partial sums [S, M, D] float32 of a Pallas
matrix-vector kernel (`PartialSums`), which are added here instead of in a separate
reduction kernel.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .matvec import PartialSums, _pow2

# Rows up to policy.add_norm_max_width (16384) are held in registers by one program; it
# adds at most add_norm_max_partial_values partial sums (benchmarks/NOTES.md).
CHUNK_VALUES = 8192  # partial sums read per loop step: chunk rows x padded width


Delta = Union[jax.Array, PartialSums]


def add_norm_reference(x: jax.Array, delta: Delta, scale: jax.Array, bias: Optional[jax.Array], *,
                       layer_norm: bool, eps: float, offset: float):
    """x [M, D] + delta -> (x_new [M, D], norm(x_new) [M, D]) in x's dtype; the norm in
    float32 (RMSNorm, or LayerNorm when layer_norm)."""
    x = x + (delta.total(x.dtype) if isinstance(delta, PartialSums) else delta.astype(x.dtype))
    x32 = x.astype(jnp.float32)
    if layer_norm:
        x32 = x32 - x32.mean(-1, keepdims=True)
    h = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + eps)
    h = h * (offset + scale.astype(jnp.float32))
    if bias is not None:
        h = h + bias.astype(jnp.float32)
    return x, h.astype(x.dtype)


def _kernel(x_ref, d_ref, s_ref, b_ref, x_out, h_out, *, D, dp, splits, chunk, layer_norm, eps, offset,
            has_bias):
    m = pl.program_id(0)
    ok = jnp.arange(dp) < D
    row = pl.ds(m * 0, dp)  # padded to a power of two; a traced start, as Pallas rejects static overruns
    x = plgpu.load(x_ref.at[m, row], mask=ok, other=0.0).astype(jnp.float32)
    if splits is None:
        delta = plgpu.load(d_ref.at[m, row], mask=ok, other=0.0).astype(jnp.float32)
    else:
        def body(i, acc):
            rows = i * chunk + jnp.arange(chunk)
            blk = plgpu.load(d_ref.at[pl.ds(i * chunk, chunk), m, row],
                             mask=(rows < splits)[:, None] & ok[None, :], other=0.0)
            return acc + jnp.sum(blk, axis=0)
        delta = jax.lax.fori_loop(0, pl.cdiv(splits, chunk), body, jnp.zeros((dp,), jnp.float32))
    xn = (x + delta).astype(x_out.dtype)
    plgpu.store(x_out.at[m, row], xn, mask=ok)
    x32 = xn.astype(jnp.float32)
    if layer_norm:
        x32 = jnp.where(ok, x32 - jnp.sum(x32) / D, 0.0)
    h = x32 * jax.lax.rsqrt(jnp.sum(x32 * x32) / D + eps)
    h = h * (offset + plgpu.load(s_ref.at[row], mask=ok, other=0.0).astype(jnp.float32))
    if has_bias:
        h = h + plgpu.load(b_ref.at[row], mask=ok, other=0.0).astype(jnp.float32)
    plgpu.store(h_out.at[m, row], h.astype(h_out.dtype), mask=ok)


@functools.partial(jax.jit, static_argnames=("layer_norm", "eps", "offset", "num_warps", "interpret"))
def add_norm_pallas(x: jax.Array, delta: Delta, scale: jax.Array, bias: Optional[jax.Array], *,
                    layer_norm: bool, eps: float, offset: float, num_warps: int = 8,
                    interpret: bool = False):
    """`add_norm_reference` in one kernel (one program per row)."""
    M, D = x.shape
    dp = _pow2(D)
    if isinstance(delta, PartialSums):
        d, splits = delta.sums, delta.sums.shape[0]
        chunk = min(_pow2(splits), max(1, CHUNK_VALUES // dp))
    else:
        d, splits, chunk = delta, None, 1
    kernel = functools.partial(_kernel, D=D, dp=dp, splits=splits, chunk=chunk, layer_norm=layer_norm,
                               eps=eps, offset=offset, has_bias=bias is not None)
    return pl.pallas_call(
        kernel, grid=(M,), interpret=interpret,
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] * 2,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
    )(x, d, scale, scale if bias is None else bias)
