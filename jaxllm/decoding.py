"""The decode core that `generate` and the serving engine (batching.py) share: one
per-row state, one step (model, sampler, stop accounting), one compiled loop, one
validation of what comes in and one trimming of what goes out.

Every row carries its own budget, PRNG key and (in the engine) sampling settings,
so a row's tokens depend only on its own prompt, settings and seed, never on the
rows beside it. `generate` passes static `SamplerSettings` (compiled into the
program: greedy costs one argmax); the engine keeps `RowSampling` in the state.
"""

from __future__ import annotations

from functools import partial
from typing import Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .cache import Cache
from .config import ModelConfig
from .errors import ContextLengthError
from .grammar import Matchers, allowed_logits
from .model import extend, extend_hidden, unembed
from .params import Params
from .sampling import RowSampling, SamplerSettings, sample


@struct.dataclass
class DecodeState:
    """What the decode loop carries for B rows. A row that is not `active` (stopped,
    or a free slot of the engine) neither advances its cache nor samples."""

    cache: Cache  # KVCache [B, S] per layer, or a PagedKVCache; lengths [B] = the next position of each row
    last: jax.Array  # [B] int32: the newest token of each row, fed next
    active: jax.Array  # [B] bool
    n_generated: jax.Array  # [B] int32: tokens sampled so far by each row
    max_new: jax.Array  # [B] int32: each row's token budget
    keys: jax.Array  # [B, 2] uint32: each row's PRNG key; its token n draws with fold_in(key, n)
    sampling: Optional[RowSampling]  # [B] each; None where the settings are static
    seen: Optional[jax.Array]  # [B, V] bool: tokens in each row's context; None without a penalty
    # [B, V] int32: how often each row generated each token; None without presence/frequency penalties
    counts: Optional[jax.Array] = None
    # [B] bool: the rows a stop id ends (a benchmark's request may run to its budget); None: all
    obeys_stops: Optional[jax.Array] = None


def init_state(cache: Cache, keys: jax.Array, max_new: jax.Array, sampling: Optional[RowSampling] = None,
               track_seen: bool = False, vocab_size: int = 0, track_counts: bool = False,
               per_row_stops: bool = False) -> DecodeState:
    """Rows that are all inactive, over `cache` (B = its batch)."""
    B = cache.batch
    zeros = lambda: jnp.zeros((B,), jnp.int32)  # distinct buffers: the state is donated
    return DecodeState(cache=cache, last=zeros(), active=jnp.zeros((B,), bool), n_generated=zeros(),
                       max_new=max_new, keys=keys, sampling=sampling,
                       seen=jnp.zeros((B, vocab_size), bool) if track_seen else None,
                       counts=jnp.zeros((B, vocab_size), jnp.int32) if track_counts else None,
                       obeys_stops=jnp.ones((B,), bool) if per_row_stops else None)


def prompt_seen(tokens: jax.Array, lengths: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] bool: the tokens among each row's first lengths[b] of tokens [B, T]."""
    real = jnp.arange(tokens.shape[1]) < lengths[:, None]
    B = tokens.shape[0]
    return jnp.zeros((B, vocab_size), bool).at[jnp.arange(B)[:, None], tokens].max(real)


def record(state: DecodeState, token: jax.Array, stop_ids: jax.Array,
           rows: Optional[jax.Array] = None) -> DecodeState:
    """Account freshly sampled tokens [B] of `rows` (default: the active ones): a row
    stops at a stop id, at its budget, or when its cache row has no room for the
    token. Other rows are left as they are."""
    rows = state.active if rows is None else rows
    n = state.n_generated + rows
    at_stop = jnp.isin(token, stop_ids)
    if state.obeys_stops is not None:
        at_stop &= state.obeys_stops
    stopped = (at_stop | (n >= state.max_new)
               | (state.cache.lengths >= state.cache.capacity))
    at = lambda: (jnp.arange(token.shape[0]), jnp.maximum(token, 0))
    seen = None if state.seen is None else state.seen.at[at()].max(rows)
    counts = None if state.counts is None else state.counts.at[at()].add(rows.astype(jnp.int32))
    return state.replace(last=jnp.where(rows, token, state.last), n_generated=n,
                         active=state.active & ~(rows & stopped), seen=seen, counts=counts)


class Scores(NamedTuple):
    """Log-probabilities of sampled tokens under the model's own distribution (its
    log-softmax, before repetition penalty, temperature and filters, as OpenAI reports
    them): per step [B] and [B, k], or written by column [B, N] and [B, N, k]."""

    logprob: jax.Array  # float32: of the sampled token
    top_ids: jax.Array  # int32: the k most likely tokens, most likely first
    top_logprobs: jax.Array  # float32: theirs


