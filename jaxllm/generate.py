"""Generation: one prefill, then the compiled decode loop (decoding.py) over a
donated cache.

The loop stops when the token budget is spent or every row has stopped; it runs in
chunks only so that `generate_stream` can hand tokens to the host between chunks.
Nothing leaves the device inside a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .cache import init_cache
from .config import ModelConfig
from .decoding import (DecodeState, Scores, check_prompt, decode, decode_stepped, empty_scores, init_state, prefill,
                       take_tokens, token_entries)
from .errors import ContextLengthError
from .grammar import Grammar, Matchers
from .params import Params
from .sampling import SamplerSettings
from .sharding import place_cache

__all__ = ["ContextLengthError", "DecodeState", "GenerationResult", "Generation", "bucket_length",
           "generate", "generate_stream", "start"]


def bucket_length(n: int, minimum: int = 16) -> int:
    """Round a prompt length up to a power of two so new lengths rarely recompile."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[list[int]]  # per row: generated ids, stop token excluded
    stop_reasons: list[str]  # "stop" (a stop token), "length" (budget or context)
    # with logprobs=k: per row, per token, (its log-probability, [(id, log-probability)] of the top k)
    logprobs: Optional[list[list[tuple[float, list[tuple[int, float]]]]]] = None


@dataclass
class Generation:
    """A generation under way on the device: the decode state, the tokens [B, N]
    written so far (-1 where none) and how many columns are written."""

    state: DecodeState
    tokens: jax.Array
    column: jax.Array
    stop_ids: jax.Array
    max_new: int
    settings: SamplerSettings
    scores: Optional[Scores] = None  # [B, N] and [B, N, k], when log-probabilities are asked for
    matchers: Optional[Matchers] = None  # the rows' grammar matchers, while they decode

    def run(self, params: Params, config: ModelConfig, until: int, steps_per_sync: int = 16) -> "Generation":
        """Decode until `until` columns are written (rounded up to whole syncs), the budget, or every row stops."""
        if self.matchers is not None:
            return self._run_stepped(params, config, min(until, self.max_new))
        self.state, self.tokens, self.column, self.scores = decode(
            params, config, self.settings, self.state, self.tokens, self.column, self.stop_ids,
            jnp.int32(min(until, self.max_new)), steps_per_sync=steps_per_sync, scores=self.scores)
        return self


    def _run_stepped(self, params: Params, config: ModelConfig, until: int) -> "Generation":
        """Rows held to grammars: decoding.decode_stepped, its tokens into the columns."""
        column = int(self.column)
        if column >= until or not bool(jnp.any(self.state.active)):
            return self
        k = None if self.scores is None else self.scores.top_ids.shape[-1]
        self.state, new, scores = decode_stepped(params, config, self.settings, self.state, self.matchers,
                                                 until - column, self.stop_ids, top_logprobs=k)
        put = lambda buffer, value: buffer.at[:, column:column + value.shape[1]].set(value)
        self.tokens = put(self.tokens, jnp.asarray(new))
        if scores is not None:
            self.scores = jax.tree.map(put, self.scores, scores)
        self.column = jnp.int32(column + new.shape[1])
        return self


def _as_rows(prompts) -> list[list[int]]:
    if isinstance(prompts, (np.ndarray, jax.Array)):
        prompts = np.asarray(prompts)
        prompts = [prompts.tolist()] if prompts.ndim == 1 else prompts.tolist()
    rows = [list(map(int, p)) for p in prompts]
    if not rows:
        raise ValueError("every prompt needs at least one token")
    return rows


def start(params: Params, config: ModelConfig, prompts, *, max_new_tokens: int,
          settings: SamplerSettings, seed: int = 0, stop_tokens: Optional[Sequence[int]] = None,
          max_context: Optional[int] = None, cache_dtype=None, logprobs: Optional[int] = None,
          grammar=None) -> Generation:
    """Validate, pad and prefill. Row b draws with the key of seed + b, as a served
    request with that seed would. logprobs=k: record each token's log-probability and
    the top k. grammar: a `Grammar` for every row, or one (or None) per row."""
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
        raise ValueError(f"logprobs must be an integer >= 0, got {logprobs!r}")
    rows = _as_rows(prompts)
    context = min(max_context or config.max_seq_len, config.max_seq_len)
    for r in rows:
        check_prompt(config, r, max_new_tokens, context, whole_budget=False)
    longest = max(len(r) for r in rows)
    T = min(bucket_length(longest), context)
    capacity = max(T, min(_round_up(longest + max_new_tokens, 128), context))
    tokens = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    stops = tuple(config.eos_token_ids if stop_tokens is None else stop_tokens)
    stop_ids = jnp.asarray(stops or (-2,), jnp.int32)  # -2 never matches
    B = len(rows)
    matchers = _matchers(grammar, B)
    state = init_state(place_cache(init_cache(config, B, capacity, cache_dtype or params.embed.dtype), params),
                       jnp.stack([jax.random.PRNGKey(seed + b) for b in range(B)]),
                       jnp.full((B,), max_new_tokens, jnp.int32),
                       track_seen=settings.repetition_penalty != 1.0, vocab_size=config.vocab_size,
                       track_counts=settings.counts_tokens)
    masks = None if matchers is None else jnp.asarray(matchers.masks(range(B)))
    state, first, scored = prefill(params, config, settings, state, jnp.asarray(tokens), jnp.asarray(lengths),
                                   stop_ids, logprobs, masks)
    if matchers is not None:
        matchers.consume(np.asarray(first))
    out = jnp.full((B, capacity), -1, jnp.int32).at[:, 0].set(first)
    scores = None
    if logprobs is not None:
        scores = jax.tree.map(lambda buffer, value: buffer.at[:, 0].set(value),
                              empty_scores(B, capacity, logprobs), scored)
    return Generation(state, out, jnp.int32(1), stop_ids, max_new_tokens, settings, scores, matchers)


