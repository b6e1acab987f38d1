#!/usr/bin/env python
"""Plot a bench.py result: tg128 batch-1 tok/s per shape for jaxllm, the peers, and
the bandwidth roofline. python scripts/plot_bench.py RESULT.json [--anchors A] [--out PNG]"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("result")
    p.add_argument("--anchors", help="peer figures (default: the file the result names, as bench.py "
                                     "recorded it, else ../shared/anchors/h100-2026-11-23.json)")
    p.add_argument("--out", default=os.path.join(HERE, "..", "benchmarks", "tg128.png"))
    args = p.parse_args()
    report = json.load(open(args.result))
    if args.anchors is None:
        recorded = report.get("anchors")
        args.anchors = (os.path.join(HERE, "..", recorded) if recorded else
                        os.path.join(HERE, "..", "..", "shared", "anchors", "h100-2026-11-23.json"))
    anchors = json.load(open(args.anchors)) if os.path.exists(args.anchors) else {}
    rows = {r["shape"]: r for r in report["results"] if r["bench"] == "tg128"}
    hf = {r["shape"]: r.get("tok_s") for r in report["results"] if r["bench"] == "tg128_hf_transformers"}
    copy_bw = next((r["gbps"] for r in report["results"] if r["bench"] == "copy_bandwidth"), None)
    shapes = list(rows)
    series = {
        "jaxllm (bf16)": [rows[s]["tok_s"] for s in shapes],
        "llama.cpp (F16, anchors)": [anchors.get("llama_cpp", {}).get("tg128", {}).get(s, {}).get("F16", 0)
                                     for s in shapes],
        "HF transformers static cache (same run)": [hf.get(s) or 0 for s in shapes],
        "plain JAX scan (anchors)": [anchors.get("plain_jax_scan", {}).get("tg128_batch1", {}).get(s, 0)
                                     for s in shapes],
    }
    x = np.arange(len(shapes))
    width = 0.8 / (len(series) + 1)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + i * width, vals, width, label=name)
    datasheet = next((r["datasheet_TBps"] for r in rows.values() if r.get("datasheet_TBps")), 3.35)
    roof = [datasheet * 1e12 / rows[s]["weight_bytes_per_step"] for s in shapes]
    ax.bar(x + len(series) * width, roof, width, label=f"roofline: weights at {datasheet} TB/s",
           color="lightgray")
    if copy_bw:
        for i, s in enumerate(shapes):
            ax.plot([x[i] - width / 2, x[i] + (len(series) + 0.5) * width],
                    [copy_bw * 1e9 / rows[s]["weight_bytes_per_step"]] * 2, "k--", lw=1,
                    label="roofline at measured copy bandwidth" if i == 0 else None)
    ax.set_xticks(x + len(series) * width / 2, shapes)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s, batch 1 (log)")
    ax.set_title(f"tg128 on {report['device']} (jax {report['jax_version']}, {report['date'][:10]})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
