import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ARCH_CONFIGS, tiny
from reference_numpy import forward_one, to64

import jaxllm
from jaxllm import init_cache


def rel_err(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def random_tokens(seed, shape, vocab):
    return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab), np.int32)


def test_forward_matches_float64_numpy(arch_config):
    c = arch_config
    params = jaxllm.init_params(c, jax.random.PRNGKey(np.random.randint(1 << 30)))
    assert c.param_count() == sum(x.size for x in jax.tree.leaves(params))  # what `jaxllm info` reports
    tokens = random_tokens(np.random.randint(1 << 30), (2, 11), c.vocab_size)
    logits = jaxllm.forward(params, c, jnp.asarray(tokens))
    p64 = to64(params)
    for b in range(2):
        ref = forward_one(p64, c, tokens[b])
        assert rel_err(logits[b], ref) < 1e-5


def test_sliding_window_changes_the_result():
    """Guards the window test above against a window that is never applied."""
    c = ARCH_CONFIGS["mistral"]
    params = jaxllm.init_params(c, jax.random.PRNGKey(3))
    tokens = jnp.asarray(random_tokens(4, (1, 12), c.vocab_size))
    windowed = jaxllm.forward(params, c, tokens)
    full = jaxllm.forward(params, c.replace(sliding_window=None), tokens)
    np.testing.assert_allclose(windowed[:, :5], full[:, :5], rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(windowed[:, 6:] - full[:, 6:])).max() > 1e-3


def test_prefill_then_steps_equal_full_forward(arch_config):
    c = arch_config
    params = jaxllm.init_params(c, jax.random.PRNGKey(np.random.randint(1 << 30)))
    T, prompt = 13, 5
    tokens = jnp.asarray(random_tokens(np.random.randint(1 << 30), (2, T), c.vocab_size))
    full = np.asarray(jaxllm.forward(params, c, tokens))
    cache = init_cache(c, 2, 32, jnp.float32)
    logits, cache = jaxllm.extend(params, c, tokens[:, :prompt], jnp.array([prompt, prompt]), cache)
    np.testing.assert_allclose(logits, full[:, prompt - 1], rtol=2e-5, atol=2e-5)
    for t in range(prompt, T):
        logits, cache = jaxllm.decode_step(params, c, tokens[:, t], cache)
        np.testing.assert_allclose(logits, full[:, t], rtol=2e-5, atol=2e-5)
    assert cache.lengths.tolist() == [T, T]


def test_rows_of_different_lengths_match_each_row_alone():
    c = ARCH_CONFIGS["mistral"]
    params = jaxllm.init_params(c, jax.random.PRNGKey(5))
    lens = [3, 9, 6]
    rows = [random_tokens(10 + i, (n,), c.vocab_size).tolist() for i, n in enumerate(lens)]
    padded = np.zeros((3, 16), np.int32)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    cache = init_cache(c, 3, 32, jnp.float32)
    logits, _ = jaxllm.extend(params, c, jnp.asarray(padded), jnp.asarray(lens), cache)
    for i, r in enumerate(rows):
        alone = jaxllm.forward(params, c, jnp.asarray([r]))[0, -1]
        np.testing.assert_allclose(logits[i], alone, rtol=2e-5, atol=2e-5)


def test_greedy_generation_is_the_argmax_chain(arch_config):
    c = arch_config.replace(eos_token_ids=())
    params = jaxllm.init_params(c, jax.random.PRNGKey(np.random.randint(1 << 30)))
    prompt = random_tokens(np.random.randint(1 << 30), (6,), c.vocab_size).tolist()
    out = jaxllm.generate(params, c, [prompt], max_new_tokens=8,
                          settings=jaxllm.SamplerSettings.greedy()).tokens[0]
    seq = list(prompt)
    for _ in range(8):
        seq.append(int(jnp.argmax(jaxllm.forward(params, c, jnp.asarray([seq]))[0, -1])))
    assert out == seq[len(prompt):]


def test_batch_generation_equals_each_prompt_alone():
    c = ARCH_CONFIGS["qwen2"].replace(eos_token_ids=())
    params = jaxllm.init_params(c, jax.random.PRNGKey(7))
    prompts = [random_tokens(20 + i, (n,), c.vocab_size).tolist() for i, n in enumerate([2, 7, 4])]
    greedy = jaxllm.SamplerSettings.greedy()
    together = jaxllm.generate(params, c, prompts, max_new_tokens=10, settings=greedy).tokens
    for p, row in zip(prompts, together):
        assert row == jaxllm.generate(params, c, [p], max_new_tokens=10, settings=greedy).tokens[0]


