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
from jax.experimental.pallas import triton as plgpu

MAX_ROWS = 4


class PartialSums(NamedTuple):
    """A projection's output left as split-K partial sums [S, M, N] float32 (its value
    is sums.sum(0)), so that a consumer kernel adds them instead of a separate
    reduction kernel (kernels/add_norm.py, kernels/decode_attention.py). A consumer
    that cannot calls total()."""

    sums: jax.Array

    def total(self, dtype) -> jax.Array:
        return self.sums.sum(0).astype(dtype)


# "auto" uses the kernel when one side of the weight is at most this: measured faster
# than XLA on every such decode shape on the H100 (smol135m, llama1b), slower inside
# llama8b, whose projections are all >= 4096 on both sides (benchmarks/NOTES.md).
AUTO_MAX_SMALL_SIDE = 2048


def use_pallas(kernels: str, rows: int, weight_shape: tuple[int, int], quantized: bool = False) -> bool:
    """The switch between the Pallas kernels and their XLA references."""
    if kernels == "xla" or rows > MAX_ROWS:
        return False
    if kernels == "pallas":
        return True
    if jax.default_backend() != "gpu":
        return False
    # Quantized weights: XLA has no fused dequantizing matrix-vector product on the GPU.
    return quantized or min(weight_shape) <= AUTO_MAX_SMALL_SIDE


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


def _kernel(x_ref, w_ref, o_ref, *, M, K, N, block_n, block_k, steps, rows):
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
        x = plgpu.load(x_ref.at[pl.ds(0, rows), pl.ds(k0, block_k)],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).astype(jnp.float32)
        # [rows, block_k, 1] * [1, block_k, block_n] summed over k: stays in registers.
        return acc + jnp.sum(x[:, :, None] * w[None, :, :], axis=1)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((rows, block_n), jnp.float32))
    plgpu.store(o_ref.at[s, pl.ds(0, rows), pl.ds(j * block_n, block_n)], acc,
             mask=row_ok[:, None] & col_ok[None, :])


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_n", "block_k", "target_programs",
                                             "num_warps", "num_stages", "interpret", "sum_splits"))
def matvec_pallas(x: jax.Array, w: jax.Array, out_dtype=None, *, block_n: int = 256, block_k: int = 32,
                  target_programs: int = 1056, num_warps: int = 4, num_stages: int = 3,
                  interpret: bool = False, sum_splits: bool = True):
    """x [M, K] @ w [K, N] for M <= 4, float32 accumulation, in out_dtype (default x's).
    sum_splits=False returns the split-K partial sums as `PartialSums` for a consumer
    that adds them itself (kernels/add_norm.py)."""
    M, K = x.shape
    N = w.shape[1]
    if M > MAX_ROWS:
        raise ValueError(f"matvec_pallas handles at most {MAX_ROWS} rows, got {M}")
    rows = _pow2(M)
    block_k = max(8, block_k // rows)  # the register accumulator holds rows * block_k * block_n
    col_blocks, splits, steps = _plan(M, K, N, block_n, block_k, target_programs)
    kernel = functools.partial(_kernel, M=M, K=K, N=N, block_n=block_n, block_k=block_k,
                               steps=steps, rows=rows)
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


def finish(partial_sums: jax.Array, dtype, sum_splits: bool):
    """The split-K partial sums [S, M, N] added up in dtype, or left as PartialSums."""
    return partial_sums.sum(0).astype(dtype) if sum_splits else PartialSums(partial_sums)
