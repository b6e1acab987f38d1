"""kernels/expert_matvec.py (interpreted on the CPU) against float64 NumPy: rows through
their routed experts, dense and quantized (int8, int4, and the GGUF blocks experts
keep packed), with repeated experts, the last expert, and widths that are no multiple
of the kernel's blocks."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.expert_matvec import expert_matvec_pallas, expert_matvec_reference
from jaxllm.policy import ExpertTiling, QMatvecTiling
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
