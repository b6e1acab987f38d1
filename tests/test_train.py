import jax
import jax.numpy as jnp
import numpy as np
from conftest import ARCH_CONFIGS

import jaxllm
from jaxllm.train import (TrainConfig, init_lora, init_train_state, load_params, merge_lora,
                          next_token_loss, save_params, train_step)


def setup(seed=0):
    c = ARCH_CONFIGS["smollm2"]
    params = jaxllm.init_params(c, jax.random.PRNGKey(seed))
    tokens = jnp.asarray(np.random.randint(0, c.vocab_size, (4, 12)), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None] < np.array([12, 9, 6, 12])[:, None], jnp.int32)
    return c, params, tokens, mask


def test_full_fine_tuning_overfits_one_batch():
    c, params, tokens, mask = setup(np.random.randint(1 << 30))
    tc = TrainConfig(learning_rate=3e-3, warmup_steps=2, total_steps=60)
    state = init_train_state(params, tc)
    losses = []
    for _ in range(60):
        state, loss = train_step(params, c, tc, state, tokens, mask)
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0]


def test_lora_overfits_and_zero_adapters_are_the_base_model():
    c, params, tokens, mask = setup(np.random.randint(1 << 30))
    lora = init_lora(params, 4, jax.random.PRNGKey(1))
    merged = merge_lora(params, lora, 4.0)
    np.testing.assert_array_equal(jaxllm.forward(merged, c, tokens), jaxllm.forward(params, c, tokens))
    tc = TrainConfig(learning_rate=1e-2, warmup_steps=2, total_steps=60, lora_rank=4)
    state = init_train_state(params, tc, jax.random.PRNGKey(2))
    first = None
    for _ in range(60):
        state, loss = train_step(params, c, tc, state, tokens, mask)
        first = first if first is not None else float(loss)
    assert float(loss) < 0.6 * first


def test_gradient_matches_finite_differences():
    """Directional derivative from jax.grad vs a central difference (float32: the
    model computes norms and logits in float32, so eps is large and the tolerance
    1e-3 relative, far below the O(1) error a wrong gradient gives)."""
    c, params, tokens, mask = setup(np.random.randint(1 << 30))
    loss = jax.jit(lambda p: next_token_loss(p, c, tokens, mask))
    grads = jax.grad(lambda p: next_token_loss(p, c, tokens, mask))(params)
    rng = np.random.default_rng()
    for name in ("wqkv", "w_out", "w_in"):
        w = getattr(params.layers[0], name)
        direction = jnp.asarray(rng.standard_normal(w.shape), jnp.float32)
        direction = direction / jnp.linalg.norm(direction)
        eps = 3e-2
        shift = lambda s: params.replace(layers=(params.layers[0].replace(**{name: w + s * direction}),
                                                 *params.layers[1:]))
        numeric = (float(loss(shift(eps))) - float(loss(shift(-eps)))) / (2 * eps)
        analytic = float(jnp.sum(getattr(grads.layers[0], name) * direction))
        # float32 rounding of the loss (~5e-7 x 4.6) over 2 eps bounds the absolute noise at ~1e-4
        assert abs(numeric - analytic) < 1e-3 * abs(analytic) + 2e-4, (name, numeric, analytic)


def test_save_and_load_round_trip(tmp_path):
    c, params, tokens, _ = setup()
    save_params(str(tmp_path / "w.safetensors"), params)
    loaded = load_params(str(tmp_path / "w.safetensors"), params)
    np.testing.assert_array_equal(jaxllm.forward(loaded, c, tokens), jaxllm.forward(params, c, tokens))


def test_saved_weights_do_not_depend_on_the_layout(tmp_path):
    """A file written from weights stored by output row (jaxllm.layout, the GPU's) is the
    file written from the usual layout, and loads into either."""
    from jaxllm.layout import TransposedWeight, transpose_projections

    c, params, tokens, _ = setup()
    rows = transpose_projections(params)
    save_params(str(tmp_path / "rows.safetensors"), rows)
    save_params(str(tmp_path / "plain.safetensors"), params)
    assert (tmp_path / "rows.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
    into_rows = load_params(str(tmp_path / "plain.safetensors"), rows)
    assert isinstance(into_rows.layers[0].wqkv, TransposedWeight)
    np.testing.assert_array_equal(into_rows.layers[0].wqkv.t, rows.layers[0].wqkv.t)
    np.testing.assert_allclose(jaxllm.forward(into_rows, c, tokens), jaxllm.forward(params, c, tokens),
                               rtol=1e-5, atol=1e-5)
