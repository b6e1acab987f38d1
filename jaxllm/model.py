"""The generic decoder as pure functions over a `Params` pytree, written in the
operations of ops.py (which follow the kernel policy in `config.kernels`).

Three entry points share one layer function:
  forward      logits for whole sequences, no cache (scoring, training)
  extend       append T tokens per row to a KV cache; logits of each row's last
               new token (prefill, chunked prefill, and decode with T = 1)
  decode_step  extend with one token per row

Axes: B batch, T new tokens, S cache slots, H query heads, K kv heads,
G = H / K query heads per kv head, Dh head dim, D model width, V vocab.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec

from .cache import Cache, cache_layer, layer_view, with_layers, write_layer
from .config import ModelConfig
from .kernels.matvec import GatedInput, PartialSums
from .ops import (DeferredNorm, Residual, add_norm, apply_norm, apply_rope, attend, decode_attention,
                  defers_norm, head_logits, linear, lookup, moe_mlp, plan_for, rope_inv_freq,
                  split_fused)
from .params import Layer, Params
from .sharding import AXIS, kv_specs, layer_specs, shard_config
from .weights import tied_head


def mlp(x, p: Layer, config: ModelConfig, keep_partial: bool = False,
        residual: Optional[jax.Array] = None):
    """The MLP's output delta (or its PartialSums with keep_partial), or residual +
    delta when a residual is given. x [..., D], or a DeferredNorm of it."""
    if config.n_experts:
        out = moe_mlp(x, p.router, p.w_in, p.w_out, config, router_bias=p.router_bias, b_in=p.b_in,
                      b_out=p.b_out)
        return out if residual is None else residual + out
    policy = config.kernels
    gated = config.mlp == "swiglu" or (config.mlp == "geglu" and config.gelu_approximate)
    act = "silu" if config.mlp == "swiglu" else "gelu_tanh"
    if gated and p.b_in is None and plan_for(policy, p.w_in, math.prod(x.shape[:-1])).fuses:
        hidden = linear(x, p.w_in, policy, gate=act)  # the kernel applies the gate
        return linear(hidden, p.w_out, policy, p.b_out, residual=residual)
    if residual is not None:
        return Residual(residual, mlp(x, p, config)).total()
    # A deferred norm's factor is applied in float32, in the activation's kernel.
    h_dtype = jnp.float32 if isinstance(x, DeferredNorm) else None
    if gated and x.shape[1] == 1 and p.b_in is None and p.b_out is None:
        # Decode: the down projection's kernel applies the activation to the gate-up
        # partial sums itself (kernels/matvec.py, GatedInput).
        h = linear(x, p.w_in, policy, None, h_dtype, keep_partial=True)
        if isinstance(h, PartialSums) and h.sums.shape[0] <= policy.max_gated_splits:
            out = linear(GatedInput(h.sums, act), p.w_out, policy, None, x.dtype, keep_partial=keep_partial)
            return out if isinstance(out, PartialSums) else out.reshape(*x.shape[:-1], -1)
        if isinstance(h, PartialSums):
            h = h.total(x.dtype).reshape(*x.shape[:-1], -1)
    else:
        h = linear(x, p.w_in, policy, p.b_in, h_dtype)
    if config.mlp == "gelu":
        hidden = jax.nn.gelu(h, approximate=config.gelu_approximate)
    else:
        gate, up = split_fused(h, [h.shape[-1] // 2] * 2, config.tensor_parallel)
        act = jax.nn.silu(gate) if config.mlp == "swiglu" else jax.nn.gelu(
            gate, approximate=config.gelu_approximate)
        hidden = act * up
    return linear(hidden.astype(x.dtype), p.w_out, policy, p.b_out, keep_partial=keep_partial)


def layer_forward(p: Layer, config: ModelConfig, index: int, stream: Residual, positions,
                  kv=None, starts=None, span: Optional[int] = None, n_new: Optional[jax.Array] = None):
    """One decoder layer: the residual stream [B, T, D] in, (stream, kv) out.

    The previous block's output arrives not yet added (`Residual`); it is added here
    together with the attention norm, and this layer's leaves the same way.
    positions [B, T]. With `kv` (one layer of a cache: (k_cache, v_cache) [B, S, K, Dh],
    or a cache.PagedLayer), the new keys and values are written at positions starts[b] + t
    and attention reads the whole cache, or its first `span` positions when every row's
    keys lie there; without, attention reads the T tokens themselves. n_new [B]: the
    real new tokens per row (a decode step's rows with none read no cache).
    """
    policy = config.kernels
    B, T, _ = stream.x.shape
    Dh, window = config.head_dim, config.layer_window(index)
    fused_attention = kv is not None and T == 1 and policy.decode_attention(config)
    x, h = add_norm(stream, p.attn_norm, config, defers_norm(
        config, p.attn_norm, p.wqkv, B * T, kernel_applies=fused_attention and p.bqkv is None))
    if fused_attention:
        qkv_in, norm_rows = h, None
        if (isinstance(h, DeferredNorm) and p.bqkv is None  # decode attention applies the factor
                and not plan_for(policy, p.wqkv, B).fuses):
            qkv_in, norm_rows = h.scaled, h.x.reshape(B, -1)
        qkv = linear(qkv_in, p.wqkv, policy, p.bqkv, keep_partial=True)
        attn, kv = decode_attention(p, config, index, qkv, kv, starts, x.dtype, norm_rows, n_new)
        return _after_attention(p, config, x, h, attn, kv)
    qkv = linear(h, p.wqkv, policy, p.bqkv)
    q, k, v = split_fused(qkv, [config.q_size, config.kv_size, config.kv_size], config.tensor_parallel)
    if config.qk_norm_whole:
        q, k = apply_norm(q, p.q_norm, config), apply_norm(k, p.k_norm, config)
    q = q.reshape(B, T, config.n_heads, Dh)
    k = k.reshape(B, T, config.n_kv_heads, Dh)
    v = v.reshape(B, T, config.n_kv_heads, Dh)
    if config.qk_norm and not config.qk_norm_whole:
        q, k = apply_norm(q, p.q_norm, config), apply_norm(k, p.k_norm, config)
    if config.position == "rope":
        inv_freq = rope_inv_freq(config, config.layer_rope_theta(index))
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if kv is None:
        attn = attend(q, k, v, positions, positions, config, window, p.sinks)
    else:
        kv = write_layer(kv, k, v, starts)
        k_cache, v_cache = layer_view(kv, span)
        S = k_cache.shape[1]
        slots = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        attn = attend(q, k_cache, v_cache, positions, slots, config, window, p.sinks)
    return _after_attention(p, config, x, h, attn.reshape(B, T, config.q_size), kv)


def _after_attention(p: Layer, config: ModelConfig, x, h, attn, kv):
    """Output projection, residual and the MLP: attn [B, T, q_size] -> (stream, kv)."""
    if config.shard_of > 1:
        return _after_attention_of_a_share(p, config, x, h, attn, kv)
    policy = config.kernels
    plain = not (config.sandwich_norm or config.parallel_block)
    rows = math.prod(x.shape[:-1])
    if plain and p.bo is None and p.b_out is None and plan_for(policy, p.wo, rows).fuses:
        # The row-major kernels add the residual themselves: the stream leaves complete.
        x = linear(attn, p.wo, policy, residual=x)
        _, h = add_norm(Residual(x), p.mlp_norm, config, defers_norm(config, p.mlp_norm, p.w_in, rows))
        return Residual(mlp(h, p, config, residual=x)), kv
    attn = linear(attn, p.wo, policy, p.bo, keep_partial=plain)
    if config.sandwich_norm:
        attn = apply_norm(attn, p.post_attn_norm, config)
    if config.parallel_block:
        return Residual(x, attn + mlp(h, p, config)), kv
    x, h = add_norm(Residual(x, attn), p.mlp_norm, config, defers_norm(config, p.mlp_norm, p.w_in, rows))
    out = mlp(h, p, config, keep_partial=not config.sandwich_norm)
    if config.sandwich_norm:
        out = apply_norm(out, p.post_mlp_norm, config)
    return Residual(x, out), kv


def _after_attention_of_a_share(p: Layer, config: ModelConfig, x, h, attn, kv):
    """_after_attention on one device's heads and ffn share (sharding.shard_config):
    the output projection's and the MLP's products are partial sums, each all-reduced
    over the devices (the layer's two all-reduces) before a bias, a norm or the
    residual meets it; so no kernel adds the residual or a bias inside."""
    rows = math.prod(x.shape[:-1])
    all_reduce = lambda y, bias: (lambda s: s if bias is None else s + bias)(jax.lax.psum(y, AXIS))
    attn = all_reduce(linear(attn, p.wo, config.kernels), p.bo)
    if config.sandwich_norm:
        attn = apply_norm(attn, p.post_attn_norm, config)

    def mlp_delta(h):
        if config.n_experts and p.b_out is not None:
            # Experts' output biases are weighted by the routing inside moe_mlp: each
            # device adds its 1/n share (exact for a power-of-two n).
            return all_reduce(mlp(h, p.replace(b_out=p.b_out / config.shard_of), config), None)
        return all_reduce(mlp(h, p.replace(b_out=None), config), p.b_out)

    if config.parallel_block:
        return Residual(x, attn + mlp_delta(h)), kv
    x, h = add_norm(Residual(x, attn), p.mlp_norm, config, defers_norm(config, p.mlp_norm, p.w_in, rows))
    out = mlp_delta(h)
    if config.sandwich_norm:
        out = apply_norm(out, p.post_mlp_norm, config)
    return Residual(x, out), kv


def layer_call(p: Layer, config: ModelConfig, index: int, stream: Residual, positions, kv=None, starts=None,
               span: Optional[int] = None, n_new: Optional[jax.Array] = None):
    """layer_forward; under per-shard tensor parallelism (config.shard_layers) the same
    on every device's share of the layer, under shard_map: the stream and positions
    whole on every device, weights and the cache layer split as sharding.shard
    placed them."""
    if not config.shard_layers:
        return layer_forward(p, config, index, stream, positions, kv, starts, span, n_new)
    share = shard_config(config)

    def on_a_share(p, x, positions, kv, starts, n_new):
        stream, kv = layer_forward(p, share, index, Residual(x), positions, kv, starts, span, n_new)
        return stream.total(), kv

    whole = PartitionSpec()
    kv_spec = None if kv is None else kv_specs(kv)
    mesh = AbstractMesh((config.tensor_parallel,), (AXIS,))
    x, kv = jax.shard_map(on_a_share, mesh=mesh, check_vma=False,
                          in_specs=(layer_specs(p, config), whole, whole, kv_spec, whole, whole),
                          out_specs=(whole, kv_spec))(p, stream.total(), positions, kv, starts, n_new)
    return Residual(x), kv


def embed(params: Params, config: ModelConfig, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    x = lookup(params.embed, tokens)
    if config.embed_scale is not None:
        # Gemma rounds the scale to the activation dtype before multiplying.
        x = x * jnp.asarray(config.embed_scale, x.dtype)
    if params.pos_embed is not None:
        x = x + params.pos_embed[positions]
    return x


def unembed(params: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm and output projection: x [..., D] -> float32 logits [..., V]."""
    head = tied_head(params.embed) if params.lm_head is None else params.lm_head
    logits = head_logits(x, head, params.lm_head_bias, params.final_norm, config)
    if config.final_softcap is not None:
        return config.final_softcap * jnp.tanh(logits / config.final_softcap)
    return logits


@partial(jax.jit, static_argnames=("config",))
def forward(params: Params, config: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Logits [B, T, V] (float32) for token sequences [B, T], no cache.

    Rows shorter than T are right-padded: causal masking keeps padding out of
    every real position, so the padded tail's logits are simply ignored.
    """
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    stream = Residual(embed(params, config, tokens, positions))
    for i, layer in enumerate(params.layers):
        stream, _ = layer_call(layer, config, i, stream, positions)
    return unembed(params, config, stream.total())


def extend_hidden(params: Params, config: ModelConfig, tokens: jax.Array, n_new: jax.Array,
                  cache: Cache, span: Optional[int] = None):
    """Append tokens [B, T] (the first n_new[b] of each row are real) to the cache.

    Returns (hidden [B, T, D] before the final norm, cache with lengths += n_new).
    `span` (static): attention reads only the first `span` cache slots, which the
    caller guarantees hold every key of every row that matters.
    """
    B, T = tokens.shape
    positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)
    stream = Residual(embed(params, config, tokens, positions))
    span = min(span or cache.capacity, cache.capacity)
    layers = []
    for i, layer in enumerate(params.layers):
        stream, kv = layer_call(layer, config, i, stream, positions, cache_layer(cache, i), cache.lengths, span,
                                n_new)
        layers.append(kv)
    return stream.total(), with_layers(cache, layers, cache.lengths + n_new.astype(jnp.int32))


@partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def extend(params: Params, config: ModelConfig, tokens: jax.Array, n_new: jax.Array,
           cache: Cache):
    """Prefill: append tokens [B, T] to the cache (row b's first n_new[b] are real).

    Returns (logits [B, V] of each row's last real new token, updated cache).
    The caller guarantees lengths + T <= capacity.
    """
    x, cache = extend_hidden(params, config, tokens, n_new, cache)
    last = jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]
    return unembed(params, config, last), cache


@partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def decode_step(params: Params, config: ModelConfig, tokens: jax.Array, cache: Cache):
    """One incremental step: tokens [B] at position lengths[b] -> (logits [B, V], cache)."""
    x, cache = extend_hidden(params, config, tokens[:, None], jnp.ones_like(tokens), cache)
    return unembed(params, config, x[:, 0]), cache
