"""The KV cache: one preallocated pytree per generation, donated to every step.

Layout per layer: keys and values [B, S, K, Dh] (batch, slot, kv head, head dim).
Slot s of row b holds position s of that row's sequence; `lengths[b]` counts the
filled slots. Writing one decode token per row then touches one contiguous K*Dh
run, and attention reads each row's slots front to back. benchmarks/NOTES.md
records the measurement against the [B, K, S, Dh] alternative.
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


def init_cache(config: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16) -> KVCache:
    """An empty cache for `batch` rows of up to `capacity` positions each."""
    shape = (batch, capacity, config.n_kv_heads, config.head_dim)
    zeros = lambda: jnp.zeros(shape, dtype)
    return KVCache(
        k=tuple(zeros() for _ in range(config.n_layers)),
        v=tuple(zeros() for _ in range(config.n_layers)),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def cache_bytes(config: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16) -> int:
    return 2 * config.n_layers * batch * capacity * config.kv_size * jnp.dtype(dtype).itemsize


def write_rows(buffer: jax.Array, update: jax.Array, starts: jax.Array) -> jax.Array:
    """buffer [B, S, ...] with update [B, T, ...] written at slot starts[b] of each row."""
    def write_row(row, new, start):
        return jax.lax.dynamic_update_slice_in_dim(row, new, start, axis=0)
    return jax.vmap(write_row)(buffer, update.astype(buffer.dtype), starts)
