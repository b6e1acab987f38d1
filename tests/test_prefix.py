"""Prefix reuse in the serving engine: the index (prefix.py), and an engine whose
prompts share beginnings answering exactly as each prompt run alone by `generate`."""

import threading
import time

import numpy as np
import pytest

from conftest import greedy_alone, serve_together, served_model
from conftest import serve_all as run
from jaxllm.batching import Engine, Metrics, Request
from jaxllm.prefix import PrefixIndex, block_hashes


def test_index_finds_the_longest_held_prefix_and_evicts_the_oldest():
    index = PrefixIndex(4, block=4)
    index.hold(0, list(range(10)))
    index.hold(1, list(range(7)) + [99, 98, 97])
    index.hold(2, [5] * 12)
    # exact common length, past the last whole block, capped by the limit
    assert index.match(list(range(9)) + [50], limit=9) == (0, 9)
    assert index.match(list(range(9)) + [50], limit=6)[1] == 6  # rows 0 and 1 both hold it
    assert index.match(list(range(7)) + [99, 1], limit=9) == (1, 8)
    assert index.match([5, 5, 5, 6, 5], limit=4) == (-1, 0)  # no whole block in common
    assert index.match([1, 2, 3, 4, 5], limit=5) == (-1, 0)
    index.forget(0)
    assert index.match(list(range(9)), limit=8) == (1, 7)
    index.touch(3)
    assert index.by_age([3, 2, 1, 0]) == [1, 2, 0, 3]  # 0 forgot last, 3 touched last


def test_a_hash_collision_is_caught_by_the_tokens():
    index = PrefixIndex(2, block=4)
    index.hold(0, [1, 2, 3, 4, 5, 6, 7, 8])
    wrong = [1, 2, 3, 4, 9, 9, 9, 9]
    # Pretend the second block of `wrong` hashes like row 0's.
    h = block_hashes(wrong, 4)[1]
    index._rows[h] = {0}
    assert index.match(wrong, limit=8) == (0, 4)


class Recorder(Metrics):
    def __init__(self):
        self.prompt, self.reused = 0, 0

    def prefill(self, prompt_tokens, reused_tokens):
        self.prompt += prompt_tokens
        self.reused += reused_tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return served_model(tmp_path_factory, 4, 512)


@pytest.mark.parametrize("reuse", [True, False])
def test_shared_prefixes_are_copied_and_answers_do_not_change(model, reuse):
    rng = np.random.default_rng(0)
    system = rng.integers(3, 300, 150).tolist()
    prompts = [system + rng.integers(3, 300, n).tolist() for n in (3, 20, 41, 1, 9)]
    metrics = Recorder()
    engine = Engine(model.params, model.config, model.tokenizer, n_slots=6, max_context=512,
                    steps_per_chunk=4, prefill_tokens=1024, reuse_prefixes=reuse, metrics=metrics)
    try:
        # Queued before the engine starts: its first admission call sees all five, and
        # computes the shared 150 tokens once (the rest wait a call to copy them).
        first = run(engine, prompts, 12, start=True)
        # The next turn of a conversation: its prompt is an earlier prompt and answer.
        follow = prompts[1] + first[1].ids + rng.integers(3, 300, 5).tolist()
        second = run(engine, [follow], 12)
        # A prompt that a slot holds whole still computes its last token (its logits).
        again = run(engine, [prompts[4]], 12)
    finally:
        engine.shutdown()
    for p, r in zip(prompts + [follow, prompts[4]], first + second + again):
        assert r.ids == greedy_alone(model, p, 12)
    if reuse:
        # the 150 shared tokens for four of the five, then the earlier turn, then all but one
        assert metrics.reused >= 4 * 150 + len(prompts[1]) + len(first[1].ids) - 1 + len(prompts[4]) - 1
    else:
        assert metrics.reused == 0
    assert metrics.prompt == sum(map(len, prompts)) + len(follow) + len(prompts[4])


def test_one_call_mixing_a_deep_prefix_and_a_long_fresh_prompt(model):
    """Prompts of one admission call all run the call's widest width from their own
    starts: a short remainder after a long copied prefix beside a long fresh prompt
    must not run past the positions the call copies (it once overwrote its prefix)."""
    rng = np.random.default_rng(1)
    held = rng.integers(3, 300, 100).tolist()
    engine = Engine(model.params, model.config, model.tokenizer, n_slots=4, max_context=512,
                    steps_per_chunk=4, metrics=Recorder())
    try:
        run(engine, [held], 4, start=True)
        deep, fresh = held + [5, 6], rng.integers(3, 300, 60).tolist()
        requests = serve_together(engine, (deep, fresh), 8)  # both in the same call
    finally:
        engine.shutdown()
    assert engine.metrics.reused >= 100
    for p, r in zip((deep, fresh), requests):
        assert r.ids == greedy_alone(model, p, 8)


def test_a_long_prompt_is_prefilled_in_pieces_while_others_decode(model):
    """A prompt longer than the prefill budget is prefilled a piece per admission call,
    with decode chunks between them: a running stream keeps getting tokens meanwhile,
    and the long prompt's answer (and its second choice's) is `generate`'s."""

    class Timeline(Recorder):
        def __init__(self):
            super().__init__()
            self.events = []  # "first" for a request's first token, "more" for later ones

        def first_token(self, seconds):
            self.events.append("first")

        def tokens(self, count, seconds_each):
            self.events.append("more")

    rng = np.random.default_rng(2)
    metrics = Timeline()
    engine = Engine(model.params, model.config, model.tokenizer, n_slots=4, max_context=512,
                    steps_per_chunk=4, prefill_tokens=32, metrics=metrics)
    long_prompt = rng.integers(3, 300, 200).tolist()
    done = threading.Semaphore(0)
    end = lambda r, t, reason: reason and done.release()
    running = Request([5, 6, 7], 120, on_update=end)
    group = [Request(long_prompt, 10, on_update=end) for _ in range(2)]
    try:
        engine.start()
        engine.submit(running)
        while "first" not in metrics.events:
            time.sleep(0.01)
        mark = len(metrics.events)
        engine.submit_group(group)
        for _ in range(3):
            assert done.acquire(timeout=180)
    finally:
        engine.shutdown()
    # Seven pieces of 32 tokens: the running stream decoded between them.
    after = metrics.events[mark:]
    assert after.index("first") >= 5, after[:12]
    for r in group:
        assert r.ids == greedy_alone(model, long_prompt, 10)
    assert running.ids == greedy_alone(model, [5, 6, 7], 120)
    assert metrics.prompt == 3 + 200
