"""Token sampling inside the compiled loop.

`SamplerSettings` is static (hashable): each stage that is switched off is
absent from the compiled program, so greedy decoding costs one argmax.
Stages run in the order of Hugging Face's logits processors: repetition penalty,
temperature, top-k, top-p, min-p, then a categorical draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import struct


@dataclass(frozen=True)
class SamplerSettings:
    """temperature 0 means greedy; top_k 0, top_p 1, min_p 0 and
    repetition_penalty 1 switch their stage off."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0

    def __post_init__(self):
        def bad(name, value, rule):
            raise ValueError(f"invalid sampling parameter {name}={value!r}: must be {rule}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, value, "a finite number")
        if self.temperature < 0:
            bad("temperature", self.temperature, ">= 0 (0 is greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "an integer >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "in (0, 1] (1 disables it)")
        if not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "in [0, 1] (0 disables it)")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "> 0 (1 disables it)")

    @classmethod
    def greedy(cls, repetition_penalty: float = 1.0) -> "SamplerSettings":
        return cls(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                   repetition_penalty=repetition_penalty)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def penalize_repeats(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """logits [B, V]; seen [B, V] bool marks tokens already in the row's context."""
    if penalty == 1.0:
        return logits
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def filter_logits(logits: jax.Array, settings: SamplerSettings) -> jax.Array:
    """Temperature, then top-k, top-p and min-p: logits [B, V] with the tokens
    outside the sampling set at -inf. Tokens tied with a cut-off value stay in."""
    logits = logits.astype(jnp.float32) / settings.temperature
    V = logits.shape[-1]
    k = min(settings.top_k, V) if settings.top_k > 0 else 0
    if k or settings.top_p < 1.0:
        # Sorted candidates: only the top k when top-k is on, so top-p needs no full sort.
        ranked = jax.lax.top_k(logits, k)[0] if k else jnp.sort(logits, axis=-1)[:, ::-1]
        cutoff = ranked[:, -1]
        if settings.top_p < 1.0:
            probs = jax.nn.softmax(ranked, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better candidates
            keep = jnp.sum(before < settings.top_p, axis=-1)  # >= 1
            cutoff = jnp.take_along_axis(ranked, keep[:, None] - 1, axis=-1)[:, 0]
        logits = jnp.where(logits < cutoff[:, None], -jnp.inf, logits)
    if settings.min_p > 0.0:
        floor = logits.max(-1, keepdims=True) + math.log(settings.min_p)
        logits = jnp.where(logits < floor, -jnp.inf, logits)
    return logits


def sample(logits: jax.Array, key: jax.Array, settings: SamplerSettings,
           seen: jax.Array | None = None) -> jax.Array:
    """Next tokens [B] (int32) from logits [B, V]."""
    if seen is not None:
        logits = penalize_repeats(logits, seen, settings.repetition_penalty)
    if settings.is_greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, settings), axis=-1).astype(jnp.int32)


@struct.dataclass
class RowSampling:
    """Per-row sampling parameters as arrays [B], for batches whose rows belong to
    different requests (the server's slots). Same stages and conventions as
    `SamplerSettings`; rows that sample pay for one sort of the vocabulary."""

    temperature: jax.Array  # float32, 0 = greedy
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # float32, 1 = off
    min_p: jax.Array  # float32, 0 = off
    repetition_penalty: jax.Array  # float32, 1 = off

    @classmethod
    def from_settings(cls, rows: Sequence[SamplerSettings]) -> "RowSampling":
        column = lambda name, dtype: jnp.asarray([getattr(s, name) for s in rows], dtype)
        return cls(column("temperature", jnp.float32), column("top_k", jnp.int32),
                   column("top_p", jnp.float32), column("min_p", jnp.float32),
                   column("repetition_penalty", jnp.float32))


def filter_logits_rows(logits: jax.Array, rows: RowSampling) -> jax.Array:
    """`filter_logits` with each row's own parameters (rows with temperature 0
    are divided by 1 and left to the caller's argmax)."""
    temperature = jnp.where(rows.temperature > 0, rows.temperature, 1.0)
    logits = logits.astype(jnp.float32) / temperature[:, None]
    V = logits.shape[-1]
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where(rows.top_k > 0, jnp.minimum(rows.top_k, V), V)
    in_top_k = jnp.arange(V) < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum((before < rows.top_p[:, None]) & in_top_k, axis=-1)
    keep = jnp.where(rows.top_p < 1.0, jnp.maximum(keep, 1), k)
    cutoff = jnp.take_along_axis(ranked, keep[:, None] - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    floor = logits.max(-1, keepdims=True) + jnp.log(rows.min_p)[:, None]  # log 0 = -inf: off
    return jnp.where(logits < floor, -jnp.inf, logits)


def sample_rows(logits: jax.Array, keys: jax.Array, rows: RowSampling, seen: jax.Array) -> jax.Array:
    """Next tokens [B] from logits [B, V], one PRNG key per row (keys [B, 2]), so a
    row's draws do not depend on which other rows share the batch."""
    penalty = rows.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        filtered = filter_logits_rows(logits, rows)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(rows.temperature > 0, drawn, greedy)

    # The sort is skipped entirely while every row is greedy.
    return jax.lax.cond(jnp.any(rows.temperature > 0), draw, lambda _: greedy, None)
