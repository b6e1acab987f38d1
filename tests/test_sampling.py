import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ARCH_CONFIGS

import jaxllm
from jaxllm import SamplerSettings, filter_logits, sample
from jaxllm.sampling import penalize_repeats

LOGITS = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.25, 0.2]]))  # probabilities, shuffled


def kept(settings):
    return np.isfinite(np.asarray(filter_logits(LOGITS, settings)))[0].tolist()


def off(**kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    base.update(kw)
    return SamplerSettings(**base)


def test_top_k_keeps_exactly_the_k_best():
    assert kept(off(top_k=2)) == [False, True, False, True, False]
    assert kept(off(top_k=1)) == [False, True, False, False, False]
    assert kept(off(top_k=99)) == [True] * 5


def test_top_p_keeps_the_smallest_set_reaching_p():
    # sorted: 0.4, 0.25, 0.2, 0.1, 0.05; cumulative 0.4, 0.65, 0.85, 0.95, 1.0
    assert kept(off(top_p=0.39)) == [False, True, False, False, False]
    assert kept(off(top_p=0.41)) == [False, True, False, True, False]
    assert kept(off(top_p=0.84)) == [False, True, False, True, True]
    assert kept(off(top_p=0.9)) == [False, True, True, True, True]
    # top-p after top-k renormalises over the k survivors: 0.4/0.65 = 0.615
    assert kept(off(top_k=2, top_p=0.6)) == [False, True, False, False, False]
    assert kept(off(top_k=2, top_p=0.62)) == [False, True, False, True, False]


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    assert kept(off(min_p=0.6)) == [False, True, False, True, False]  # floor 0.24
    assert kept(off(min_p=0.3)) == [False, True, False, True, True]  # floor 0.12
    assert kept(off(min_p=0.2)) == [False, True, True, True, True]  # floor 0.08


def test_temperature_scales_logits():
    out = np.asarray(filter_logits(LOGITS, off(temperature=0.5)))
    np.testing.assert_allclose(out, np.asarray(LOGITS) / 0.5, rtol=1e-6)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = jnp.array([[2.0, -2.0, 1.0]])
    seen = jnp.array([[True, True, False]])
    np.testing.assert_allclose(penalize_repeats(logits, seen, 2.0), [[1.0, -4.0, 1.0]])


def test_samples_follow_the_filtered_distribution():
    n = 20000
    logits = jnp.broadcast_to(LOGITS, (n, 5))
    keys = jax.random.split(jax.random.PRNGKey(np.random.randint(1 << 30)), n)
    draws = np.asarray(sample(logits, keys, off(top_k=3)))
    freq = np.bincount(draws, minlength=5) / n
    expect = np.array([0, 0.4, 0, 0.25, 0.2]) / 0.85
    # 5 standard errors of a binomial proportion
    assert np.all(np.abs(freq - expect) < 5 * np.sqrt(expect * (1 - expect) / n) + 1e-9)


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.PRNGKey(np.random.randint(1 << 30)), (7, 50))
    np.testing.assert_array_equal(sample(logits, jax.random.split(jax.random.PRNGKey(0), 7), SamplerSettings.greedy()),
                                  np.argmax(logits, -1))


def test_same_seed_same_tokens_other_seed_other_tokens():
    c = ARCH_CONFIGS["smollm2"].replace(eos_token_ids=())
    params = jaxllm.init_params(c, jax.random.PRNGKey(1))
    s = SamplerSettings(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    run = lambda seed: jaxllm.generate(params, c, [[1, 2, 3]], max_new_tokens=24, settings=s,
                                       seed=seed).tokens
    assert run(5) == run(5)
    assert run(5) != run(6)


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"), (dict(min_p=-0.1), "min_p"), (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_invalid_settings_name_the_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        SamplerSettings(**kw)


def test_presence_and_frequency_penalties_match_a_numpy_greedy_loop():
    """Greedy generation with OpenAI's penalties against a host loop that scores the
    whole sequence with forward() and subtracts presence + frequency * count (of the
    generated tokens only) in NumPy before its argmax; settings out of [-2, 2] fail."""
    c = ARCH_CONFIGS["smollm2"].replace(eos_token_ids=())
    params = jaxllm.init_params(c, jax.random.PRNGKey(1))
    prompt, presence, frequency = [1, 2, 3], 0.7, 1.3
    s = SamplerSettings.greedy(presence_penalty=presence, frequency_penalty=frequency)
    got = jaxllm.generate(params, c, [prompt], max_new_tokens=10, settings=s).tokens[0]
    seq, counts = list(prompt), np.zeros(c.vocab_size)
    for _ in range(10):
        logits = np.asarray(jaxllm.forward(params, c, jnp.asarray([seq])))[0, -1].astype(np.float64)
        token = int(np.argmax(logits - presence * (counts > 0) - frequency * counts))
        counts[token] += 1
        seq.append(token)
    assert got == seq[len(prompt):]
    plain = jaxllm.generate(params, c, [prompt], max_new_tokens=10, settings=SamplerSettings.greedy()).tokens[0]
    assert len(set(got)) > len(set(plain))  # the guard: the penalties change what is generated
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(ValueError, match=name):
            SamplerSettings(**{name: 2.5})
