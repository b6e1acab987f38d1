"""Where a decode step's time goes: per-kernel device time of the compiled decode loop.

    python benchmarks/profile_decode.py --shapes smol135m,llama1b --weights bf16,int4 [--tokens 32] [--batch B]

Builds a random-weight model of each shape, runs the library's decode loop (as
scripts/bench.py's tg128 does) once to compile and once under jax.profiler, then
reads the trace's GPU stream lines: kernels per step, device time per step, and the
step's wall time. Wall time minus kernel time is time the GPU sat between kernels
(launch gaps, host work). Prints the heaviest kernels per shape and a summary table
last; writes every kernel's figures as JSON to --out.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jaxllm  # noqa: E402
from jaxllm import PRESETS, SamplerSettings  # noqa: E402
from jaxllm.generate import start  # noqa: E402

GREEDY = SamplerSettings.greedy()


def kernel_events(trace_dir: str):
    """(name, start_ns, duration_ns) of every kernel on the device's stream lines."""
    from jax.profiler import ProfileData

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    events = []
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):
                events += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
    return events


def profile(params, config, tokens: int, batch: int = 1) -> dict:
    def run():
        gen = start(params, config, [[1]] * batch, max_new_tokens=tokens + 1, settings=GREEDY, stop_tokens=[])
        jax.block_until_ready(gen.state)
        t = time.perf_counter()
        jax.block_until_ready(gen.run(params, config, tokens + 1).tokens)
        return time.perf_counter() - t

    run()
    untraced = min(run() for _ in range(3))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            traced = run()
        events = kernel_events(d)
    per_kernel = collections.defaultdict(lambda: [0, 0])
    for name, _, dur in events:
        per_kernel[name][0] += 1
        per_kernel[name][1] += dur
    total_ns = sum(v[1] for v in per_kernel.values())
    span_ns = (max(s + d for _, s, d in events) - min(s for _, s, _ in events)) if events else 0
    kernels = sorted(({"kernel": k, "calls_per_step": n / tokens, "us_per_step": ns / tokens / 1e3}
                      for k, (n, ns) in per_kernel.items()), key=lambda r: -r["us_per_step"])
    return {"step_ms_untraced": 1e3 * untraced / tokens, "step_ms_traced": 1e3 * traced / tokens,
            "kernel_ms_per_step": total_ns / tokens / 1e6, "span_ms_per_step": span_ns / tokens / 1e6,
            "kernels_per_step": len(events) / tokens, "kernels": kernels}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smol135m,llama1b")
    ap.add_argument("--weights", default="bf16")
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    report, rows = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                    "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
                    "command": "python " + " ".join(sys.argv), "runs": []}, []
    for shape in args.shapes.split(","):
        config = PRESETS[shape].replace(kernels=args.kernels)
        base = jax.block_until_ready(jaxllm.init_params(config, jax.random.PRNGKey(0), dtype))
        for mode in args.weights.split(","):
            params = base if mode in ("bf16", "f32") else jax.block_until_ready(
                jaxllm.quantize(base, mode, group_size=32))
            print(f"profiling {shape} {mode} ...", file=sys.stderr, flush=True)
            r = profile(params, config, args.tokens, args.batch)
            report["runs"].append({"shape": shape, "weights": mode, "batch": args.batch, **r})
            print(f"\n{shape} {mode}: heaviest kernels (us per step, calls per step)")
            for k in r["kernels"][:args.top]:
                print(f"  {k['us_per_step']:8.1f} {k['calls_per_step']:6.1f}  {k['kernel'][:90]}")
            rows.append((shape, mode, r))
            del params
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print("\nshape     weights  step ms  traced ms  kernel ms  kernels/step  gap ms (traced - kernels)")
    for shape, mode, r in rows:
        print(f"{shape:9} {mode:7} {r['step_ms_untraced']:8.3f} {r['step_ms_traced']:9.3f} "
              f"{r['kernel_ms_per_step']:9.3f} {r['kernels_per_step']:12.1f} "
              f"{r['step_ms_traced'] - r['kernel_ms_per_step']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
