"""The KV cache: one preallocated pytree per generation, donated to every step.

Layout per layer: keys and values [B, S, K, Dh] (batch, slot, kv head, head dim).
Slot s of row b holds position s of that row's sequence; `lengths[b]` counts the
filled slots. Writing one decode token per row then touches one contiguous K*Dh
run, and attention reads each row's slots front to back. benchmarks/NOTES.md
records the measurement against the [B, K, S, Dh] alternative.

The arrays' dtype is the cache's kind (`config.kv_cache`, `storage_dtype`): the compute
dtype, or float8 e4m3, written saturated (`to_storage`) and widened where attention
reads it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from .config import ModelConfig


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # L x [B, S, K, Dh]
    v: tuple[jax.Array, ...]  # L x [B, S, K, Dh]
    lengths: jax.Array  # [B] int32: filled slots per row (= next position)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)


def storage_dtype(config: ModelConfig, compute_dtype):
    """The dtype a cache for config holds when the model computes in compute_dtype."""
    return FP8 if config.kv_cache == "fp8" else jnp.dtype(compute_dtype)


def to_storage(x: jax.Array, dtype) -> jax.Array:
    """x in the cache's dtype; float8 saturates (e4m3fn has no infinity: an overflow
    would be NaN)."""
    if jnp.dtype(dtype) == FP8:
        return jnp.clip(x.astype(jnp.float32), -FP8_MAX, FP8_MAX).astype(FP8)
    return x.astype(dtype)


def init_cache(config: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16) -> KVCache:
    """An empty cache for `batch` rows of up to `capacity` positions each, for a model
    computing in `dtype` (float8 instead where config.kv_cache says so)."""
    dtype = storage_dtype(config, dtype)
    shape = (batch, capacity, config.n_kv_heads, config.head_dim)
    zeros = lambda: jnp.zeros(shape, dtype)
    return KVCache(
        k=tuple(zeros() for _ in range(config.n_layers)),
        v=tuple(zeros() for _ in range(config.n_layers)),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def cache_bytes(config: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16) -> int:
    itemsize = jnp.dtype(storage_dtype(config, dtype)).itemsize
    return 2 * config.n_layers * batch * capacity * config.kv_size * itemsize


def write_rows(buffer: jax.Array, update: jax.Array, starts: jax.Array) -> jax.Array:
    """buffer [B, S, ...] with update [B, T, ...] written at slot starts[b] of each row."""
    def write_row(row, new, start):
        return jax.lax.dynamic_update_slice_in_dim(row, new, start, axis=0)
    return jax.vmap(write_row)(buffer, to_storage(update, buffer.dtype), starts)
