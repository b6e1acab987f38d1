"""Small-batch matrix-vector products over weights stored by output row (w.T [N, K],
PyTorch's and GGUF's order), with the layer's norm, gate and residual add fused in.

kernels/matvec.py reads w [K, N]: a program owns a strip of columns, and small N
leaves too few programs, so K is split across programs and the partial sums are
added by later kernels. Stored by output row, every program owns a few whole rows
and walks all of K: no split, the outputs complete, and the program that reads
every input of a row can also

  - normalise the input (RMSNorm: it sums the squares as it goes and scales the
    dot products at the end, the factor commuting with the projection),
  - apply the gate (gate-up weights [2F, K]: the program owns rows n of both halves
    and writes act(gate) * up [M, F]),
  - add the residual (y = residual + x @ w, in the residual's dtype),

which on the split-K path are separate XLA kernels, four to seven per layer
(benchmarks/NOTES.md, variant 22).

float8 rows (an Fp8Weight, weights.py) are read as stored and widened in registers;
their per-row scales multiply the dot products before the gate and the residual.

Each program keeps a [rows, block_n, block_k] tile of products in registers and
reduces it across threads once, after the loop.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..policy import MAX_ROWS, RowTiling
from .matvec import _pow2, activate


def tiling_for(M: int, K: int, N: int, halves: int, tiling: RowTiling = RowTiling(), **given) -> dict:
    """`tiling` resolved for x [M, K] and a weight of N rows per half: its classes'
    settings over the base ones (`RowTiling.for_weight`), and `given` (those not None)
    over all; with block_n, block_k, the number of steps and the steps loaded ahead
    worked out."""
    resolved = {**vars(tiling.for_weight(K, N, halves)), **{k: v for k, v in given.items() if v is not None}}
    rows = _pow2(M)
    block_n = resolved["block_n"] or rows_per_program(N, resolved["min_programs"])
    # the register tile holds rows * halves * block_n * block_k products
    block_k = resolved["block_k"] or resolved["step_elements"] // (halves * block_n)
    block_k = min(max(16, block_k // rows), _pow2(K))
    steps = pl.cdiv(K, block_k)
    # nothing to load ahead of a program's last step: a one-step row (q/k/v, o and the
    # head at batch 1) would load a tile wholly past K, masked off
    prefetch = min(resolved["prefetch"], steps - 1)
    return {**resolved, "block_n": block_n, "block_k": block_k, "steps": steps, "prefetch": prefetch}


def rowmatvec_reference(x: jax.Array, t: jax.Array, out_dtype=None, *,
                        norm_scale: Optional[jax.Array] = None, norm_offset: float = 0.0,
                        norm_eps: float = 1e-6, gate: Optional[str] = None,
                        residual: Optional[jax.Array] = None,
                        row_scales: Optional[jax.Array] = None) -> jax.Array:
    """The XLA path with the kernel's signature (see rowmatvec_pallas; no tiling)."""
    x32 = x.astype(jnp.float32)
    if norm_scale is not None:
        x32 = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + norm_eps) * (
            norm_offset + norm_scale.astype(jnp.float32))
    if t.dtype.itemsize == 1:  # float8 rows: widened, the activations kept as they are
        y = jnp.dot(x32, t.astype(jnp.float32).T)
    else:
        y = jnp.dot(x32.astype(t.dtype), t.T, preferred_element_type=jnp.float32)
    if row_scales is not None:
        y = y * row_scales.astype(jnp.float32)
    if gate is not None:
        g, u = jnp.split(y, 2, axis=-1)
        y = activate(g, gate) * u
    if residual is not None:
        return residual + y.astype(residual.dtype)
    return y.astype(out_dtype or x.dtype)


