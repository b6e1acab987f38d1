"""Generation: one prefill, then a compiled decode loop over a donated cache.

The loop is a `lax.while_loop` that stops when the token budget is spent or every
row has stopped; it runs in chunks only so that `generate_stream` can hand tokens
to the host between chunks. Nothing leaves the device inside a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .cache import KVCache, init_cache
from .config import ModelConfig
from .model import extend, extend_hidden, unembed
from .params import Params
from .sampling import SamplerSettings, sample


class ContextLengthError(ValueError):
    """A prompt does not fit the model's (or the requested) context."""


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries. B rows, N = capacity of `generated`."""

    cache: KVCache
    generated: jax.Array  # [B, N] int32: sampled tokens, -1 where none yet
    n_generated: jax.Array  # [] int32: columns of `generated` filled so far
    last: jax.Array  # [B] int32: the newest token of each row, next to feed
    done: jax.Array  # [B] bool: row hit a stop token or the cache end
    key: jax.Array  # PRNG key; step n draws with fold_in(key, n)
    seen: Optional[jax.Array]  # [B, V] bool tokens in context (repetition penalty only)


def bucket_length(n: int, minimum: int = 16) -> int:
    """Round a prompt length up to a power of two so new lengths rarely recompile."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _record(state: DecodeState, token, stop_ids, max_new) -> DecodeState:
    """Store freshly sampled tokens [B] of the rows still running as column
    n_generated, and update the stop flags. Once every row is done this is a no-op,
    so the fixed-length inner loop may run past the end harmlessly."""
    n, active = state.n_generated, ~state.done
    col = jnp.minimum(n, state.generated.shape[1] - 1)
    generated = state.generated.at[:, col].set(jnp.where(active, token, state.generated[:, col]))
    stopped = jnp.isin(token, stop_ids) | (state.cache.lengths >= state.cache.capacity) | (n + 1 >= max_new)
    seen = state.seen
    if seen is not None:
        seen = seen.at[jnp.arange(token.shape[0]), token].max(active)
    return state.replace(
        generated=generated, n_generated=n + jnp.any(active).astype(jnp.int32),
        last=jnp.where(active, token, state.last), done=state.done | (active & stopped), seen=seen)


@partial(jax.jit, static_argnames=("config", "settings"), donate_argnames=("cache",))
def prefill(params: Params, config: ModelConfig, settings: SamplerSettings, tokens, lengths,
            cache: KVCache, key, stop_ids, max_new) -> DecodeState:
    """Prompts tokens [B, T] (right-padded, lengths [B]) into an empty cache, and the
    first sampled token. max_new (int32 scalar) bounds the tokens generated per row."""
    B = tokens.shape[0]
    logits, cache = extend(params, config, tokens, lengths, cache)
    seen = None
    if settings.repetition_penalty != 1.0:
        real = jnp.arange(tokens.shape[1]) < lengths[:, None]
        seen = jnp.zeros((B, config.vocab_size), bool).at[
            jnp.arange(B)[:, None], tokens].max(real)
    state = DecodeState(
        cache=cache, generated=jnp.full((B, cache.capacity), -1, jnp.int32),
        n_generated=jnp.int32(0), last=jnp.zeros((B,), jnp.int32), done=jnp.zeros((B,), bool),
        key=key, seen=seen)
    token = sample(logits, jax.random.fold_in(key, 0), settings, seen)
    return _record(state, token, stop_ids, max_new)


@partial(jax.jit, static_argnames=("config", "settings", "steps_per_sync"),
         donate_argnames=("state",))
def decode(params: Params, config: ModelConfig, settings: SamplerSettings, state: DecodeState,
           stop_ids, max_new, chunk_end, steps_per_sync: int = 16) -> DecodeState:
    """Decode until chunk_end tokens per row (rounded up to whole syncs), max_new,
    or every row is done.

    The stop test runs every `steps_per_sync` steps, around an inner loop of static
    length: a GPU while loop copies its predicate to the host on every iteration,
    which would stall the device once per token (benchmarks/NOTES.md).
    """

    def keep_going(s: DecodeState):
        return (s.n_generated < jnp.minimum(chunk_end, max_new)) & ~jnp.all(s.done)

    def step(_, s: DecodeState) -> DecodeState:
        active = (~s.done).astype(jnp.int32)
        x, cache = extend_hidden(params, config, s.last[:, None], active, s.cache)
        logits = unembed(params, config, x[:, 0])
        token = sample(logits, jax.random.fold_in(s.key, s.n_generated), settings, s.seen)
        return _record(s.replace(cache=cache), token, stop_ids, max_new)

    return jax.lax.while_loop(
        keep_going, lambda s: jax.lax.fori_loop(0, steps_per_sync, step, s), state)


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[list[int]]  # per row: generated ids, stop token excluded
    stop_reasons: list[str]  # "stop" (a stop token), "length" (budget or context)


