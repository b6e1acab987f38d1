"""The paged KV cache (cache.PagedKVCache, pages.PagePool, issue 27): a model reading and
writing its cache through a shuffled page table gives the contiguous cache's logits and
keys, on the XLA path and on the kernels (interpreted); the pool's bookkeeping; the
engine on a pool small enough that requests wait for pages and cached prefixes are
evicted answers every request as it would alone (also tests/test_soak.py)."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ARCH_CONFIGS, greedy_alone, serve_all, serve_together, served_model
from test_kernels import prefill_and_steps

import jaxllm
from jaxllm.batching import Engine, Request
from jaxllm.cache import PagedKVCache, init_paged_cache, layer_view
from jaxllm.pages import PagePool, pages_for_memory


def paged_like(config, batch, capacity, page, rng):
    """An empty paged cache whose rows hold shuffled pages of a pool with spare pages."""
    cache = init_paged_cache(config, batch, capacity, batch * capacity // page + 3, page, jnp.float32)
    table = rng.permutation(np.arange(1, cache.n_pages))[:batch * capacity // page].reshape(batch, -1)
    return cache.replace(pages=jnp.asarray(table, jnp.int32))


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen3", "gemma", "gpt2"])
@pytest.mark.parametrize("kernels", ["xla", "pallas"])
def test_a_paged_cache_gives_the_contiguous_caches_logits_and_keys(arch, kernels):
    c = ARCH_CONFIGS[arch].replace(tie_embeddings=False, kernels=kernels)
    rng = np.random.default_rng(np.random.randint(1 << 30))
    params = jaxllm.init_params(c, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    tokens = jnp.asarray(rng.integers(0, c.vocab_size, (2, 11)))
    ref_logits, ref_cache = prefill_and_steps(params, c.replace(kernels="xla"), tokens,
                                              jaxllm.init_cache(c, 2, 32, jnp.float32), prompt=5)
    logits, cache = prefill_and_steps(params, c, tokens, paged_like(c, 2, 32, 16, rng), prompt=5)
    assert isinstance(cache, PagedKVCache)
    for got, want in zip(logits, ref_logits):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(cache.lengths, ref_cache.lengths)
    for i in range(c.n_layers):
        k, v = layer_view(jaxllm.cache.cache_layer(cache, i))
        filled = np.arange(32)[None, :] < np.asarray(ref_cache.lengths)[:, None]
        np.testing.assert_allclose(np.asarray(k)[filled], np.asarray(ref_cache.k[i])[filled], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(v)[filled], np.asarray(ref_cache.v[i])[filled], rtol=1e-5, atol=1e-5)


def test_the_pool_gives_each_page_to_one_row_and_evicts_only_when_it_must():
    pool = PagePool(n_pages=11, page_size=16, n_rows=4, capacity=64)  # 10 usable pages, 4 a row
    assert pool.reserve([0], 40, ()) == [] and pool.held[0] == [1, 2, 3] and pool.free == 7
    before = (pool.table.copy(), [list(r) for r in pool.held], pool.free)
    assert pool.reserve([1, 2], 64, ()) is None  # 8 pages asked, 7 free, nothing evictable
    np.testing.assert_array_equal(pool.table, before[0])
    assert [list(r) for r in pool.held] == before[1] and pool.free == before[2]
    assert pool.reserve([1, 2], 64, [3, 0]) == [0]  # row 3 holds nothing; row 0's 3 pages make 10
    assert pool.held[0] == [] and not pool.table[0].any() and pool.free == 2
    assert all(len(pool.held[r]) == 4 for r in (1, 2))
    pool.check()
    kept = pool.held[1][:2]
    assert pool.reserve([1], 20, ()) == [] and pool.held[1] == kept and pool.free == 4  # gives 2 back
    assert pool.reserve([1], 64, ()) == [] and pool.held[1][:2] == kept  # its first pages stay
    np.testing.assert_array_equal(pool.table[1], pool.held[1])
    pool.release(2)
    assert pool.free == 6 and not pool.table[2].any()
    pool.check()
    assert pool.pages_for(1) == 1 and pool.pages_for(17) == 2 and pool.pages_for(1000) == 4


def test_prefix_pages_are_shared_counted_and_freed_by_the_last_holder():
    pool = PagePool(n_pages=13, page_size=16, n_rows=4, capacity=96)  # 12 usable, 6 a row
    assert pool.reserve([0], 70, ()) == []  # 5 pages: 1..5
    prefix = pool.held[0][:2]  # a 40-token prompt's beginning: 2 full pages
    assert pool.reserve([1, 2], 60, (), prefix) == []  # two choices: 2 shared + 2 own each
    assert pool.held[1][:2] == prefix == pool.held[2][:2] and pool.free == 12 - 5 - 4
    assert list(pool.refs[prefix]) == [3, 3]
    pool.check()
    # row 0 reused for another prompt: its shared pages are replaced, its own kept
    own = pool.held[0][2:]
    assert pool.reserve([0], 90, ()) == []
    assert not set(pool.held[0]) & set(prefix) and pool.held[0][2:5] == own
    assert list(pool.refs[prefix]) == [2, 2]
    pool.check()
    # evicting row 1 frees only its own pages; the shared ones live on in row 2
    assert pool.free == 0 and pool.reserve([3], 32, [], ()) is None  # nothing evictable offered
    assert pool.reserve([3], 64, [1], ()) is None  # 4 pages asked; row 1 gives 2
    assert pool.reserve([3], 32, [1], ()) == [1]
    assert list(pool.refs[prefix]) == [1, 1] and pool.free == 0 and pool.held[1] == []
    pool.release(2)
    pool.check()
    assert pool.free == 12 - 6 - 2


def test_a_row_grows_by_fresh_pages_and_evicts_for_them():
    pool = PagePool(n_pages=9, page_size=16, n_rows=3, capacity=128)  # 8 usable
    assert pool.reserve([0], 20, ()) == [] and pool.reserve([1], 64, ()) == []  # 2 + 4 pages
    assert pool.grow(0, 32, ()) == [] and len(pool.held[0]) == 2  # already enough
    assert pool.grow(0, 60, ()) == [] and len(pool.held[0]) == 4 and pool.free == 0
    before = (pool.table.copy(), pool.free)
    assert pool.grow(0, 80, ()) is None  # nothing free, nothing evictable
    np.testing.assert_array_equal(pool.table, before[0])
    assert pool.grow(0, 80, [1]) == [1] and len(pool.held[0]) == 5 and pool.free == 3
    np.testing.assert_array_equal(pool.table[0, :5], pool.held[0])
    pool.check()


def test_bad_pool_settings_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        PagePool(10, 24, 2, 48)
    with pytest.raises(ValueError, match="multiple"):
        PagePool(10, 16, 2, 40)
    with pytest.raises(ValueError, match="at least 2"):
        PagePool(1, 16, 2, 32)
    assert pages_for_memory(10_000, 0.5, 1_000) == 5
    with pytest.raises(ValueError, match="fraction"):
        pages_for_memory(10_000, 0.0, 1_000)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return served_model(tmp_path_factory, 5, 256)


def test_an_engine_on_a_small_pool_answers_every_request_as_alone(model):
    """Ten prompts, some sharing a 40-token beginning, through 6 rows on 12 pages of 16
    positions (each request needs 4-6 pages): requests wait for pages, cached prefixes are
    evicted, and every answer equals the prompt run alone; afterwards no running request
    holds a page and every page is held once or free."""
    rng = np.random.default_rng(3)
    system = rng.integers(3, 300, 40).tolist()
    prompts = [(system if i % 2 else []) + rng.integers(3, 300, int(rng.integers(2, 30))).tolist() for i in range(10)]
    engine = Engine(model.params, model.config, model.tokenizer, n_slots=6, max_context=128,
                    steps_per_chunk=4, prefill_tokens=64, kv_pages=13, page_size=16)
    try:
        requests = serve_all(engine, prompts, 24, start=True)
    finally:
        engine.shutdown()
    for prompt, request in zip(prompts, requests):
        assert request.finish_reason in ("stop", "length"), request.error
        assert request.ids == greedy_alone(model, prompt, 24)
    engine.pool.check()
    assert engine.running == 0
    small = Engine(model.params, model.config, model.tokenizer, n_slots=2, max_context=128, kv_pages=5,
                   page_size=16)  # 64 positions in all
    small.check([5] * 30, 30)
    with pytest.raises(jaxllm.ContextLengthError, match="pool holds 64"):
        small.check([5] * 50, 50)  # fits a row's 128 positions, not the pool


def test_a_row_written_in_a_call_lends_no_pages_to_a_prompt_in_that_call(model):
    """A fresh prompt takes the least recently used row, whose pages it keeps (it alone
    holds them); a prompt in the same admission call beginning like that row's old
    request must not share those pages (the fresh prompt's prefill writes over them):
    both answer as alone. Found by the engine soak once freed rows were taken in turn."""
    rng = np.random.default_rng(11)
    system = rng.integers(3, 300, 40).tolist()
    first, other, fresh = system + [7, 8, 9], rng.integers(3, 300, 20).tolist(), rng.integers(3, 300, 45).tolist()
    follow = system + [5, 6]
    engine = Engine(model.params, model.config, model.tokenizer, n_slots=2, max_context=128, steps_per_chunk=4,
                    prefill_tokens=256, kv_pages=17, page_size=16).start()
    try:
        serve_all(engine, [first], 8)  # row 0: the system prompt, least recently used after...
        serve_all(engine, [other], 8)  # ...row 1 serves another request
        requests = serve_together(engine, (fresh, follow), 12)  # one admission call, the fresh one first
    finally:
        engine.shutdown()
    for prompt, request in zip((fresh, follow), requests):
        assert request.ids == greedy_alone(model, prompt, 12)


def test_requests_the_pool_cannot_hold_together_are_preempted_and_resume_as_alone(model):
    """Six requests of ~10-token prompts and 40 tokens each through 6 rows on 8 pages of 16
    positions: each needs 4 pages at the end and all start together (pages are given a
    chunk at a time), so running requests are preempted and recompute what they had;
    every answer (greedy, and sampled with a seed) equals the prompt run alone."""
    from jaxllm.batching import Metrics

    class Counting(Metrics):
        preemptions = 0

        def preempted(self):
            Counting.preemptions += 1

    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 300, int(rng.integers(6, 14))).tolist() for _ in range(6)]
    hot = jaxllm.SamplerSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, frequency_penalty=0.5)

    def run(engine, settings):
        done = threading.Semaphore(0)
        requests = [Request(p, 40, settings, seed=i, ignore_eos=True,
                            on_update=lambda r, t, reason: reason and done.release()) for i, p in enumerate(prompts)]
        for r in requests:
            engine.submit(r)
        for _ in requests:
            assert done.acquire(timeout=300)
        return requests

    engine = Engine(model.params, model.config, model.tokenizer, n_slots=6, max_context=128, steps_per_chunk=4,
                    kv_pages=9, page_size=16, metrics=Counting()).start()
    try:
        crowd = run(engine, jaxllm.SamplerSettings.greedy()) + run(engine, hot)
        preempted = Counting.preemptions
        alone = []
        for settings in (jaxllm.SamplerSettings.greedy(), hot):
            for i, p in enumerate(prompts):
                alone += run_one(engine, p, settings, i)
    finally:
        engine.shutdown()
    assert preempted > 0
    for got, want in zip(crowd, alone):
        assert got.finish_reason == "length" and len(got.ids) == 40, got.error
        assert got.ids == want.ids
    engine.pool.check()


def run_one(engine, prompt, settings, seed):

    done = threading.Semaphore(0)
    r = Request(prompt, 40, settings, seed=seed, ignore_eos=True, on_update=lambda r, t, reason: reason and done.release())
    engine.submit(r)
    assert done.acquire(timeout=300)
    return [r]