def test_rows_stop_on_their_stop_tokens_and_loop_ends_early():
    c = ARCH_CONFIGS["llama3"].replace(eos_token_ids=())
    params = jaxllm.init_params(c, jax.random.PRNGKey(8))
    prompts = [[5, 6, 7], [9, 10]]
    greedy = jaxllm.SamplerSettings.greedy()
    free = jaxllm.generate(params, c, prompts, max_new_tokens=12, settings=greedy).tokens
    stop = free[0][3]  # the 4th token of row 0 becomes a stop token
    out = jaxllm.generate(params, c, prompts, max_new_tokens=12, settings=greedy, stop_tokens=[stop])
    first = free[0].index(stop)
    assert out.tokens[0] == free[0][:first] and out.stop_reasons[0] == "stop"
    if stop in free[1]:
        assert out.tokens[1] == free[1][:free[1].index(stop)]
    else:
        assert out.tokens[1] == free[1] and out.stop_reasons[1] == "length"
    # Every row stopping ends the loop before the budget.
    from jaxllm.generate import start

    run = start(params, c, [prompts[0]], max_new_tokens=12, settings=greedy, stop_tokens=[stop]).run(params, c, 12)
    assert int(run.column) == first + 1 and int(run.state.n_generated[0]) == first + 1


def test_stream_yields_the_same_tokens_as_generate():
    c = ARCH_CONFIGS["gpt2"].replace(eos_token_ids=())
    params = jaxllm.init_params(c, jax.random.PRNGKey(9))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    s = jaxllm.SamplerSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    whole = jaxllm.generate(params, c, prompts, max_new_tokens=11, settings=s, seed=4).tokens
    streamed = [[], []]
    chunks = 0
    for chunk in jaxllm.generate_stream(params, c, prompts, max_new_tokens=11, settings=s,
                                        seed=4, chunk=3):
        chunks += 1
        for b, toks in enumerate(chunk):
            streamed[b] += toks
    assert streamed == whole and chunks >= 4


def test_prompt_longer_than_context_is_rejected():
    c = tiny(max_seq_len=16)
    params = jaxllm.init_params(c, jax.random.PRNGKey(0))
    with pytest.raises(jaxllm.ContextLengthError, match="16"):
        jaxllm.generate(params, c, [list(range(1, 17))], max_new_tokens=2)
    # A prompt that fits stops at the context end.
    out = jaxllm.generate(params, c.replace(eos_token_ids=()), [list(range(1, 13))],
                          max_new_tokens=50, settings=jaxllm.SamplerSettings.greedy())
    assert len(out.tokens[0]) == 16 - 12 + 1 and out.stop_reasons[0] == "length"


def test_decode_loop_updates_the_cache_in_place():
    """The compiled decode loop aliases the donated state (cache included) to its
    output, and its scratch memory does not grow with the number of layers: no
    step copies the cache (one layer's scratch is attention's own working set)."""
    from jaxllm.decoding import decode
    from jaxllm.generate import start

    greedy = jaxllm.SamplerSettings.greedy()
    stats = {}
    for layers in (4, 8):
        c = tiny(n_layers=layers, max_seq_len=1024)
        params = jaxllm.init_params(c, jax.random.PRNGKey(0))
        run = start(params, c, [[1, 2, 3]] * 4, max_new_tokens=900, settings=greedy)
        compiled = decode.lower(params, c, greedy, run.state, run.tokens, run.column, run.stop_ids,
                                jnp.int32(900)).compile()
        cache_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(run.state.cache))
        mem = compiled.memory_analysis()
        assert mem.alias_size_in_bytes >= cache_bytes
        stats[layers] = (mem.temp_size_in_bytes, cache_bytes)
    (temp4, _), (temp8, cache8) = stats[4], stats[8]
    layer_bytes = cache8 / 8
    assert temp8 - temp4 < layer_bytes / 8
    assert temp8 < cache8 / 4


def test_generate_reports_logprobs_equal_to_scoring():
    """generate(logprobs=k): each token's log-probability is teacher-forced scoring's
    for the same text (the decode loop against one forward pass, float32), its top k
    sorted with the greedy token first; the tokens are those generated without it."""
    c = ARCH_CONFIGS["qwen3"].replace(eos_token_ids=())
    params = jaxllm.init_params(c, jax.random.PRNGKey(4))
    prompts, greedy = [[5, 6, 7], [9, 10]], jaxllm.SamplerSettings.greedy()
    out = jaxllm.generate(params, c, prompts, max_new_tokens=7, settings=greedy, logprobs=3)
    assert out.tokens == jaxllm.generate(params, c, prompts, max_new_tokens=7, settings=greedy).tokens
    for prompt, tokens, scored in zip(prompts, out.tokens, out.logprobs):
        nll = jaxllm.score_ids(params, c, prompt + tokens)["nll"][len(prompt) - 1:]
        assert len(scored) == len(tokens) == 7
        np.testing.assert_allclose([lp for lp, _ in scored], [-x for x in nll], rtol=0, atol=1e-4)
        for token, (lp, top) in zip(tokens, scored):
            assert len(top) == 3 and top[0][0] == token and abs(top[0][1] - lp) < 1e-5
            assert [t for _, t in top] == sorted((t for _, t in top), reverse=True)
    assert jaxllm.generate(params, c, prompts, max_new_tokens=2, settings=greedy).logprobs is None
    with pytest.raises(ValueError, match="logprobs"):
        jaxllm.generate(params, c, prompts, max_new_tokens=2, logprobs=-1)
