"""Training over the same pure `forward`: next-token cross-entropy with padding
masks, an optax AdamW step (gradient clipping, warmup + cosine schedule), LoRA
adapters kept as a separate pytree and merged functionally at call time, and
safetensors save/load of fine-tuned weights.

Shapes: tokens [B, T] int32, mask [B, T] (1 where a token is real).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from .config import ModelConfig
from .layout import add_to, untranspose, with_layout_of
from .model import forward
from .params import Params
from .weights import Experts

LORA_TARGETS = ("wqkv", "wo", "w_in", "w_out")


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    total_steps: int = 100
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0

    def __post_init__(self):
        if self.learning_rate <= 0 or self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError("learning_rate must be > 0, total_steps >= 1, warmup_steps >= 0")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")


@struct.dataclass
class LoraAdapter:
    a: jax.Array  # [In, r]
    b: jax.Array  # [r, Out], zero at initialisation: the adapted model starts as the base


def _require_dense(params: Params) -> None:
    from .weights import Fp8Weight, QuantizedWeight  # noqa: PLC0415
    quantized = lambda x: isinstance(x, (QuantizedWeight, Fp8Weight))
    if any(quantized(w) for w in jax.tree.leaves(params, is_leaf=quantized)):
        raise ValueError("training needs dense weights: load with weights='dense' or call "
                         "jaxllm.dequantize_params(params)")


def init_lora(params: Params, rank: int, key: jax.Array) -> tuple[dict, ...]:
    """One dict per layer mapping each target weight name to a LoraAdapter."""
    _require_dense(params)
    layers = []
    for i, layer in enumerate(params.layers):
        keys = jax.random.split(jax.random.fold_in(key, i), len(LORA_TARGETS))
        adapters = {}
        for k, name in zip(keys, LORA_TARGETS):
            w = getattr(layer, name)
            if isinstance(w, Experts):  # adapters for the attention of mixture-of-experts layers only
                continue
            adapters[name] = LoraAdapter(
                a=(jax.random.normal(k, (w.shape[0], rank), jnp.float32) / np.sqrt(w.shape[0])).astype(w.dtype),
                b=jnp.zeros((rank, w.shape[1]), w.dtype))
        layers.append(adapters)
    return tuple(layers)


def merge_lora(params: Params, lora, scale: float) -> Params:
    """Base weights plus scale * A @ B for every adapted weight (a pure function)."""
    layers = []
    for layer, adapters in zip(params.layers, lora):
        updates = {name: add_to(getattr(layer, name), scale * ad.a @ ad.b) for name, ad in adapters.items()}
        layers.append(layer.replace(**updates))
    return params.replace(layers=tuple(layers))


def next_token_loss(params: Params, config: ModelConfig, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy of tokens[:, 1:] given the prefix, over real target tokens."""
    logits = forward(params, config, tokens)[:, :-1]
    targets = tokens[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weight = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, max(tc.warmup_steps, 1), max(tc.total_steps, tc.warmup_steps + 1))
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                       optax.adamw(schedule, weight_decay=tc.weight_decay))


@struct.dataclass
class TrainState:
    trainable: object  # Params (full fine-tuning) or the LoRA pytree
    opt_state: object
    step: jax.Array


def init_train_state(params: Params, tc: TrainConfig, key: Optional[jax.Array] = None) -> TrainState:
    trainable = params if tc.lora_rank == 0 else init_lora(params, tc.lora_rank, key if key is not None
                                                            else jax.random.PRNGKey(0))
    return TrainState(trainable, make_optimizer(tc).init(trainable), jnp.int32(0))


def model_params(base: Params, state_trainable, tc: TrainConfig) -> Params:
    if tc.lora_rank == 0:
        return state_trainable
    return merge_lora(base, state_trainable, tc.lora_alpha / tc.lora_rank)


@partial(jax.jit, static_argnames=("config", "tc"), donate_argnames=("state",))
def train_step(base: Params, config: ModelConfig, tc: TrainConfig, state: TrainState,
               tokens: jax.Array, mask: jax.Array):
    """One optimizer step. Returns (state, loss). `base` is ignored for full fine-tuning."""
    def loss_fn(trainable):
        return next_token_loss(model_params(base, trainable, tc), config, tokens, mask)

    loss, grads = jax.value_and_grad(loss_fn)(state.trainable)
    updates, opt_state = make_optimizer(tc).update(grads, state.opt_state, state.trainable)
    return TrainState(optax.apply_updates(state.trainable, updates), opt_state, state.step + 1), loss


def _flatten(params: Params) -> dict[str, np.ndarray]:
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        flat[jax.tree_util.keystr(path)] = np.asarray(leaf, np.float32)
    return flat


def save_params(path: str, params: Params) -> None:
    """Write every weight to a safetensors file (float32), keyed by pytree path. Weights
    stored by output row (jaxllm.layout) are written [in, out], so files do not depend
    on the device that wrote them."""
    from safetensors.numpy import save_file  # noqa: PLC0415
    save_file(_flatten(untranspose(params)), path)


def load_params(path: str, like: Params) -> Params:
    """Read weights saved by save_params into the structure (and dtypes) of `like`,
    and its layout (jaxllm.layout)."""
    from safetensors.numpy import load_file  # noqa: PLC0415
    stored = load_file(path)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(untranspose(like))
    leaves = []
    for path_, leaf in leaves_with_path:
        key = jax.tree_util.keystr(path_)
        if key not in stored:
            raise KeyError(f"{path}: weight {key} missing")
        leaves.append(jnp.asarray(stored[key], leaf.dtype))
    return with_layout_of(jax.tree_util.tree_unflatten(treedef, leaves), like)
