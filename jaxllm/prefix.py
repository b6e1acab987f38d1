"""Prefix reuse between the serving engine's slots (batching.py).

A slot's cache row keeps the keys and values of the tokens it was fed until a new
request overwrites it, also after its request ended. `PrefixIndex` records which
tokens each row holds, so that a new prompt beginning like one of them copies that
row's keys and values (a gather inside the admission program) and computes only its
own remainder: a system prompt shared by many requests is prefilled once, and a
conversation's next turn prefills only its new messages.

Lookup walks the prompt in blocks of `block` tokens, each named by a hash chained
over everything before it (vLLM's scheme), then compares tokens to confirm the match
and extend it to the exact common length: a hash collision costs a lookup, never a
wrong answer. Rows are evicted least recently used first (`by_age`).
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence


def block_hashes(tokens: Sequence[int], block: int) -> list[int]:
    """The chained hash of each whole block of `tokens`: entry i names tokens[:(i+1) * block]."""
    out, h = [], 0
    for i in range(len(tokens) // block):
        h = hash((h, tuple(tokens[i * block:(i + 1) * block])))
        out.append(h)
    return out


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share (a binary search over slice comparisons,
    which run in C: a 2,000-token prefix costs a dozen of them, not a Python loop)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixIndex:
    """What each of `n_slots` cache rows holds, and which rows begin with a given block chain."""

    def __init__(self, n_slots: int, block: int = 16):
        self.block = block
        self.held: list[list[int]] = [[] for _ in range(n_slots)]
        self._hashes: list[list[int]] = [[] for _ in range(n_slots)]
        self._rows: dict[int, set[int]] = {}  # block-chain hash -> rows holding that prefix
        self._clock = itertools.count()
        self._used = [0] * n_slots

    def hold(self, slot: int, tokens: Sequence[int]) -> None:
        """Row `slot` now holds the keys and values of `tokens` (positions 0..)."""
        for h in self._hashes[slot]:
            rows = self._rows[h]
            rows.discard(slot)
            if not rows:
                del self._rows[h]
        self.held[slot] = list(tokens)
        self._hashes[slot] = block_hashes(tokens, self.block)
        for h in self._hashes[slot]:
            self._rows.setdefault(h, set()).add(slot)
        self.touch(slot)

    def forget(self, slot: int) -> None:
        self.hold(slot, [])

    def touch(self, slot: int) -> None:
        self._used[slot] = next(self._clock)

    def match(self, tokens: Sequence[int], limit: int, exclude: Iterable[int] = ()) -> tuple[int, int]:
        """(row, n): a row, none of `exclude`, whose first n positions hold tokens[:n],
        n <= limit as large as any row allows (0 when no whole block matches; row is
        then -1)."""
        tokens, exclude = tokens[:limit], set(exclude)
        best, rows = 0, set()
        for i, h in enumerate(block_hashes(tokens, self.block)):
            if not self._rows.get(h, set()) - exclude:
                break
            best, rows = (i + 1) * self.block, self._rows[h] - exclude
        # Past the whole blocks, the rows holding them may go on differently: the longest
        # wins, the most recently used among equals. Comparing the blocks' tokens too
        # makes a hash collision cost a lookup, never a wrong answer.
        found = [(common_length(self.held[r][best:limit], tokens[best:]), self._used[r], r) for r in rows]
        more, _, row = max(found, default=(0, 0, -1))
        if row < 0:
            return -1, 0
        n = best + more if self.held[row][:best] == list(tokens[:best]) else common_length(self.held[row], tokens)
        return (row, n) if n else (-1, 0)

    def by_age(self, slots: Iterable[int]) -> list[int]:
        """`slots` least recently used first: the rows whose prefixes to give up first."""
        return sorted(slots, key=lambda s: self._used[s])
