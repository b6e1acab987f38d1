"""The KV cache: one preallocated pytree per generation, donated to every step.

Layout per layer: keys and values [B, S, K, Dh] (batch, slot, kv head, head dim).
Slot s of row b holds position s of that row's sequence; `lengths[b]` counts the
filled slots. Writing one decode token per row then touches one contiguous K*Dh
run, and attention reads each row's slots front to back. benchmarks/NOTES.md
records the measurement against the [B, K, S, Dh] alternative.

The arrays' dtype is the cache's kind (`config.kv_cache`, `storage_dtype`): the compute
dtype, or float8 e4m3, written saturated (`to_storage`) and widened where attention
reads it.

`PagedKVCache` is the serving engine's other kind: one pool of fixed-size pages per
layer [N, P, K, Dh] and a page table [B, W] per row, so that a row holds only the pages
its request needs instead of a whole `capacity` reservation (vLLM's PagedAttention).
Position s of row b lives at slot s % P of page pages[b, s // P]. Page 0 is never
handed to a row: table entries a row does not own point there, so that writes past a
row's pages (a finished row's decode steps, padding) land in it and reads from it are
masked. Each layer's part is a `PagedLayer`; `layer_view` and `write_layer` read and
write either kind, and the decode-attention kernel reads pages through the table.
"""

from __future__ import annotations

from typing import Optional

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


@struct.dataclass
class PagedLayer:
    """One layer of a PagedKVCache: pools [N, P, K, Dh] and the table [B, W] they share."""

    k: jax.Array
    v: jax.Array
    pages: jax.Array


@struct.dataclass
class PagedKVCache:
    k: tuple[jax.Array, ...]  # L x [N, P, K, Dh]: the page pools
    v: tuple[jax.Array, ...]
    pages: jax.Array  # [B, W] int32: row b's i-th page (0: none, the scratch page)
    lengths: jax.Array  # [B] int32

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def capacity(self) -> int:
        return self.pages.shape[1] * self.page_size

    @property
    def batch(self) -> int:
        return self.pages.shape[0]

    @property
    def n_pages(self) -> int:
        return self.k[0].shape[0]


Cache = KVCache | PagedKVCache
LayerKV = tuple[jax.Array, jax.Array] | PagedLayer


