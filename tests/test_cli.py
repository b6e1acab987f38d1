"""The `jaxllm` command line, run as a subprocess like a user would."""

import json
import os
import subprocess
import sys

import jax
import pytest
from conftest import tiny
from tiny_gguf import write_gguf

import jaxllm

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference",
                         "smollm2-135m-instruct-q4_1.llamacpp.json")


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "jaxllm", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    c = tiny(vocab_size=300, max_seq_len=32)
    params = jaxllm.init_params(c, jax.random.PRNGKey(0))
    return str(write_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", c, params))


def assert_usage_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("jaxllm: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in lines[-1]


def test_missing_file():
    assert_usage_error(run("info", "--model", "/no/such.gguf"), "no such file")


def test_unknown_model_name():
    assert_usage_error(run("info", "--model", "llama-9000"), "unknown model", "smollm2-135m-instruct")


def test_prompt_longer_than_context(tiny_gguf):
    assert_usage_error(run("generate", "--model", tiny_gguf, "x" * 40), "context")


def test_invalid_sampling_value(tiny_gguf):
    assert_usage_error(run("generate", "--model", tiny_gguf, "--top-p", "1.5", "hi"), "top_p")
    assert_usage_error(run("generate", "--model", tiny_gguf, "--temperature", "-1", "hi"), "temperature")


def test_malformed_ids(tiny_gguf):
    assert_usage_error(run("score", "--model", tiny_gguf, "--ids", "1,x,3"), "--ids")
    assert_usage_error(run("score", "--model", tiny_gguf, "--ids", "1,99999"), "vocabulary")


def test_generate_json_on_tiny_model(tiny_gguf):
    r = run("generate", "--model", tiny_gguf, "--json", "--temperature", "0", "--max-new-tokens", "5",
            "ab", "cde")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == ["ab", "cde"]
    assert rows[0]["prompt_ids"] == [ord("a"), ord("b")]
    assert all(len(row["ids"]) <= 5 and set(row) == {"prompt", "prompt_ids", "ids", "text"} for row in rows)


def test_int4_calibration_text(tmp_path):
    c = tiny(vocab_size=300, max_seq_len=64, d_model=64, head_dim=16, d_ff=96)
    model = str(write_gguf(tmp_path / "m.gguf", c, jaxllm.init_params(c, jax.random.PRNGKey(0))))
    assert_usage_error(run("score", "--model", model, "--weights", "int4", "--calibration",
                           str(tmp_path / "missing.txt"), "some text"), "calibration text", "missing.txt")
    assert_usage_error(run("score", "--model", model, "--weights", "int8", "--calibration", "none", "x y"),
                       "--calibration applies to --weights int4")
    (tmp_path / "text.txt").write_text("Calibration text for the tiny model. " * 4)
    r = run("score", "--json", "--model", model, "--weights", "int4", "--calibration",
            str(tmp_path / "text.txt"), "some text")
    assert r.returncode == 0, r.stderr
    assert "calibrating int4 on 148 tokens" in r.stderr
    assert len(json.loads(r.stdout)["nll"]) == len("some text") - 1


@pytest.mark.slow
def test_real_model_cli_matches_reference():
    with open(REFERENCE) as f:
        ref = json.load(f)
    case = ref["tokenize"][2]
    r = run("tokenize", "--json", case["text"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ids"] == case["ids_special"]
    r = run("tokenize", "--json", "--no-bos", "<|im_start|>")
    assert json.loads(r.stdout)["ids"] != [1]
    score = ref["score"][0]
    r = run("score", "--json", "--ids", ",".join(map(str, score["ids"])))
    out = json.loads(r.stdout)
    assert set(out) >= {"ids", "nll", "argmax", "ppl"} and len(out["nll"]) == len(score["ids"]) - 1
    assert abs(out["ppl"] - score["ppl"]) / score["ppl"] < 0.05
    r = run("generate", "--temperature", "0", "--max-new-tokens", "8", "The capital of France is")
    assert r.returncode == 0 and r.stdout.startswith(" Paris."), (r.stdout, r.stderr)
    r = run("info", "--json")
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["layers"] == 30 and info["context_length"] == 8192
    assert info["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    r = run("chat", "--temperature", "0", "--max-new-tokens", "8", stdin="What is 2+2?\n")
    assert r.returncode == 0 and len(r.stdout.strip()) > 0, r.stderr


@pytest.mark.slow
def test_gemma_through_the_cli_contract():
    ref_path = os.path.join(os.path.dirname(REFERENCE), "gemma-3-270m-q4_k_m.llamacpp.json")
    with open(ref_path) as f:
        case = json.load(f)["greedy"][0]
    r = run("generate", "--model", "gemma-3-270m", "--json", "--temperature", "0",
            "--max-new-tokens", "8", case["prompt"])
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert row["prompt_ids"] == case["prompt_ids"]
    assert row["ids"] == case["ids"][:8]
    assert case["text"].startswith(row["text"]) and len(row["text"]) > 10
    info = json.loads(run("info", "--json", "--model", "gemma-3-270m").stdout)
    assert info["architecture"] == "gemma3" and info["sliding_window"] == 512


@pytest.mark.parametrize("arch, kw", [
    ("phi2", dict(norm="layer", norm_bias=True, mlp="gelu", qkv_bias=True, out_bias=True,
                  mlp_bias=True, parallel_block=True, rotary_fraction=0.5, lm_head_bias=True,
                  tie_embeddings=False, n_kv_heads=4)),
    ("phi3", dict(tie_embeddings=False)),
    ("qwen3", dict(qk_norm=True, head_dim=16)),
])
def test_info_reports_each_architecture(tmp_path, arch, kw):
    from tiny_gguf import write_gguf  # noqa: PLC0415

    c = tiny(vocab_size=300, **kw)
    path = write_gguf(tmp_path / f"{arch}.gguf", c, jaxllm.init_params(c, jax.random.PRNGKey(0)), arch=arch)
    r = run("info", "--json", "--model", str(path))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == arch and info["head_dim"] == c.head_dim
    assert info["layers"] == c.n_layers and info["parameters"] == c.param_count()