def _matchers(grammar, B: int) -> Optional[Matchers]:
    """A bank holding each row to its grammar (None: no row has one)."""
    per_row = list(grammar) if isinstance(grammar, (list, tuple)) else [grammar] * B
    if len(per_row) != B:
        raise ValueError(f"grammar: one per prompt ({B}), got {len(per_row)}")
    if all(g is None for g in per_row):
        return None
    if not all(g is None or isinstance(g, Grammar) for g in per_row):
        raise ValueError("grammar: a jaxllm.Grammar (from jaxllm.Grammars), a list of them, or None")
    matchers = Matchers(next(g for g in per_row if g is not None).owner)
    for b, g in enumerate(per_row):
        if g is not None:
            matchers.attach(b, g)
    return matchers


def _finish(tokens: np.ndarray, stops, scores: Optional[Scores] = None) -> GenerationResult:
    rows = [take_tokens(row.tolist(), stops) for row in tokens]
    logprobs = None
    if scores is not None:
        scores = [np.asarray(a) for a in scores]
        logprobs = [token_entries(*(a[b, :len(kept)] for a in scores)) for b, (kept, _) in enumerate(rows)]
    return GenerationResult([r for r, _ in rows], [reason or "length" for _, reason in rows], logprobs)


def generate(params: Params, config: ModelConfig, prompts, *, max_new_tokens: int = 64,
             settings: SamplerSettings = SamplerSettings(), seed: int = 0,
             stop_tokens: Optional[Sequence[int]] = None, max_context: Optional[int] = None,
             cache_dtype=None, logprobs: Optional[int] = None, grammar=None) -> GenerationResult:
    """Generate up to max_new_tokens for each prompt (token id lists of any lengths).

    Rows stop at any id in stop_tokens (default: the config's EOS ids), at the
    token budget, or when the context is full. Reproducible for a given seed.
    logprobs=k: each token's log-probability under the model (its log-softmax, before
    penalties, temperature and filters) and the top k, in the result's `logprobs`.
    grammar: hold every row (or, given a list, each row) to a `Grammar` from
    `jaxllm.Grammars(tokenizer, vocab_size)`: a JSON schema, regex, Lark/GBNF grammar
    or choice; a row ends where its grammar is complete.
    """
    run = start(params, config, prompts, max_new_tokens=max_new_tokens, settings=settings, seed=seed,
                stop_tokens=stop_tokens, max_context=max_context, cache_dtype=cache_dtype, logprobs=logprobs,
                grammar=grammar)
    run.run(params, config, max_new_tokens)
    return _finish(np.asarray(run.tokens), set(np.asarray(run.stop_ids).tolist()), run.scores)


def generate_stream(params: Params, config: ModelConfig, prompts, *, max_new_tokens: int = 64,
                    settings: SamplerSettings = SamplerSettings(), seed: int = 0,
                    stop_tokens: Optional[Sequence[int]] = None, chunk: int = 8,
                    max_context: Optional[int] = None, cache_dtype=None, grammar=None
                    ) -> Iterator[list[list[int]]]:
    """Like `generate`, yielding each row's new tokens every `chunk` decode steps.

    Yields lists of B token lists (possibly empty for rows that are done); stop
    tokens are not yielded. Same tokens as `generate` for the same seed.
    """
    run = start(params, config, prompts, max_new_tokens=max_new_tokens, settings=settings, seed=seed,
                stop_tokens=stop_tokens, max_context=max_context, cache_dtype=cache_dtype, grammar=grammar)
    stops = set(np.asarray(run.stop_ids).tolist())
    emitted, stopped = 0, None
    while True:
        n = int(run.column)
        fresh = np.asarray(run.tokens[:, emitted:n])
        stopped = stopped or [False] * fresh.shape[0]
        out = []
        for b, row in enumerate(fresh):
            keep, reason = ([], None) if stopped[b] else take_tokens(row.tolist(), stops)
            stopped[b] = stopped[b] or reason == "stop"
            out.append(keep)
        emitted = n
        if any(out):
            yield out
        if n >= max_new_tokens or not bool(jnp.any(run.state.active)):
            return
        run.run(params, config, n + chunk, steps_per_sync=chunk)
