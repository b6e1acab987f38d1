"""kernels/expert_matvec.py (interpreted on the CPU) against float64 NumPy: rows through
their routed experts, dense and quantized (int8, int4, and the GGUF blocks experts
keep packed), with repeated experts, the last expert, and widths that are no multiple
of the kernel's blocks; and the grouped kernel for many pairs, rows sorted into
blocks per expert."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.expert_matvec import (expert_matmul_pallas, expert_matvec_pallas, expert_matvec_reference,
                                          sort_into_blocks)
from jaxllm.policy import ExpertTiling, QMatmulTiling, QMatvecTiling
from jaxllm.quant import quantize_weight, stack_experts
from jaxllm.weights import Experts

IDS = np.array([4, 0, 4, 2, 3, 3, 1])  # repeats, the first and the last of 5 experts


def numpy_routed(x, w, ids):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return np.stack([x[p] @ w[e] for p, e in enumerate(ids)])


@pytest.mark.parametrize("K,N,tiling", [
    (64, 96, ExpertTiling(block_n=32, block_k=16, target_programs=64)),  # split K, several column blocks
    (40, 50, ExpertTiling(block_n=32, block_k=16, target_programs=1)),  # K and N past whole blocks
    (48, 24, ExpertTiling())])  # the default tiling: one block of each
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_experts(K, N, tiling, dtype):
    rng = np.random.default_rng(K + N)
    w = rng.normal(size=(5, K, N)).astype(np.float32)
    x = rng.normal(size=(len(IDS), K)).astype(np.float32)
    wj, xj = jnp.asarray(w, dtype), jnp.asarray(x, dtype)
    ref = numpy_routed(xj.astype(jnp.float32), wj.astype(jnp.float32), IDS)
    ours = expert_matvec_pallas(xj, Experts(wj), jnp.asarray(IDS), tiling=tiling, interpret=True)
    assert ours.dtype == jnp.float32 and ours.shape == (len(IDS), N)
    assert np.abs(np.asarray(ours) - ref).max() < 1e-4 * np.abs(ref).max()
    xla = expert_matvec_reference(xj, Experts(wj), jnp.asarray(IDS))
    assert np.abs(np.asarray(xla) - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("int8_activations", [False, True])
def test_quantized_experts(mode, int8_activations):
    """Against the dequantized experts in float64: exact but for float32 sums, or within
    the int8 rounding of the activations (~0.4% of a group's largest per element)."""
    rng = np.random.default_rng(7)
    K, N = 128, 80
    experts = stack_experts([quantize_weight(jnp.asarray(rng.normal(size=(K, N)), jnp.float32), mode)
                             for _ in range(5)])
    x = rng.normal(size=(len(IDS), K)).astype(np.float32)
    ref = numpy_routed(x, experts.dense(), IDS)
    tiling = QMatvecTiling(block_n=16, block_k=64, num_stages=3, target_programs=64)  # splits of K
    ours = expert_matvec_pallas(jnp.asarray(x), experts, jnp.asarray(IDS), qtiling=tiling,
                                int8_activations=int8_activations, interpret=True)
    err = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
    assert err < (2e-2 if int8_activations else 1e-5), err


def quantized_experts(mode, K, N, seed=7):
    rng = np.random.default_rng(seed)
    return stack_experts([quantize_weight(jnp.asarray(rng.normal(size=(K, N)), jnp.float32), mode)
                          for _ in range(5)])


def test_sort_into_blocks():
    """Each expert's pairs fill whole blocks of its own, in their order; the blocks past
    the last expert's hold none (-1)."""
    ids = jnp.asarray([3, 0, 3, 3, 1, 3, 0])
    b = sort_into_blocks(ids, 5, 2)
    assert b.block_expert.shape == (4 + 5,)  # cdiv(7, 2), and a partial block for each of at most 5 experts
    assert b.block_expert.tolist() == [0, 1, 3, 3, -1, -1, -1, -1, -1]
    assert np.asarray(ids)[np.asarray(b.order)].tolist() == [0, 0, 1, 3, 3, 3, 3]
    assert b.dest.tolist() == [0, 1, 2, 4, 5, 6, 7]


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("route", ["spread", "one_expert", "few"])
def test_grouped_quantized_experts(mode, route):
    """Many pairs through expert_matmul_pallas against the dequantized experts in float64:
    experts of uneven counts (one expert absent), every pair to one expert, fewer pairs
    than a block; K split or not."""
    K, N = 128, 48
    experts = quantized_experts(mode, K, N)
    rng = np.random.default_rng(11)
    ids = {"spread": rng.choice([0, 1, 2, 4], size=37, p=[0.5, 0.3, 0.1, 0.1]),
           "one_expert": np.full(21, 4), "few": np.array([2, 0, 2])}[route]
    x = rng.normal(size=(len(ids), K)).astype(np.float32)
    ref = numpy_routed(x, experts.dense(), ids)
    for tiling in (QMatmulTiling(block_m=16, block_n=16, block_k=64, target_programs=1),
                   QMatmulTiling(block_m=16, block_n=32, block_k=32, target_programs=10 ** 4)):
        blocks = sort_into_blocks(jnp.asarray(ids), 5, tiling.block_m)
        ours = expert_matmul_pallas(jnp.asarray(x), experts, blocks, tiling=tiling, interpret=True)
        assert np.abs(np.asarray(ours) - ref).max() < 1e-5 * np.abs(ref).max()