def _kernel(x_ref, t_ref, *refs, M, K, N, block_n, block_k, rows, steps, norm, gate, residual,
            row_scales, tile_acc, prefetch, eviction):
    refs = list(refs)
    scale_ref = refs.pop(0) if norm is not None else None
    res_ref = refs.pop(0) if residual else None
    row_scale_ref = refs.pop(0) if row_scales else None
    o_ref = refs[-1]
    j = pl.program_id(0)
    n_ok = j * block_n + jnp.arange(block_n) < N
    row_ok = jnp.arange(rows) < M
    halves = (0, N) if gate else (0,)  # first weight row of each half

    def load(i):  # step i's inputs, norm weights and weight tiles, as stored (zero past K)
        # traced, also for the first steps: Pallas rejects a static slice past K
        k0 = (j * 0 + i) * block_k
        k_ok = k0 + jnp.arange(block_k) < K
        x = plgpu.load(x_ref.at[pl.ds(0, rows), pl.ds(k0, block_k)],
                       mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        s = None if norm is None else plgpu.load(scale_ref.at[pl.ds(k0, block_k)], mask=k_ok, other=0.0)
        ws = tuple(plgpu.load(t_ref.at[pl.ds(h0 + j * block_n, block_n), pl.ds(k0, block_k)],
                              mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy=eviction)
                   for h0 in halves)
        return x, s, ws

    def accumulate(loaded, accs, squares):
        x, s, ws = loaded
        x = x.astype(jnp.float32)
        if norm is not None:
            squares = squares + x * x
            x = x * (norm[0] + s.astype(jnp.float32))[None, :]
        new = []
        for acc, w in zip(accs, ws):
            products = x[:, None, :] * w.astype(jnp.float32)[None, :, :]
            new.append(acc + (products if tile_acc else jnp.sum(products, axis=2)))
        return tuple(new), squares

    # Steps i + 1 ... i + prefetch are loaded before step i's products: Triton's
    # pipeliner does not stage these loads (1 to 4 stages ran alike), so without this a
    # program waits out a full memory latency per step.
    def body(i, carry):
        accs, squares, *loaded = carry
        if not prefetch:
            return accumulate(load(i), accs, squares)
        return accumulate(loaded[0], accs, squares) + (*loaded[1:], load(i + prefetch))

    acc = jnp.zeros((rows, block_n, block_k) if tile_acc else (rows, block_n), jnp.float32)
    carry = (tuple(acc for _ in halves), jnp.zeros((rows, block_k), jnp.float32))
    accs, squares = jax.lax.fori_loop(0, steps, body, carry + tuple(load(i) for i in range(prefetch)))[:2]
    ys = [jnp.sum(acc, axis=2) if tile_acc else acc for acc in accs]  # [rows, block_n]
    if row_scales:
        ys = [y * plgpu.load(row_scale_ref.at[pl.ds(h0 + j * block_n, block_n)], mask=n_ok,
                             other=0.0).astype(jnp.float32)[None, :] for y, h0 in zip(ys, halves)]
    if norm is not None:
        factor = jax.lax.rsqrt(jnp.sum(squares, axis=1) / K + norm[1])
        ys = [y * factor[:, None] for y in ys]
    y = activate(ys[0], gate) * ys[1] if gate else ys[0]
    at = (pl.ds(0, rows), pl.ds(j * block_n, block_n))
    mask = row_ok[:, None] & n_ok[None, :]
    if residual:
        r = plgpu.load(res_ref.at[at], mask=mask, other=0.0)
        y = r + y.astype(r.dtype)
    plgpu.store(o_ref.at[at], y.astype(o_ref.dtype), mask=mask)


def rows_per_program(N: int, min_programs: int) -> int:
    """The largest power of two <= 16 rows that still gives min_programs programs."""
    block_n = 16
    while block_n > 1 and pl.cdiv(N, block_n) < min_programs:
        block_n //= 2
    return block_n


@functools.partial(jax.jit, static_argnames=("out_dtype", "norm_offset", "norm_eps", "gate", "tiling",
                                             "block_n", "block_k", "min_programs", "num_warps",
                                             "num_stages", "tile_acc", "prefetch", "interpret"))
def rowmatvec_pallas(x: jax.Array, t: jax.Array, out_dtype=None, *,
                     norm_scale: Optional[jax.Array] = None, norm_offset: float = 0.0,
                     norm_eps: float = 1e-6, gate: Optional[str] = None,
                     residual: Optional[jax.Array] = None, tiling: RowTiling = RowTiling(),
                     block_n: int | None = None,
                     block_k: int | None = None, min_programs: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None,
                     tile_acc: bool | None = None, prefetch: int | None = None,
                     row_scales: Optional[jax.Array] = None, interpret: bool = False) -> jax.Array:
    """y [M, N] = f(x) [M, K] @ t.T for M <= 4 and t [N, K] (or [2N, K] with a gate),
    float32 accumulation, where
      row_scales [N] (or [2N]): each row's dot product times its scale (float8 rows);
      f(x) = RMSNorm(x) * (norm_offset + norm_scale) when norm_scale [K] is given, else x;
      gate ("silu" or "gelu_tanh"): y = act(g) * u of the two halves g, u of t's rows;
      residual [M, N]: y = residual + y, in the residual's dtype (else out_dtype, default x's).
    Tiling arguments given override `tiling`'s (`tiling_for`) for every class of weight."""
    M, K = x.shape
    N = t.shape[0] // (2 if gate else 1)
    if M > MAX_ROWS:
        raise ValueError(f"rowmatvec_pallas handles at most {MAX_ROWS} rows, got {M}")
    if t.shape[1] != K:
        raise ValueError(f"input width {K} does not match the weight's rows {t.shape}")
    tiling = tiling_for(M, K, N, 2 if gate else 1, tiling, block_n=block_n, block_k=block_k,
                        min_programs=min_programs, num_warps=num_warps, num_stages=num_stages,
                        tile_acc=tile_acc, prefetch=prefetch)
    norm = None if norm_scale is None else (norm_offset, norm_eps)
    kernel = functools.partial(_kernel, M=M, K=K, N=N, rows=_pow2(M), norm=norm, gate=gate,
                               residual=residual is not None, row_scales=row_scales is not None,
                               **{k: tiling[k] for k in ("block_n", "block_k", "steps", "tile_acc",
                                                         "prefetch", "eviction")})
    operands = (x, t) + ((norm_scale,) if norm is not None else ()) + (
        (residual,) if residual is not None else ()) + ((row_scales,) if row_scales is not None else ())
    dtype = residual.dtype if residual is not None else (out_dtype or x.dtype)
    compiler_params = None
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=tiling["num_warps"],
                                               num_stages=tiling["num_stages"])
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((M, N), dtype),
        grid=(pl.cdiv(N, tiling["block_n"]),),
        interpret=interpret,
        compiler_params=compiler_params,
    )(*operands)
