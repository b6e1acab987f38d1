"""Small-batch matrix-vector products y [M, N] = x [M, K] @ w [K, N], M <= 4.

XLA strength-reduces a batch-1 dot into a multiply and a reduce, and on decode
shapes often materialises the [K, N] product between the two: three passes over
the weight's bytes where one suffices (benchmarks/NOTES.md). The Pallas kernel
reads each weight tile once, keeps the partial sums in registers, and splits K
across programs so that enough bytes are in flight to fill HBM bandwidth; the
partial sums over the splits are added afterwards.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from flax import struct
from jax.experimental.pallas import triton as plgpu

from ..policy import MAX_ROWS, MatvecTiling


class PartialSums(NamedTuple):
    """A projection's output left as split-K partial sums [S, M, N] float32 (its value
    is sums.sum(0)), so that a consumer kernel adds them instead of a separate
    reduction kernel (kernels/add_norm.py, kernels/decode_attention.py). A consumer
    that cannot calls total()."""

    sums: jax.Array

    def total(self, dtype) -> jax.Array:
        return self.sums.sum(0).astype(dtype)


@struct.dataclass
class GatedInput:
    """A gated MLP's down-projection input left as its gate-up projection's split-K
    partial sums [S, M, 2F] float32: x = act(gate) * up, gate and up the two halves of
    the summed last axis. The down projection's kernel forms its slice of x from these
    in registers, where XLA would run a reduction kernel and an activation kernel."""

    sums: jax.Array
    act: str = struct.field(pytree_node=False)  # "silu" or "gelu_tanh"

    def value(self, dtype) -> jax.Array:
        gate, up = jnp.split(self.sums.sum(0), 2, axis=-1)
        return (activate(gate, self.act) * up).astype(dtype)


def activate(g: jax.Array, act: str) -> jax.Array:
    """SiLU or tanh GELU in float32, written with exp only (it lowers everywhere)."""
    if act == "silu":
        return g / (1.0 + jnp.exp(-g))
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # tanh(z) = 2 sigmoid(2z) - 1
    return 0.5 * g * (2.0 / (1.0 + jnp.exp(-2.0 * inner)))


def load_gated(ref, row, k0, width: int, mask, splits: int, F: int):
    """act(gate) * up [rows, width] float32 at inputs k0.. from the partial sums ref
    [S, M, 2F] (rows `row`, a pl.ds over M): one load per split, unrolled."""
    zero = k0 * 0  # a traced index: integer ref indices fail in interpret mode
    gate = sum(plgpu.load(ref.at[zero + i, row, pl.ds(k0, width)], mask=mask, other=0.0)
               for i in range(splits))
    up = sum(plgpu.load(ref.at[zero + i, row, pl.ds(F + k0, width)], mask=mask, other=0.0)
             for i in range(splits))
    return gate, up


def matvec_reference(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x [M, K] @ w [K, N] with float32 accumulation, in out_dtype (default x's)."""
    y = jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _plan(M: int, K: int, N: int, block_n: int, block_k: int, target_programs: int):
    """Splits of K so that col_blocks * splits reaches the target program count."""
    col_blocks = pl.cdiv(N, block_n)
    k_blocks = pl.cdiv(K, block_k)
    splits = max(1, min(k_blocks, target_programs // col_blocks))
    steps = pl.cdiv(k_blocks, splits)  # k blocks per split
    splits = pl.cdiv(k_blocks, steps)
    return col_blocks, splits, steps


def _kernel(x_ref, w_ref, o_ref, *, M, K, N, block_n, block_k, steps, rows, gated):
    j, s = pl.program_id(0), pl.program_id(1)
    cols = j * block_n + jnp.arange(block_n)
    col_ok = cols < N
    row_ok = jnp.arange(rows) < M

    def body(i, acc):
        k0 = (s * steps + i) * block_k
        ks = k0 + jnp.arange(block_k)
        k_ok = ks < K
        w = plgpu.load(w_ref.at[pl.ds(k0, block_k), pl.ds(j * block_n, block_n)],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0).astype(jnp.float32)
        mask = row_ok[:, None] & k_ok[None, :]
        if gated is None:
            x = plgpu.load(x_ref.at[pl.ds(0, rows), pl.ds(k0, block_k)], mask=mask,
                           other=0.0).astype(jnp.float32)
        else:
            gate, up = load_gated(x_ref, pl.ds(0, rows), k0, block_k, mask, gated[0], K)
            x = activate(gate, gated[1]) * up
        # [rows, block_k, 1] * [1, block_k, block_n] summed over k: stays in registers.
        return acc + jnp.sum(x[:, :, None] * w[None, :, :], axis=1)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((rows, block_n), jnp.float32))
    plgpu.store(o_ref.at[s, pl.ds(0, rows), pl.ds(j * block_n, block_n)], acc,
             mask=row_ok[:, None] & col_ok[None, :])


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiling", "block_n", "block_k", "target_programs",
                                             "num_warps", "num_stages", "interpret", "sum_splits"))
def matvec_pallas(x, w: jax.Array, out_dtype=None, *, tiling: MatvecTiling = MatvecTiling(),
                  block_n: int | None = None,
                  block_k: int | None = None, target_programs: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None,
                  interpret: bool = False, sum_splits: bool = True):
    """x [M, K] @ w [K, N] for M <= 4, float32 accumulation, in out_dtype (default x's).
    x may be a `GatedInput` (whose dtype is float32). sum_splits=False returns the
    split-K partial sums as `PartialSums` for a consumer that adds them itself
    (kernels/add_norm.py). Tiling arguments left None take `tiling`'s."""
    block_n, block_k = block_n or tiling.block_n, block_k or tiling.block_k
    target_programs = target_programs or tiling.target_programs
    num_warps, num_stages = num_warps or tiling.num_warps, num_stages or tiling.num_stages
    x, M, K, gated = gated_operand(x)
    N = w.shape[1]
    if M > MAX_ROWS:
        raise ValueError(f"matvec_pallas handles at most {MAX_ROWS} rows, got {M}")
    rows = _pow2(M)
    block_k = max(8, block_k // rows)  # the register accumulator holds rows * block_k * block_n
    col_blocks, splits, steps = _plan(M, K, N, block_n, block_k, target_programs)
    kernel = functools.partial(_kernel, M=M, K=K, N=N, block_n=block_n, block_k=block_k,
                               steps=steps, rows=rows, gated=gated)
    compiler_params = None
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    partial_sums = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, rows, N), jnp.float32),
        grid=(col_blocks, splits),
        interpret=interpret,
        compiler_params=compiler_params,
    )(x, w)
    return finish(partial_sums[:, :M], out_dtype or x.dtype, sum_splits)


def gated_operand(x):
    """(operand, M, K, gated) for a kernel's input: an array [M, K], or a GatedInput,
    whose partial sums [S, M, 2K] are passed whole with gated = (S, act)."""
    if isinstance(x, GatedInput):
        S, M, F2 = x.sums.shape
        return x.sums, M, F2 // 2, (S, x.act)
    return x, x.shape[0], x.shape[1], None


def finish(partial_sums: jax.Array, dtype, sum_splits: bool):
    """The split-K partial sums [S, M, N] added up in dtype, or left as PartialSums."""
    return partial_sums.sum(0).astype(dtype) if sum_splits else PartialSums(partial_sums)