def token_scores(logits: jax.Array, token: jax.Array, k: int) -> Scores:
    """Scores of tokens [B] (-1: none; scored as token 0) under logits [B, V]."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, jnp.maximum(token, 0)[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(lp, k)
    return Scores(chosen, top_ids.astype(jnp.int32), top_logprobs)


def token_entries(logprob, top_ids, top_logprobs, k: Optional[int] = None) -> list[tuple[float, list]]:
    """On the host, scores as numpy arrays [n] and [n, K]: per token (its log-probability,
    [(id, log-probability)] of the top k, default all K)."""
    k = top_ids.shape[-1] if k is None else k
    return [(float(lp), list(zip(ids[:k].tolist(), tops[:k].tolist())))
            for lp, ids, tops in zip(logprob, top_ids, top_logprobs)]


def empty_scores(B: int, N: int, k: int) -> Scores:
    """A buffer for N steps of B rows."""
    return Scores(jnp.zeros((B, N), jnp.float32), jnp.zeros((B, N, k), jnp.int32),
                  jnp.zeros((B, N, k), jnp.float32))


def sample_next(logits: jax.Array, state: DecodeState, settings: Optional[SamplerSettings]) -> jax.Array:
    """Each row's next token [B] from logits [B, V], drawn with fold_in(key, n_generated)."""
    keys = jax.vmap(jax.random.fold_in)(state.keys, state.n_generated)
    return sample(logits, keys, settings or state.sampling, state.seen, state.counts)


def advance(params: Params, config: ModelConfig, state: DecodeState, span: Optional[int] = None):
    """Feed every active row its newest token: (state with the caches advanced, the
    next-token logits [B, V]). span: attention reads only the first `span` cache
    slots (model.extend_hidden)."""
    x, cache = extend_hidden(params, config, state.last[:, None], state.active.astype(jnp.int32),
                             state.cache, span)
    return state.replace(cache=cache), unembed(params, config, x[:, 0])


def choose(settings: Optional[SamplerSettings], state: DecodeState, logits: jax.Array, stop_ids: jax.Array,
           top_logprobs: Optional[int] = None, masks: Optional[jax.Array] = None):
    """Every active row's token from logits [B, V], among those its grammar allows
    (masks: `grammar.Matchers.masks` bits, or None), recorded: (state, tokens [B] (-1
    where a row was not active), their Scores with the top `top_logprobs` or None)."""
    token = jnp.where(state.active, sample_next(allowed_logits(logits, masks), state, settings), -1)
    scores = None if top_logprobs is None else token_scores(logits, token, top_logprobs)
    return record(state, token, stop_ids), token, scores


def step(params: Params, config: ModelConfig, settings: Optional[SamplerSettings], state: DecodeState,
         stop_ids: jax.Array, span: Optional[int] = None, top_logprobs: Optional[int] = None):
    """One token for every active row: advance, then choose."""
    state, logits = advance(params, config, state, span)
    return choose(settings, state, logits, stop_ids, top_logprobs)


@partial(jax.jit, static_argnames=("config", "settings", "top_logprobs"), donate_argnames=("state",))
def prefill(params: Params, config: ModelConfig, settings: Optional[SamplerSettings], state: DecodeState,
            tokens: jax.Array, lengths: jax.Array, stop_ids: jax.Array, top_logprobs: Optional[int] = None,
            masks: Optional[jax.Array] = None):
    """Prompts tokens [B, T] (right-padded, lengths [B]) into the state's empty cache,
    and every row's first token (among those `masks` allow, as in `choose`): (state
    with every row active until it stops, tokens [B], their Scores with the top
    `top_logprobs` or None)."""
    logits, cache = extend(params, config, tokens, lengths, state.cache)
    seen = None if state.seen is None else prompt_seen(tokens, lengths, config.vocab_size)
    B = tokens.shape[0]
    state = state.replace(cache=cache, active=jnp.ones((B,), bool), n_generated=jnp.zeros((B,), jnp.int32),
                          seen=seen)
    token = sample_next(allowed_logits(logits, masks), state, settings)
    scores = None if top_logprobs is None else token_scores(logits, token, top_logprobs)
    return record(state, token, stop_ids), token, scores


@partial(jax.jit, static_argnames=("config", "settings", "steps_per_sync", "span"),
         donate_argnames=("state", "tokens", "scores"))
def decode(params: Params, config: ModelConfig, settings: Optional[SamplerSettings], state: DecodeState,
           tokens: jax.Array, column: jax.Array, stop_ids: jax.Array, until: jax.Array,
           steps_per_sync: int = 16, span: Optional[int] = None, scores: Optional[Scores] = None):
    """Decode every active row, writing step t's tokens [B] into tokens[:, t] (-1 for
    rows not active) from t = column, until column reaches `until` (rounded up to whole
    syncs; writes past the last column land on it) or no row is active. With a
    `scores` buffer (`empty_scores`, k top tokens), their Scores go to the same
    columns. Returns (state, tokens, column, scores).

    The stop test runs every `steps_per_sync` steps, around an inner loop of static
    length: a GPU while loop copies its predicate to the host on every iteration,
    which would stall the device once per token (benchmarks/NOTES.md).
    """
    k = None if scores is None else scores.top_ids.shape[-1]

    def keep_going(carry):
        state, _, column, _ = carry
        return (column < until) & jnp.any(state.active)

    def one(_, carry):
        state, tokens, column, scores = carry
        any_active = jnp.any(state.active).astype(jnp.int32)
        state, token, new = step(params, config, settings, state, stop_ids, span, k)
        at = jnp.minimum(column, tokens.shape[1] - 1)
        tokens = tokens.at[:, at].set(token)
        if scores is not None:
            scores = jax.tree.map(lambda buffer, value: buffer.at[:, at].set(value), scores, new)
        return state, tokens, column + any_active, scores

    return jax.lax.while_loop(keep_going, lambda carry: jax.lax.fori_loop(0, steps_per_sync, one, carry),
                              (state, tokens, column, scores))


