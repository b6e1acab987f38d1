"""Tensor parallelism (jaxllm/sharding.py): the checks in tests/sharding_checks.py run
in a process with two host devices (XLA fixes the device count before JAX starts);
here, the layout helpers on one device, and the command line's error."""

import os
import subprocess
import sys

import json
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny

import jaxllm

from jaxllm.ops import split_fused
from jaxllm.quant import quantize_weight
from jaxllm.sharding import _per_shard
from jaxllm.weights import dequantize, fp8_dense, permute_outputs

HERE = os.path.dirname(os.path.abspath(__file__))
# The model of the two-process run (distributed_check.py imports these)
CONFIG = tiny(vocab_size=128, d_model=64, d_ff=128, head_dim=16, n_heads=4, n_kv_heads=2, n_layers=2, kernels="xla")
PROMPTS = [[1, 2, 3], [7, 5, 9, 11]]
TOKENS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]]


def test_per_shard_order_and_split_fused_undo_each_other():
    sizes, shards = [8, 4, 4], 2
    order = _per_shard(sizes, shards)
    assert order.tolist() == [0, 1, 2, 3, 8, 9, 12, 13, 4, 5, 6, 7, 10, 11, 14, 15]
    x = jnp.arange(16.0)[None]
    parts = split_fused(x[:, order], sizes, shards)
    for got, want in zip(parts, np.split(np.arange(16.0), [8, 12])):
        np.testing.assert_array_equal(got[0], want)


def test_permuted_quantized_weights_dequantize_to_the_permuted_dense_weight():
    w = jax.random.normal(jax.random.PRNGKey(0), (64, 48))
    order = np.random.default_rng(0).permutation(48)
    for mode in ("int8", "int4"):
        q = quantize_weight(w, mode)
        np.testing.assert_array_equal(dequantize(permute_outputs(q, order)), dequantize(q)[:, order])
    f = quantize_weight(w, "fp8")
    np.testing.assert_array_equal(fp8_dense(permute_outputs(f, order)), fp8_dense(f)[:, order])


# tests/sharding_checks.py's groups (a process each, so that two workers share them)
# and the checks each must report.
SHARDING_CHECKS = {
    "archs": {"gemma", "gpt2", "llama3", "mistral", "phi2", "qwen2", "qwen3", "smollm2"},
    "kernels": {"llama3-partitioned", "llama3-kernels-per-shard", "gemma-kernels-per-shard", "phi2-kernels-per-shard"},
    "quantized": {"load-dense", "load-int8", "int8", "int4", "fp8", "int4-kernels-per-shard"},
    "moe": {"qwen3moe-dense", "qwen3moe-int8", "qwen3moe-int4", "qwen3moe-fp8", "gpt-oss-dense", "gpt-oss-int8",
            "gpt-oss-fp8"},
    "serving": {"collectives", "engine", "errors"},
}


@pytest.mark.parametrize("group", SHARDING_CHECKS)
def test_two_devices_match_one(group):
    out = subprocess.run([sys.executable, os.path.join(HERE, "sharding_checks.py"), group], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    ok = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("ok ")}
    assert ok == SHARDING_CHECKS[group]


def test_cli_refuses_more_devices_than_there_are():
    out = subprocess.run([sys.executable, "-m", "jaxllm", "generate", "--tensor-parallel", "4", "--max-new-tokens",
                          "1", "hi"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "jaxllm: error:" in out.stderr and "4 devices" in out.stderr
    assert "Traceback" not in out.stderr


def test_two_processes_through_jax_distributed_match_one():
    """jax.distributed: one process per device (here two CPU processes joined by gloo),
    the same library code; both see the tokens and logits one process computes alone."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    runs = [subprocess.Popen([sys.executable, os.path.join(HERE, "distributed_check.py"), port, str(i)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outs]
    params = jaxllm.init_params(CONFIG, jax.random.PRNGKey(0))
    tokens = jaxllm.generate(params, CONFIG, PROMPTS, max_new_tokens=6, settings=jaxllm.SamplerSettings.greedy()).tokens
    logits = np.asarray(jaxllm.forward(params, CONFIG, jnp.asarray(TOKENS)))
    for stdout, _ in outs:
        got = json.loads(stdout.strip().splitlines()[-1])
        assert got["tokens"] == tokens
        np.testing.assert_allclose(np.asarray(got["logits"]), logits, atol=1e-4)