def _as_rows(prompts) -> list[list[int]]:
    if isinstance(prompts, (np.ndarray, jax.Array)):
        prompts = np.asarray(prompts)
        prompts = [prompts.tolist()] if prompts.ndim == 1 else prompts.tolist()
    rows = [list(map(int, p)) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    return rows


def start(params: Params, config: ModelConfig, prompts, *, max_new_tokens: int,
          settings: SamplerSettings, seed: int = 0, stop_tokens: Optional[Sequence[int]] = None,
          max_context: Optional[int] = None, cache_dtype=None):
    """Validate, pad and prefill. Returns (state, stop_ids, max_new)."""
    rows = _as_rows(prompts)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    context = min(max_context or config.max_seq_len, config.max_seq_len)
    longest = max(len(r) for r in rows)
    if longest >= context:
        raise ContextLengthError(
            f"prompt of {longest} tokens does not fit the context of {context} tokens "
            f"(it needs room for at least one new token)")
    if any(t < 0 or t >= config.vocab_size for r in rows for t in r):
        raise ValueError(f"token ids must lie in [0, {config.vocab_size})")
    T = min(bucket_length(longest), context)
    capacity = max(T, min(_round_up(longest + max_new_tokens, 128), context))
    tokens = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    stops = tuple(config.eos_token_ids if stop_tokens is None else stop_tokens)
    stop_ids = jnp.asarray(stops or (-2,), jnp.int32)  # -2 never matches
    dtype = cache_dtype or params.embed.dtype
    cache = init_cache(config, len(rows), capacity, dtype)
    max_new = jnp.int32(max_new_tokens)
    state = prefill(params, config, settings, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                    jax.random.PRNGKey(seed), stop_ids, max_new)
    return state, stop_ids, max_new


def _finish(generated: np.ndarray, stops: np.ndarray) -> GenerationResult:
    tokens, reasons = [], []
    for row in generated:
        row = row[row >= 0].tolist()
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        tokens.append(row if cut is None else row[:cut])
        reasons.append("length" if cut is None else "stop")
    return GenerationResult(tokens, reasons)


def generate(params: Params, config: ModelConfig, prompts, *, max_new_tokens: int = 64,
             settings: SamplerSettings = SamplerSettings(), seed: int = 0,
             stop_tokens: Optional[Sequence[int]] = None, max_context: Optional[int] = None,
             cache_dtype=None) -> GenerationResult:
    """Generate up to max_new_tokens for each prompt (token id lists of any lengths).

    Rows stop at any id in stop_tokens (default: the config's EOS ids), at the
    token budget, or when the context is full. Reproducible for a given seed.
    """
    state, stop_ids, max_new = start(
        params, config, prompts, max_new_tokens=max_new_tokens, settings=settings, seed=seed,
        stop_tokens=stop_tokens, max_context=max_context, cache_dtype=cache_dtype)
    state = decode(params, config, settings, state, stop_ids, max_new, max_new)
    return _finish(np.asarray(state.generated), np.asarray(stop_ids))


def generate_stream(params: Params, config: ModelConfig, prompts, *, max_new_tokens: int = 64,
                    settings: SamplerSettings = SamplerSettings(), seed: int = 0,
                    stop_tokens: Optional[Sequence[int]] = None, chunk: int = 8,
                    max_context: Optional[int] = None, cache_dtype=None
                    ) -> Iterator[list[list[int]]]:
    """Like `generate`, yielding each row's new tokens every `chunk` decode steps.

    Yields lists of B token lists (possibly empty for rows that are done); stop
    tokens are not yielded. Same tokens as `generate` for the same seed.
    """
    state, stop_ids, max_new = start(
        params, config, prompts, max_new_tokens=max_new_tokens, settings=settings, seed=seed,
        stop_tokens=stop_tokens, max_context=max_context, cache_dtype=cache_dtype)
    stops = set(np.asarray(stop_ids).tolist())
    emitted, stopped = 0, None
    while True:
        n = int(state.n_generated)
        fresh = np.asarray(state.generated[:, emitted:n])
        if stopped is None:
            stopped = [False] * fresh.shape[0]
        out = []
        for b, row in enumerate(fresh):
            keep = []
            for t in row.tolist():
                if stopped[b] or t < 0:
                    break
                if t in stops:
                    stopped[b] = True
                    break
                keep.append(t)
            out.append(keep)
        emitted = n
        if any(out):
            yield out
        if n >= max_new_tokens or bool(jnp.all(state.done)):
            return
        state = decode(params, config, settings, state, stop_ids, max_new, jnp.int32(n + chunk),
                       steps_per_sync=chunk)
