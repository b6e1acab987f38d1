"""scripts/bench.py --quick runs end to end on the CPU and writes the documented schema;
benchmarks/llamacpp_peer.py writes the models its peer figures are measured on."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_quick_bench_writes_the_schema(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--quick",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert {"device", "jax_version", "date", "command", "results", "milestones"} <= set(report)
    benches = {row["bench"] for row in report["results"]}
    assert {"tg128", "copy_bandwidth", "ttft_prompt128", "async_overhead", "buffer_reuse"} <= benches
    for row in report["results"]:
        assert {"bench", "shape", "weights", "batch", "tok_s"} <= set(row)
    tg = next(row for row in report["results"] if row["bench"] == "tg128")
    assert tg["tok_s"] > 0 and tg["min_ms"] <= tg["median_ms"] <= tg["max_ms"]
    assert tg["row_major_weights"] == 0  # weights are stored by output row on the GPU only
    assert "tg128" in r.stdout  # the table is printed last


def test_unknown_shape_is_a_usage_error():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--shapes", "gpt5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown shape" in r.stderr


def test_llamacpp_peer_models_have_the_anchor_shapes(tmp_path):
    """benchmarks/llamacpp_peer.py's random-weight GGUFs (what llama.cpp is timed on) read
    back through jaxllm's own loader with the shape asked for, tied or not, and fresh
    random values rather than zeros."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import llamacpp_peer  # noqa: PLC0415

    import jaxllm  # noqa: PLC0415

    for tied in (True, False):
        shape = {"layers": 2, "d_model": 128, "d_ff": 320, "heads": 4, "kv_heads": 2, "vocab": 600,
                 "tied_embeddings": tied, "rope_theta": 5e5}
        path = llamacpp_peer.model_path(str(tmp_path), f"tied{tied}", llamacpp_peer.shape_config("s", {"s": shape}),
                                        "F16")
        model = jaxllm.load(path)
        c = model.config
        assert (c.n_layers, c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.vocab_size) == (2, 128, 320, 4, 2, 600)
        assert c.tie_embeddings == tied and c.rope_theta == 5e5
        embed = np.asarray(model.params.embed, np.float32)
        assert embed.std() > 0.01 and np.isfinite(embed).all()


def test_random_moe_files_of_each_family_load_as_their_shape(tmp_path):
    """benchmarks/random_gguf.py's Qwen3-MoE and gpt-oss files (Q8_0 matrices, MXFP4
    experts as gpt-oss ships them) read back through jaxllm's loader with the shape
    asked for, experts kept packed, and give finite logits."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import random_gguf  # noqa: PLC0415

    import jaxllm  # noqa: PLC0415
    from jaxllm.config import PRESETS  # noqa: PLC0415

    small = dict(vocab_size=640, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4,
                 n_active_experts=2, expert_d_ff=32, kernels="xla")
    for name, matrices, experts in (("qwen3moe30b", "F16", "Q8_0"), ("gptoss20b", "Q8_0", "MXFP4")):
        config = PRESETS[name].replace(**small)
        path = str(tmp_path / f"{name}.gguf")
        random_gguf.write_random_gguf(path, config, matrices, experts)
        model = jaxllm.load(path, dtype="float32")
        c = model.config
        assert (c.arch, c.n_layers, c.n_experts, c.n_active_experts, c.expert_d_ff, c.head_dim) == (
            config.arch, 2, 4, 2, 32, 16)
        assert (c.attn_sinks, c.router_bias, c.mlp, c.rope_scaling) == (
            config.attn_sinks, config.router_bias, config.mlp, config.rope_scaling)
        assert isinstance(model.params.layers[0].w_in.w, jaxllm.QuantizedWeight)
        logits = jaxllm.forward(model.params, c, np.asarray([[5, 6, 7, 8]]))
        assert np.isfinite(np.asarray(logits)).all()


def test_expert_kernel_benchmark_compares_each_route(tmp_path):
    """benchmarks/expert_matvec_bench.py on its tiny projection (interpreted): every
    kernel row agrees with XLA's gathered route, and many pairs of quantized experts
    take the grouped kernel, as ops.moe_mlp would."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import expert_matvec_bench

    out = tmp_path / "em.json"
    assert expert_matvec_bench.main(["--projections", "tiny", "--tokens", "1,64", "--tilings", "default",
                                     "--reps", "1", "--loop", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    routes = {(r["weights"], r["tokens"]): [] for r in rows}
    for r in rows:
        routes[(r["weights"], r["tokens"])].append(r["route"])
        if r["route"] != "xla_gather":
            assert r["rel_err_vs_xla"] < (1e-2 if r["weights"] == "int8" and r["tokens"] == 1 else 1e-5)
    assert routes[("int8", 64)] == ["xla_gather", "kernel_grouped"]
    assert routes[("bf16", 1)] == ["xla_gather", "kernel_default"]


def test_serve_bench_drives_jaxllm_serve_in_a_process_of_its_own(tmp_path):
    """benchmarks/serve_bench.py --engine jaxllm-server (the harness the llama-server
    peer shares) starts `jaxllm serve` on a model file, runs an offline and an online
    workload through the openai client, counts every requested token and writes its
    rows."""
    import jax  # noqa: PLC0415
    from conftest import tiny  # noqa: PLC0415
    from tiny_gguf import write_gguf  # noqa: PLC0415

    import jaxllm  # noqa: PLC0415
    c = tiny(vocab_size=300, max_seq_len=256)
    model = write_gguf(tmp_path / "t.gguf", c, jaxllm.init_params(c, jax.random.PRNGKey(0)))
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "serve_bench.py"), "--engine",
                        "jaxllm-server", "--model", str(model), "--workloads", "12/5x6,8/3x4@2", "--max-batch", "4",
                        "--max-context", "64", "--kv-pages", "12", "--page-size", "16", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(row["workload"], row["mode"], row["concurrency"]) for row in rows] == [
        ("12/5", "offline", 6), ("8/3", "online", 2)]
    assert [row["output_tokens"] for row in rows] == [30, 12]  # ignore_eos: every request to its length
    assert all(row["engine"] == "jaxllm" and row["output_tok_s"] > 0 and row["ttft_ms_p50"] > 0 for row in rows)
