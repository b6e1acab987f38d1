"""Token sampling inside the compiled loop.

`SamplerSettings` is static (hashable): each stage that is switched off is
absent from the compiled program, so greedy decoding costs one argmax.
Stages run in the order of Hugging Face's logits processors: repetition penalty,
temperature, top-k, top-p, min-p, then a categorical draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp


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
