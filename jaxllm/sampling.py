"""Token sampling inside the compiled loop: one sampler for two kinds of settings.

`RowSampling` holds each row's own settings as arrays [B] (the serving engine's
rows belong to different requests). `SamplerSettings` is the static special case,
one hashable setting for every row (`generate`): each stage switched off there is
absent from the compiled program, so greedy decoding costs one argmax, and top-k
ranks only k candidates where per-row settings sort the vocabulary.
Stages run in the order of Hugging Face's logits processors: repetition penalty,
temperature, top-k, top-p, min-p, then a categorical draw with each row's own key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import struct


@dataclass(frozen=True)
class SamplerSettings:
    """temperature 0 means greedy; top_k 0, top_p 1, min_p 0, repetition_penalty 1
    and presence/frequency penalties 0 switch their stage off. repetition_penalty
    (llama.cpp's, HF's) divides the logits of tokens in the row's context; the
    presence and frequency penalties (OpenAI's) subtract presence + frequency * count
    from the logit of each token the row has generated `count` times (vLLM's
    convention: generated tokens only)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        def bad(name, value, rule):
            raise ValueError(f"invalid sampling parameter {name}={value!r}: must be {rule}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, getattr(self, name), "in [-2, 2] (0 disables it)")

    @classmethod
    def greedy(cls, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0) -> "SamplerSettings":
        return cls(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=repetition_penalty,
                   presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)

    @property
    def counts_tokens(self) -> bool:
        """The presence or frequency penalty is on: generated tokens are counted."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


@struct.dataclass
class RowSampling:
    """Per-row sampling parameters as arrays [B], for batches whose rows belong to
    different requests (the server's rows). Same stages and conventions as
    `SamplerSettings`; rows that sample pay for one sort of the vocabulary."""

    temperature: jax.Array  # float32, 0 = greedy
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # float32, 1 = off
    min_p: jax.Array  # float32, 0 = off
    repetition_penalty: jax.Array  # float32, 1 = off
    presence_penalty: jax.Array  # float32, 0 = off
    frequency_penalty: jax.Array  # float32, 0 = off

    @classmethod
    def from_settings(cls, rows: Sequence[SamplerSettings]) -> "RowSampling":
        column = lambda name, dtype: jnp.asarray([getattr(s, name) for s in rows], dtype)
        return cls(column("temperature", jnp.float32), column("top_k", jnp.int32),
                   column("top_p", jnp.float32), column("min_p", jnp.float32),
                   column("repetition_penalty", jnp.float32), column("presence_penalty", jnp.float32),
                   column("frequency_penalty", jnp.float32))


Settings = Union[SamplerSettings, RowSampling]


def _column(v):
    """A setting as a column [B, 1] against logits [B, V]; a static number as it is."""
    return v[:, None] if isinstance(v, jax.Array) else v


def _off(v, off) -> bool:
    """A stage is statically off: a static setting at its off value."""
    return not isinstance(v, jax.Array) and v == off


def penalize_repeats(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """logits [B, V]; seen [B, V] bool marks tokens already in the row's context;
    penalty a number or [B]."""
    if _off(penalty, 1.0):
        return logits
    penalty = _column(penalty)
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def penalize_counts(logits: jax.Array, counts: jax.Array, presence, frequency) -> jax.Array:
    """logits [B, V] - presence * (counts > 0) - frequency * counts, counts [B, V] the
    times each row generated each token; the penalties numbers or [B]."""
    if _off(presence, 0.0) and _off(frequency, 0.0):
        return logits
    return logits - _column(presence) * (counts > 0) - _column(frequency) * counts


def filter_logits(logits: jax.Array, settings: Settings) -> jax.Array:
    """Temperature, then top-k, top-p and min-p: logits [B, V] with the tokens
    outside the sampling set at -inf. Tokens tied with a cut-off value stay in.
    Per-row settings with temperature 0 divide by 1 (their rows take the argmax)."""
    s = settings
    temperature = (jnp.where(s.temperature > 0, s.temperature, 1.0) if isinstance(s.temperature, jax.Array)
                   else s.temperature)
    logits = logits.astype(jnp.float32) / _column(temperature)
    V = logits.shape[-1]
    if not (_off(s.top_k, 0) and _off(s.top_p, 1.0)):
        if isinstance(s.top_k, int) and s.top_k > 0:  # static: only the top k are ranked
            ranked = jax.lax.top_k(logits, min(s.top_k, V))[0]
            k = jnp.asarray([ranked.shape[-1]])
        else:
            ranked = jnp.sort(logits, axis=-1)[:, ::-1]
            k = jnp.reshape(jnp.where(jnp.asarray(s.top_k) > 0, jnp.minimum(s.top_k, V), V), (-1,))
        in_top_k = jnp.arange(ranked.shape[-1]) < k[:, None]  # [B or 1, candidates]
        keep = k
        if not _off(s.top_p, 1.0):
            probs = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better candidates
            inside = jnp.sum((before < _column(s.top_p)) & in_top_k, axis=-1)
            keep = jnp.where(jnp.asarray(s.top_p) < 1.0, jnp.maximum(inside, 1), k)
        cutoff = jnp.take_along_axis(ranked, jnp.broadcast_to(keep, ranked.shape[:1])[:, None] - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    if not _off(s.min_p, 0.0):
        log_min_p = jnp.log(s.min_p)[:, None] if isinstance(s.min_p, jax.Array) else math.log(s.min_p)
        floor = logits.max(-1, keepdims=True) + log_min_p  # log 0 = -inf: off
        logits = jnp.where(logits < floor, -jnp.inf, logits)
    return logits


def sample(logits: jax.Array, keys: jax.Array, settings: Settings,
           seen: Optional[jax.Array] = None, counts: Optional[jax.Array] = None) -> jax.Array:
    """Next tokens [B] (int32) from logits [B, V], one PRNG key per row (keys [B, 2]),
    so that a row's draws do not depend on which other rows share the batch. seen
    [B, V]: the tokens of each row's context (repetition penalty); counts [B, V]: how
    often each row generated each token (presence and frequency penalties)."""
    if counts is not None:
        logits = penalize_counts(logits, counts, settings.presence_penalty, settings.frequency_penalty)
    if seen is not None:
        logits = penalize_repeats(logits, seen, settings.repetition_penalty)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_=None):
        filtered = filter_logits(logits, settings)
        return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

    if not isinstance(settings.temperature, jax.Array):
        return greedy if settings.temperature == 0 else draw()
    # Per-row settings: the sort is skipped entirely while every row is greedy.
    hot = settings.temperature > 0
    return jax.lax.cond(jnp.any(hot), lambda _: jnp.where(hot, draw(), greedy), lambda _: greedy, None)
