"""Parameter pytrees and random initialisation.

Weights are stored [in, out] so every projection is `x @ w` (on the GPU,
`layout.for_policy` stores those its decode kernel reads by output row). Absent
parts (biases a model does not have, Gemma's extra norms) are None, which pytrees
treat as empty: one dataclass serves every architecture.

Layers are a tuple, not one stacked array: the decoder unrolls them, so XLA sees
each layer's weights as separate buffers and never copies a layer slice out of a
stacked array (see benchmarks/NOTES.md).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from .config import ModelConfig
from .weights import Experts


@struct.dataclass
class Norm:
    scale: jax.Array  # [N]
    bias: Optional[jax.Array] = None  # [N], LayerNorm only


@struct.dataclass
class Layer:
    """One decoder layer. Projections that read the same input are stored fused
    (q, k, v in `wqkv`; gate and up in `w_in`): one matrix-vector product instead
    of three or two per decode step (benchmarks/NOTES.md)."""

    attn_norm: Norm
    wqkv: jax.Array  # [D, (H + 2K) * Dh]: q, then k, then v
    wo: jax.Array  # [H*Dh, D]
    mlp_norm: Optional[Norm]  # None for parallel blocks (Phi-2), which reuse attn_norm
    w_in: jax.Array  # [D, 2F] gate then up (gated MLPs), or [D, F]
    w_out: jax.Array  # [F, D]
    bqkv: Optional[jax.Array] = None  # [(H + 2K) * Dh]
    bo: Optional[jax.Array] = None  # [D]
    b_in: Optional[jax.Array] = None  # like w_in's output
    b_out: Optional[jax.Array] = None  # [D]
    q_norm: Optional[Norm] = None  # [Dh], or [H * Dh] with config.qk_norm_whole
    k_norm: Optional[Norm] = None  # [Dh], or [K * Dh] with config.qk_norm_whole
    post_attn_norm: Optional[Norm] = None  # [D]
    post_mlp_norm: Optional[Norm] = None  # [D]
    # Mixture of experts (config.n_experts > 0): the router [D, E], and w_in / w_out
    # are `Experts` [E, D, 2F] / [E, F, D] with F = config.expert_d_ff
    router: Optional[jax.Array] = None
    router_bias: Optional[jax.Array] = None  # [E] (gpt-oss); b_in / b_out are then [E, 2F] / [E, D]
    sinks: Optional[jax.Array] = None  # [H] attention sink logits (config.attn_sinks)


@struct.dataclass
class Params:
    embed: jax.Array  # [V, D]
    layers: tuple[Layer, ...]
    final_norm: Norm
    lm_head: Optional[jax.Array] = None  # [D, V]; None when tied to `embed`
    lm_head_bias: Optional[jax.Array] = None  # [V]
    pos_embed: Optional[jax.Array] = None  # [P, D], learned positions (GPT-2)


def _normal(key, shape, dtype, scale):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _init_norm(config: ModelConfig, key, size: int, dtype) -> Norm:
    # Non-trivial scales so tests exercise them; centred where the file convention
    # stores (1 + w) so the effective scale stays near one.
    k1, k2 = jax.random.split(key)
    centre = 1.0 - config.norm_weight_offset
    scale = (centre + _normal(k1, (size,), jnp.float32, 0.1)).astype(dtype)
    bias = _normal(k2, (size,), dtype, 0.1) if config.norm == "layer" and config.norm_bias else None
    return Norm(scale, bias)


def _init_layer(config: ModelConfig, key, dtype) -> Layer:
    D, F, Dh = config.d_model, config.d_ff, config.head_dim
    keys = iter(jax.random.split(key, 24))
    w = lambda shape: _normal(next(keys), shape, dtype, shape[0] ** -0.5)
    b = lambda n, present: _normal(next(keys), n if isinstance(n, tuple) else (n,), dtype, 0.02) if present else None
    norm = lambda n, present=True: _init_norm(config, next(keys), n, dtype) if present else None
    gated = config.mlp != "gelu"
    qkv = config.q_size + 2 * config.kv_size
    E, Fe = config.n_experts, config.expert_d_ff
    b_in_shape, b_out_shape = ((E, 2 * Fe), (E, D)) if E else (2 * F if gated else F, D)

    def mlp():  # drawn where the dense weights always were: their values do not change
        if not config.n_experts:
            return dict(w_in=w((D, 2 * F if gated else F)), w_out=w((F, D)))
        return dict(w_in=Experts(_normal(next(keys), (E, D, 2 * Fe), dtype, D ** -0.5)),
                    w_out=Experts(_normal(next(keys), (E, Fe, D), dtype, Fe ** -0.5)), router=w((D, E)))
    layer = Layer(
        attn_norm=norm(D),
        wqkv=w((D, qkv)), wo=w((config.q_size, D)),
        mlp_norm=norm(D, not config.parallel_block),
        **mlp(),
        bqkv=b(qkv, config.qkv_bias), bo=b(D, config.out_bias),
        b_in=b(b_in_shape, config.mlp_bias), b_out=b(b_out_shape, config.mlp_bias),
        q_norm=norm(config.q_size if config.qk_norm_whole else Dh, config.qk_norm),
        k_norm=norm(config.kv_size if config.qk_norm_whole else Dh, config.qk_norm),
        post_attn_norm=norm(D, config.sandwich_norm), post_mlp_norm=norm(D, config.sandwich_norm),
    )
    # drawn after every older part, so those keep their values
    return layer.replace(router_bias=b(E, config.router_bias),
                         sinks=_normal(next(keys), (config.n_heads,), dtype, 1.0) if config.attn_sinks else None)


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, each_layer=None) -> Params:
    """Random weights of any shape, generated on the default device.

    Each layer is produced by its own compiled call, so an 8B model never passes
    through host memory and peak device memory is the weights plus one layer's
    float32 temporaries. each_layer (Layer -> Layer) is applied to every layer as it
    is made (quant.quantize_layer, a device_put onto a mesh): a model whose dense
    weights would not fit one device is made quantized or spread over several.
    """
    dtype = jnp.dtype(dtype)
    k_embed, k_head, k_pos, k_norm, k_layers = jax.random.split(key, 5)
    init_layer = jax.jit(_init_layer, static_argnums=(0, 2))
    each_layer = each_layer or (lambda layer: layer)
    layers = tuple(each_layer(init_layer(config, k, dtype)) for k in jax.random.split(k_layers, config.n_layers))
    make = jax.jit(_normal, static_argnums=(1, 2, 3))
    return Params(
        embed=make(k_embed, (config.vocab_size, config.d_model), dtype, config.d_model ** -0.5),
        layers=layers,
        final_norm=jax.jit(_init_norm, static_argnums=(0, 2, 3))(config, k_norm, config.d_model, dtype),
        lm_head=None if config.tie_embeddings else make(
            k_head, (config.d_model, config.vocab_size), dtype, config.d_model ** -0.5),
        lm_head_bias=make(k_head, (config.vocab_size,), dtype, 0.02) if config.lm_head_bias else None,
        pos_embed=make(k_pos, (config.max_seq_len, config.d_model), dtype, 0.1)
        if config.position == "learned" else None,
    )
