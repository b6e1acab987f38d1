"""The host side of the paged KV cache (cache.PagedKVCache): which pages of the pool
each serving-engine row holds.

A row is given pages for its prompt and its first decode chunk when its request is
admitted (`reserve`), and more before each chunk (`grow`), so a request holds only what
it has written, as vLLM's. When none are left the engine (batching.Engine._grow)
preempts the newest running requests: their pages go back, and they resume later by
prefilling their prompt and what they had generated.

A row keeps its pages after its request ends: they still hold that request's keys
and values, which a later prompt with the same prefix reuses (prefix.py): the full
pages of the common prefix are shared (each page counts the rows holding it), the
rest copied. Such pages are evicted, least recently used row first, only when an
admission needs them; a shared page is freed when the last row holding it lets go. The table [rows, W] is the device's page table: page 0 is the scratch page
that every entry a row does not own points at.
"""

from __future__ import annotations

import collections
from typing import Iterable, Optional, Sequence

import numpy as np


class PagePool:
    """n_pages pages of page_size positions (page 0 scratch, never held) shared by
    n_rows rows of up to `capacity` positions each."""

    def __init__(self, n_pages: int, page_size: int, n_rows: int, capacity: int):
        if n_pages < 2:
            raise ValueError(f"a KV pool needs at least 2 pages (page 0 is scratch), got {n_pages}")
        if page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"the page size must be a power of two >= 16, got {page_size}")
        if capacity % page_size:
            raise ValueError(f"the row capacity {capacity} is not a multiple of the page size {page_size}")
        self.n_pages, self.page_size, self.capacity = n_pages, page_size, capacity
        self.n_rows = n_rows
        self.reset()

    def reset(self) -> None:
        """Every page free, every row holding none."""
        self.table = np.zeros((self.n_rows, self.capacity // self.page_size), np.int32)
        self.held: list[list[int]] = [[] for _ in range(self.n_rows)]
        self.refs = np.zeros(self.n_pages, np.int64)  # rows holding each page
        self._free = list(range(self.n_pages - 1, 0, -1))  # popped from the end: low pages first

    @property
    def usable(self) -> int:
        return self.n_pages - 1

    @property
    def free(self) -> int:
        return len(self._free)

    def pages_for(self, positions: int) -> int:
        return -(-min(positions, self.capacity) // self.page_size)

    def reserve(self, rows: Sequence[int], positions: int, evictable: Iterable[int],
                prefix: Sequence[int] = ()) -> Optional[list[int]]:
        """Give each of `rows` the pages for its first `positions` positions: first the
        `prefix` pages (full pages of a prompt's beginning that another row holds:
        shared, not copied), then pages of its own. A row keeps those of its pages it
        alone holds where its own pages go; pages it shared with another row are
        replaced, so that nothing it writes reaches another row. Fresh pages come from
        the free list, then from `evictable` rows (least recently used first). Returns
        the rows evicted, or None (nothing changed) when even they do not give enough."""
        need = self.pages_for(positions)
        prefix = list(prefix)[:need]
        plans = {}  # row -> its new table, None where a fresh page goes
        for r in rows:
            old = self.held[r]
            plans[r] = prefix + [old[i] if i < len(old) and self.refs[old[i]] == 1 and old[i] not in prefix
                                 else None for i in range(len(prefix), need)]
        fresh = sum(t.count(None) for t in plans.values())
        refs = self._dry_refs()
        for r in rows:
            for p in plans[r]:
                if p is not None:
                    refs[p] += 1
        available = self.free + sum(1 for r in rows for p in self.held[r] if _drop(refs, p))
        evict = self._evictions(refs, available, fresh, evictable, plans)
        if evict is None:
            return None
        for r in rows:  # (all new references before any old one is let go of, as in the dry run)
            for p in plans[r]:
                if p is not None:
                    self.refs[p] += 1
        for r in rows:
            self._let_go(r)
        for r in evict:
            self._let_go(r)
        for r in rows:
            table = [p if p is not None else self._take() for p in plans[r]]
            self.held[r] = table
            self.table[r] = 0
            self.table[r, :need] = table
        return evict

    def grow(self, row: int, positions: int, evictable: Iterable[int]) -> Optional[list[int]]:
        """Fresh pages appended to row `row` until it holds its first `positions`
        positions (a running request's next decode steps), evicting `evictable` rows as
        `reserve` does. Returns the rows evicted, or None (nothing changed)."""
        fresh = self.pages_for(positions) - len(self.held[row])
        if fresh <= 0:
            return []
        evict = [] if self.free >= fresh else self._evictions(self._dry_refs(), self.free, fresh, evictable, (row,))
        if evict is None:
            return None
        for r in evict:
            self._let_go(r)
        self.held[row] += [self._take() for _ in range(fresh)]
        self.table[row, :len(self.held[row])] = self.held[row]
        return evict

    def _evictions(self, refs: dict, available: int, fresh: int, evictable: Iterable[int],
                   keep: Iterable[int]) -> Optional[list[int]]:
        """The evictable rows (in order, none of `keep`) whose letting go frees enough
        pages for `fresh` beyond `available` (refs: a dry run's counts), or None."""
        evict: list[int] = []
        for r in evictable:
            if available >= fresh:
                break
            if r in keep or not self.held[r]:
                continue
            evict.append(r)
            available += sum(1 for p in self.held[r] if _drop(refs, p))
        return evict if available >= fresh else None

    def release(self, row: int) -> None:
        """Row `row`'s pages let go of (free once no row holds them); its table entries
        to the scratch page."""
        self._let_go(row)

    def _let_go(self, row: int) -> None:
        for p in self.held[row]:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self._free.append(p)
        self.held[row] = []
        self.table[row] = 0

    def _dry_refs(self) -> collections.ChainMap:
        """The pages' reference counts for a dry run: changes land in a dict of their
        own, the pool's counts stay (copying all of them cost ~1 ms per call at 6k pages)."""
        return collections.ChainMap({}, self.refs)

    def _take(self) -> int:
        p = self._free.pop()
        self.refs[p] = 1
        return p

    def check(self) -> None:
        """Each page free or held, its count the rows holding it, each table its row's
        pages (tests)."""
        counts = np.zeros(self.n_pages, np.int64)
        for r, row in enumerate(self.held):
            assert list(self.table[r, :len(row)]) == row and not self.table[r, len(row):].any()
            assert len(set(row)) == len(row), "a row holds a page twice"
            counts[row] += 1
        np.testing.assert_array_equal(counts, self.refs, "reference counts")
        assert sorted(self._free) == [p for p in range(1, self.n_pages) if counts[p] == 0], "free list"


def _drop(refs: dict, page: int) -> bool:
    """One reference to page let go of in a dry run; whether that frees it."""
    refs[page] -= 1
    return refs[page] == 0


def pages_for_memory(free_bytes: int, fraction: float, page_bytes: int) -> int:
    """How many pages `fraction` of free_bytes holds."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the KV memory fraction must be in (0, 1], got {fraction}")
    return int(free_bytes * fraction) // page_bytes


def device_pages(config, dtype, fraction: float, page_size: int) -> int:
    """Pages of page_size positions that `fraction` of the first device's free memory
    (after whatever it holds now: the weights) holds; a cache split over
    config.tensor_parallel devices puts 1/N of each page on each. ValueError on a
    device that does not report its memory (the CPU)."""
    import jax  # noqa: PLC0415

    from .cache import page_bytes  # noqa: PLC0415
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        raise ValueError(f"the {device.platform} device does not report its memory: give the pages' count")
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    pages = pages_for_memory(free, fraction, page_bytes(config, page_size, dtype) // config.tensor_parallel)
    if pages < 2:
        raise ValueError(f"{fraction} of the {free / 2**30:.1f} GiB free holds no KV pages")
    return pages