# The stepped loop's two programs split the state: the model pass donates the cache
# alone, sampling donates the small per-row arrays alone. A donated buffer must be
# ready when its program is dispatched (the host waits for it), so neither program
# donates what the one queued just before it is still computing.
@partial(jax.jit, static_argnames=("config", "span"), donate_argnames=("cache",))
def _advance(params: Params, config: ModelConfig, cache: Cache, rows: DecodeState, span: Optional[int]):
    state, logits = advance(params, config, rows.replace(cache=cache), span)
    return state.cache, logits


@partial(jax.jit, static_argnames=("settings", "top_logprobs"), donate_argnames=("rows",))
def _choose(settings: Optional[SamplerSettings], rows: DecodeState, cache: Cache, logits: jax.Array,
            stop_ids: jax.Array, top_logprobs: Optional[int], masks: jax.Array):
    state, token, scores = choose(settings, rows.replace(cache=cache), logits, stop_ids, top_logprobs, masks)
    return state.replace(cache=None), token, scores


def decode_stepped(params: Params, config: ModelConfig, settings: Optional[SamplerSettings], state: DecodeState,
                   matchers: Matchers, steps: int, stop_ids: jax.Array, span: Optional[int] = None,
                   top_logprobs: Optional[int] = None):
    """`decode` for a batch with rows held to grammars, driven from the host one step
    at a time: each step's model pass is dispatched first, and while the device runs
    it the host advances the matchers by the previous step's tokens and computes the
    masks that the step's sampling takes. The matchers must have taken every token
    sampled before; they have taken these too on return. Stops after `steps` steps,
    or once a step finds no row active. Returns (state, tokens [B, n] (numpy, -1 where
    a row was not active), their Scores [B, n] and [B, n, k] or None)."""
    rows = range(state.active.shape[0])
    cache, state = state.cache, state.replace(cache=None)
    taken, scored, previous = [], [], None
    for _ in range(steps):
        cache, logits = _advance(params, config, cache, state, span)
        if previous is not None:
            taken.append(np.asarray(previous))  # ready: the device is on this step's model pass
            matchers.consume(taken[-1])
            if (taken[-1] < 0).all():
                break
        state, previous, scores = _choose(settings, state, cache, logits, stop_ids, top_logprobs,
                                          matchers.masks(rows))
        previous.copy_to_host_async()  # on its way while the next model pass runs
        scored.append(scores)
    else:
        taken.append(np.asarray(previous))
        matchers.consume(taken[-1])
    scores = None
    if top_logprobs is not None:
        scores = Scores(*(jnp.stack(parts, axis=1) for parts in zip(*scored[:len(taken)])))
    return state.replace(cache=cache), np.stack(taken, axis=1), scores


# ---- the host's side ----------------------------------------------------------------------

def check_prompt(config: ModelConfig, prompt_ids: Sequence[int], max_tokens, context: int,
                 whole_budget: bool) -> None:
    """Raise ValueError / ContextLengthError for a prompt that cannot run: empty, ids
    outside the vocabulary, a budget that is not an integer >= 1, or too long for
    `context`: with whole_budget the prompt and the whole budget must fit (the
    server), else the prompt and one new token (generation stops at the context)."""
    if len(prompt_ids) == 0:
        raise ValueError("every prompt needs at least one token")
    if any(not 0 <= t < config.vocab_size for t in prompt_ids):
        raise ValueError(f"token ids must lie in [0, {config.vocab_size})")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if whole_budget and len(prompt_ids) + max_tokens > context:
        raise ContextLengthError(
            f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
            f"the context of {context} tokens")
    if len(prompt_ids) >= context:
        raise ContextLengthError(
            f"prompt of {len(prompt_ids)} tokens does not fit the context of {context} tokens "
            f"(it needs room for at least one new token)")


def take_tokens(tokens: Iterable[int], stop_ids, budget: Optional[int] = None):
    """A row's new tokens as the host hands them on: up to (not including) the first
    stop id, or the first -1 (none yet), at most `budget`. Returns (tokens, reason):
    "stop" after a stop id, "length" when the budget is reached, else None."""
    kept = []
    for t in tokens:
        if t < 0:
            break
        if t in stop_ids:
            return kept, "stop"
        kept.append(t)
        if budget is not None and len(kept) >= budget:
            return kept, "length"
    return kept, None