def init_paged_cache(config: ModelConfig, batch: int, capacity: int, n_pages: int, page_size: int,
                     dtype=jnp.bfloat16) -> PagedKVCache:
    """A pool of n_pages pages of page_size positions (page 0 the scratch page) for
    `batch` rows of up to `capacity` positions each (a multiple of page_size), all rows
    holding no pages yet."""
    if capacity % page_size:
        raise ValueError(f"capacity {capacity} is not a multiple of the page size {page_size}")
    if n_pages < 2:
        raise ValueError("a paged cache needs at least two pages (page 0 is scratch)")
    shape = (n_pages, page_size, config.n_kv_heads, config.head_dim)
    dtype = storage_dtype(config, dtype)
    zeros = lambda: jnp.zeros(shape, dtype)
    return PagedKVCache(k=tuple(zeros() for _ in range(config.n_layers)),
                        v=tuple(zeros() for _ in range(config.n_layers)),
                        pages=jnp.zeros((batch, capacity // page_size), jnp.int32),
                        lengths=jnp.zeros((batch,), jnp.int32))


def page_bytes(config: ModelConfig, page_size: int, dtype=jnp.bfloat16) -> int:
    """Bytes one page takes over all layers, keys and values."""
    return cache_bytes(config, 1, page_size, dtype)


def cache_layer(cache: Cache, i: int) -> LayerKV:
    return PagedLayer(cache.k[i], cache.v[i], cache.pages) if isinstance(cache, PagedKVCache) else (
        cache.k[i], cache.v[i])


def with_layers(cache: Cache, layers: list[LayerKV], lengths: jax.Array) -> Cache:
    """cache with each layer's arrays replaced by `layers` and new lengths."""
    ks, vs = tuple(layer[0] if isinstance(layer, tuple) else layer.k for layer in layers), tuple(
        layer[1] if isinstance(layer, tuple) else layer.v for layer in layers)
    return cache.replace(k=ks, v=vs, lengths=lengths)


def _page_slots(pages: jax.Array, positions: jax.Array, page_size: int):
    """(page, offset) of positions [B, T] of the rows whose tables are pages [B, W];
    positions past the table go to the scratch page."""
    index = positions // page_size
    page = jnp.take_along_axis(pages, jnp.minimum(index, pages.shape[1] - 1), axis=1)
    return jnp.where(index < pages.shape[1], page, 0), positions % page_size


def write_layer(kv: LayerKV, k: jax.Array, v: jax.Array, starts: jax.Array) -> LayerKV:
    """kv with k, v [B, T, K, Dh] written at positions starts[b] + t of each row."""
    if isinstance(kv, tuple):
        return write_rows(kv[0], k, starts), write_rows(kv[1], v, starts)
    positions = starts[:, None] + jnp.arange(k.shape[1], dtype=jnp.int32)
    page, offset = _page_slots(kv.pages, positions, kv.k.shape[1])
    put = lambda pool, new: pool.at[page, offset].set(to_storage(new, pool.dtype))
    return kv.replace(k=put(kv.k, k), v=put(kv.v, v))


def gather_pages(pool: jax.Array, pages: jax.Array, span: int) -> jax.Array:
    """The first `span` positions [R, span, K, Dh] of rows whose tables are pages [R, W]."""
    n = -(-span // pool.shape[1])
    rows = pool[pages[:, :n]]  # [R, n, P, K, Dh]
    return rows.reshape(rows.shape[0], -1, *rows.shape[3:])[:, :span]


def layer_view(kv: LayerKV, span: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """The first `span` positions (None: all) of every row's keys and values, [B, span, K, Dh] each."""
    if isinstance(kv, tuple):
        return kv[0][:, :span], kv[1][:, :span]
    span = min(span or kv.pages.shape[1] * kv.k.shape[1], kv.pages.shape[1] * kv.k.shape[1])
    return gather_pages(kv.k, kv.pages, span), gather_pages(kv.v, kv.pages, span)


def rows_of(cache: Cache, sources: jax.Array, span: int, starts: jax.Array) -> KVCache:
    """A contiguous working copy of the first `span` positions of rows `sources`, with
    lengths `starts` (the admission program's prefill runs on it)."""
    if isinstance(cache, KVCache):
        return KVCache(k=tuple(k[sources, :span] for k in cache.k), v=tuple(v[sources, :span] for v in cache.v),
                       lengths=starts)
    pages = cache.pages[sources]
    return KVCache(k=tuple(gather_pages(k, pages, span) for k in cache.k),
                   v=tuple(gather_pages(v, pages, span) for v in cache.v), lengths=starts)


def put_rows(cache: Cache, dest: jax.Array, work: KVCache, of_prompt: jax.Array, span: int,
             skip: Optional[jax.Array] = None) -> Cache:
    """cache with row dest[r]'s first `span` positions taken from working row of_prompt[r]
    (dest = the batch size marks padding: dropped). A paged cache leaves the first
    skip[r] pages of row dest[r] as they are (they hold those positions already, and
    may be shared with other rows)."""
    if isinstance(cache, KVCache):
        put = lambda big, small: big.at[dest, :span].set(small[of_prompt], mode="drop")
        return cache.replace(k=tuple(map(put, cache.k, work.k)), v=tuple(map(put, cache.v, work.v)))
    P = cache.page_size
    n = -(-span // P)
    # padding entries and skipped pages write to the scratch page
    written = dest[:, None] < cache.batch
    if skip is not None:
        written &= jnp.arange(n)[None, :] >= skip[:, None]
    pages = jnp.where(written, cache.pages[jnp.minimum(dest, cache.batch - 1), :n], 0)

    def put(pool, small):
        rows = small[of_prompt]
        rows = jnp.pad(rows, ((0, 0), (0, n * P - span), (0, 0), (0, 0)))
        return pool.at[pages].set(rows.reshape(rows.shape[0], n, P, *rows.shape[2:]).astype(pool.dtype))
    return cache.replace(k=tuple(map(put, cache.k, work.k)), v=tuple(map(put, cache.v, work.v)))


def write_rows(buffer: jax.Array, update: jax.Array, starts: jax.Array) -> jax.Array:
    """buffer [B, S, ...] with update [B, T, ...] written at slot starts[b] of each row."""
    def write_row(row, new, start):
        return jax.lax.dynamic_update_slice_in_dim(row, new, start, axis=0)
    return jax.vmap(write_row)(buffer, to_storage(update, buffer.dtype), starts)
