"""One step of the host-stepped loop's model pass (decoding._advance) and sampling
(_choose), each timed alone with block_until_ready, against a step of the compiled
loop (batching.decode_chunk, 8 steps), smol135m shape, 4 rows at temperature 1. The
CPU figures in NOTES ("Constrained decoding") came from this script.

    python benchmarks/stepped_vs_loop.py
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxllm
from jaxllm import decoding as D
from jaxllm.batching import decode_chunk, init_slots
from jaxllm.sampling import RowSampling, SamplerSettings

c = jaxllm.PRESETS["smol135m"]
params = jaxllm.init_params(c, jax.random.PRNGKey(0), jnp.bfloat16)
slots = init_slots(params, c, 4, 400)
hot = SamplerSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
slots = slots.replace(active=jnp.ones((4,), bool), max_new=jnp.full((4,), 10000, jnp.int32),
                      sampling=RowSampling.from_settings([hot] * 4))
stop = jnp.asarray([-2], jnp.int32)
masks = np.full((4, (c.vocab_size + 31) // 32), -1, np.int32)
box = {"cache": slots.cache, "state": slots.replace(cache=None)}


def timed_ms(f, n=5):
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


def advance():
    box["cache"], box["logits"] = D._advance(params, c, box["cache"], box["state"], 128)
    jax.block_until_ready(box["logits"])


def choose():
    box["state"], token, _ = D._choose(None, box["state"], box["cache"], box["logits"], stop, None, masks)
    jax.block_until_ready(token)


print(f"advance {timed_ms(advance):.1f} ms, choose {timed_ms(choose):.1f} ms")
state = box["state"].replace(cache=box["cache"])


def chunk():
    global state
    state, tokens, _ = decode_chunk(params, c, state, stop, 8, 128)
    jax.block_until_ready(tokens)


print(f"compiled loop {timed_ms(chunk, 3) / 8:.1f} ms a step")
