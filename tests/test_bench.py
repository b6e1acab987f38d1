"""scripts/bench.py --quick runs end to end on the CPU and writes the documented schema."""

import json
import os
import subprocess
import sys

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
    assert "tg128" in r.stdout  # the table is printed last


def test_unknown_shape_is_a_usage_error():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--shapes", "gpt5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown shape" in r.stderr
