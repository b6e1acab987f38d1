"""Where the serving engine's thread spends its time (cProfile), on a model small enough
that the host's work shows: one layer of width 64 with SmolLM2's 49,152-token
vocabulary, `--slots` slots on a paged pool, a warm wave of `--slots` 128/128 requests,
then twice as many measured. Prints the output rate and the engine thread's top
functions by their own time.

    python benchmarks/engine_host_profile.py --slots 256
"""

import argparse
import cProfile
import os
import pstats
import sys
import threading
import time
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_bench  # noqa: E402

import jaxllm  # noqa: E402
from jaxllm.batching import Engine  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--overlap", action="store_true", help="Engine(overlap=True)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    config = replace(jaxllm.PRESETS["smol135m"], n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, head_dim=32,
                     d_ff=128)
    params = jaxllm.init_params(config, jax.random.PRNGKey(0), jnp.float32)
    engine = Engine(params, config, serve_bench.placeholder_tokenizer(config.vocab_size, 0), n_slots=args.slots,
                    max_context=512, steps_per_chunk=8, kv_pages=args.slots * 8, page_size=64, overlap=args.overlap)
    profile = cProfile.Profile()
    serve = engine._serve

    def profiled():
        profile.enable()
        serve()
        profile.disable()

    engine._thread = threading.Thread(target=profiled, daemon=True)
    engine.start()
    rng = np.random.default_rng(0)
    prompts = serve_bench.prompts_of(rng, 2 * args.slots, 128, config.vocab_size, [])
    serve_bench.drive_engine(engine, prompts[:args.slots], 128, args.slots, [0.0] * args.slots)
    t0 = time.perf_counter()
    traces = serve_bench.drive_engine(engine, prompts, 128, len(prompts), [0.0] * len(prompts))
    seconds = time.perf_counter() - t0
    engine.shutdown()
    print(f"{sum(t.events[-1][1] for t in traces if t.events) / seconds:,.0f} output tok/s over {seconds:.1f} s")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
