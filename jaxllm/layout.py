"""Weights stored by output row for the GPU's decode kernels.

`Params` keep every projection as w [in, out] (`x @ w`). Stored as w.T [out, in]
instead, a matrix-vector product needs no split of the inputs across programs:
each program of kernels/rowmatvec.py owns whole output rows, so the layer's norm,
gate and residual add run inside the projections, and a llama1b layer takes five
kernels where the split-K path took twelve (benchmarks/NOTES.md, variant 22).
"""

from __future__ import annotations

from typing import Optional

import jax
from flax import struct

from .kernels import rowmatvec
from .params import Params


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


def dense(w):
    """w [K, N] as an array, whether stored so or as a TransposedWeight."""
    return w.t.T if isinstance(w, TransposedWeight) else w


def _is_transposed(x) -> bool:
    return isinstance(x, TransposedWeight)


def untranspose(params):
    """params with every TransposedWeight back as its [K, N] array (saving to files)."""
    return jax.tree.map(dense, params, is_leaf=_is_transposed)


def with_layout_of(params, like):
    """Dense params stored as `like` stores them: transposed where like is."""
    return jax.tree.map(lambda ref, w: TransposedWeight(w.T) if _is_transposed(ref) else w,
                        like, params, is_leaf=_is_transposed)


def add_to(w, delta: jax.Array):
    """w + delta [K, N], stored as w is."""
    if isinstance(w, TransposedWeight):
        return TransposedWeight(w.t + delta.T.astype(w.dtype))
    return w + delta.astype(w.dtype)


def transpose_projections(params: Params, max_small_side: Optional[int] = None,
                          head: bool = True) -> Params:
    """params with every dense layer projection (and an untied output head, with head)
    stored as a TransposedWeight, or only those whose smaller side is at most
    max_small_side; quantized weights, which already keep output rows, and the
    embedding are left as they are."""
    def flip(w):
        if not isinstance(w, jax.Array) or (max_small_side is not None and min(w.shape) > max_small_side):
            return w
        return TransposedWeight(w.T)

    layers = tuple(layer.replace(wqkv=flip(layer.wqkv), wo=flip(layer.wo), w_in=flip(layer.w_in),
                                 w_out=flip(layer.w_out)) for layer in params.layers)
    lm_head = flip(params.lm_head) if head and params.lm_head is not None else params.lm_head
    return params.replace(layers=layers, lm_head=lm_head)


def for_backend(params: Params) -> Params:
    """params laid out for decode on the default backend: on the GPU, the layer
    projections the row-major kernel reads there (rowmatvec.AUTO_MAX_SMALL_SIDE) stored
    by output row; elsewhere unchanged (XLA:CPU's dots are tuned for [in, out]). An
    untied output head keeps XLA's matrix multiply, the path measured on the GPU (the
    benchmark shapes' small heads are tied)."""
    if jax.default_backend() != "gpu":
        return params
    return transpose_projections(params, rowmatvec.AUTO_MAX_SMALL_SIDE, head=False)
