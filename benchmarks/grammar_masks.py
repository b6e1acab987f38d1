"""Host cost of one step's grammar mask (grammar.Matchers.masks) for 1 and 8 rows on
SmolLM2's tokenizer, over a 60-step random walk through each grammar's language. The
mask timings in NOTES ("Constrained decoding") came from this script.

    python benchmarks/grammar_masks.py
"""
import time

import numpy as np

import jaxllm
from jaxllm.grammar import Matchers

model = jaxllm.load()
grammars = jaxllm.Grammars(model.tokenizer, model.config.vocab_size)
rng = np.random.default_rng(0)
cases = {
    "JSON array of integers": grammars.json_schema({"type": "array", "items": {"type": "integer"}}),
    "two-field object": grammars.json_schema({"type": "object", "required": ["name", "age"], "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}}}),
    "regex": grammars.regex("[0-9]+(, [0-9]+)*"),
}
for name, grammar in cases.items():
    for rows in (1, 8):
        bank = Matchers(grammars)
        for r in range(rows):
            bank.attach(r, grammar)
        times = []
        for _ in range(60):
            t = time.perf_counter()
            bits = bank.masks(range(rows))
            times.append(time.perf_counter() - t)
            allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :model.config.vocab_size]
            bank.consume(np.asarray([rng.choice(np.flatnonzero(a)) for a in allowed]))
        print(f"{name}, {rows} rows: median {np.median(times) * 1e6:.0f} us, max {max(times) * 1e6:.0f} us")
