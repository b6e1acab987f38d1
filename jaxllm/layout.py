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

from .params import Params
from .policy import KernelPolicy
from .weights import TransposedWeight, dense


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


def for_policy(params: Params, policy: KernelPolicy) -> Params:
    """params laid out for `policy`: the dense layer projections it stores by output row
    (`KernelPolicy.stores_by_row`: on the GPU, those its row-major kernel reads), the
    rest unchanged (XLA:CPU's dots are tuned for [in, out]). An untied output head
    keeps XLA's matrix multiply (the benchmark shapes' small heads are tied)."""
    def flip(w):
        return TransposedWeight(w.T) if isinstance(w, jax.Array) and policy.stores_by_row(w.shape) else w

    layers = tuple(layer.replace(wqkv=flip(layer.wqkv), wo=flip(layer.wo), w_in=flip(layer.w_in),
                                 w_out=flip(layer.w_out)) for layer in params.layers)
    return params.replace(layers=layers)
