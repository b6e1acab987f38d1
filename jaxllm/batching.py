"""Continuous batching: a fixed number of slots in one batched KV cache.

Requests join free slots between decode chunks and leave when they finish, so
concurrent requests share one compiled decode loop and nothing recompiles per
request (prompts compile once per power-of-two length bucket). Each row keeps its
own sampling parameters, PRNG key and token budget, and writes only its own cache
row: a request never sees another request's tokens, and what it generates does
not depend on who shares the batch.

The device half is three pure, jitted functions over a donated `Slots` pytree
(`admit`, `decode_chunk`, `release`); `Engine` is the host half: a thread that
owns the slots and turns queued `Request`s into tokens and text.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .cache import KVCache, init_cache
from .config import ModelConfig
from .generate import ContextLengthError, bucket_length
from .model import extend, extend_hidden, unembed
from .params import Params
from .sampling import RowSampling, SamplerSettings, sample_rows
from .tokenizer import StreamDecoder, TextTokenizer


@struct.dataclass
class Slots:
    """Device state of B slots. A slot is free or finished when `active` is False."""

    cache: KVCache  # [B, S] per layer
    last: jax.Array  # [B] int32: newest token of each slot, fed next
    active: jax.Array  # [B] bool
    n_generated: jax.Array  # [B] int32
    max_new: jax.Array  # [B] int32: the slot's token budget
    keys: jax.Array  # [B, 2] uint32: the request's PRNG key; token n draws fold_in(key, n)
    sampling: RowSampling  # [B] each
    seen: jax.Array  # [B, V] bool: tokens in the slot's context (repetition penalty)


def init_slots(config: ModelConfig, n_slots: int, capacity: int, dtype) -> Slots:
    zeros = lambda dtype_: jnp.zeros((n_slots,), dtype_)
    return Slots(
        cache=init_cache(config, n_slots, capacity, dtype), last=zeros(jnp.int32),
        active=zeros(bool), n_generated=zeros(jnp.int32), max_new=zeros(jnp.int32),
        keys=jnp.zeros((n_slots, 2), jnp.uint32),
        sampling=RowSampling.from_settings([SamplerSettings.greedy()] * n_slots),
        seen=jnp.zeros((n_slots, config.vocab_size), bool))


def _record(slots: Slots, token, stop_ids) -> Slots:
    """Account freshly sampled tokens [B] (-1 in inactive slots): a slot stops at a
    stop id, at its budget, or when its cache row has no room for the token."""
    active = slots.active
    n = slots.n_generated + active
    stopped = (jnp.isin(token, stop_ids) | (n >= slots.max_new)
               | (slots.cache.lengths >= slots.cache.capacity))
    seen = slots.seen.at[jnp.arange(token.shape[0]), jnp.maximum(token, 0)].max(active)
    return slots.replace(last=jnp.where(active, token, slots.last), n_generated=n,
                         active=active & ~stopped, seen=seen)


def _sample(params, config, slots: Slots, x) -> jax.Array:
    logits = unembed(params, config, x)
    keys = jax.vmap(jax.random.fold_in)(slots.keys, slots.n_generated)
    return sample_rows(logits, keys, slots.sampling, slots.seen)


@partial(jax.jit, static_argnames=("config",), donate_argnames=("slots",))
def admit(params: Params, config: ModelConfig, slots: Slots, slot, tokens, length, key,
          sampling: RowSampling, max_new, stop_ids):
    """Prefill one prompt (tokens [1, T], its first `length` real) into slot `slot`
    and sample its first token with the request's key, parameters (a one-row
    RowSampling) and budget. Returns (slots, first token)."""
    T = tokens.shape[1]
    # The prompt runs against a cache of its own length, then lands in the slot's
    # row: attention over the prompt costs T x T, not T x the whole row.
    logits, own = extend(params, config, tokens, length[None],
                         init_cache(config, 1, T, slots.cache.k[0].dtype))
    put = lambda big, small: jax.lax.dynamic_update_slice(big, small, (slot, 0, 0, 0))
    cache = KVCache(k=tuple(map(put, slots.cache.k, own.k)), v=tuple(map(put, slots.cache.v, own.v)),
                    lengths=slots.cache.lengths.at[slot].set(length))
    seen = jnp.zeros((config.vocab_size,), bool).at[tokens[0]].max(jnp.arange(T) < length)
    token = sample_rows(logits, jax.random.fold_in(key, 0)[None], sampling, seen[None])[0]
    stopped = jnp.isin(token, stop_ids) | (max_new <= 1) | (length >= cache.capacity)
    set_row = lambda array, value: array.at[slot].set(value)
    slots = slots.replace(
        cache=cache, last=set_row(slots.last, token), active=set_row(slots.active, ~stopped),
        n_generated=set_row(slots.n_generated, 1), max_new=set_row(slots.max_new, max_new),
        keys=set_row(slots.keys, key),
        sampling=jax.tree.map(lambda a, v: set_row(a, v[0]), slots.sampling, sampling),
        seen=set_row(slots.seen, seen.at[token].set(True)))
    return slots, token


@partial(jax.jit, static_argnames=("config", "steps", "span"), donate_argnames=("slots",))
def decode_chunk(params: Params, config: ModelConfig, slots: Slots, stop_ids, steps: int,
                 span: int):
    """`steps` decode steps of every active slot. Returns (slots, tokens [B, steps]),
    -1 where a slot was not active.

    Attention reads the first `span` slots of each cache row only: the caller
    picks a span (a power of two, so few compile) that holds every active row to
    the end of the chunk. Decode attention over a whole 2048-slot row would cost
    more than the weights for a small model (9x slower on 8 rows of SmolLM2).
    """

    def step(i, carry):
        slots, out = carry
        x, cache = extend_hidden(params, config, slots.last[:, None],
                                 slots.active.astype(jnp.int32), slots.cache, span)
        token = jnp.where(slots.active, _sample(params, config, slots, x[:, 0]), -1)
        slots = _record(slots.replace(cache=cache), token, stop_ids)
        return slots, out.at[:, i].set(token)

    out = jnp.full((slots.active.shape[0], steps), -1, jnp.int32)
    return jax.lax.fori_loop(0, steps, step, (slots, out))


@partial(jax.jit, donate_argnames=("slots",))
def release(slots: Slots, slot) -> Slots:
    """Stop slot `slot` (its request ended on the host: a stop string, a cancel)."""
    return slots.replace(active=slots.active.at[slot].set(False))


class Metrics:
    """What the engine reports; the server's subclass feeds Prometheus."""

    def first_token(self, seconds: float) -> None: ...
    def tokens(self, count: int, seconds_each: float) -> None: ...
    def occupancy(self, waiting: int, running: int) -> None: ...


@dataclass(eq=False)
class Request:
    """One completion. `on_update(request, text, finish_reason)` is called on the
    engine's thread with each new piece of text, and once more with the finish
    reason ("stop", "length", "cancelled" or "error") when the request ends."""

    prompt_ids: list[int]
    max_tokens: int
    settings: SamplerSettings = SamplerSettings.greedy()
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    on_update: Callable[["Request", str, Optional[str]], None] = lambda r, text, reason: None
    # Filled in by the engine:
    ids: list[int] = field(default_factory=list)  # generated ids, stop token excluded
    text: str = ""  # decoded so far (may run past `emitted` while a stop string could start)
    emitted: int = 0  # characters of `text` handed to on_update
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    delivered_at: Optional[float] = None


class Engine:
    """Serves Requests from `n_slots` slots of one batched cache on a thread of its own.

    submit() and cancel() are thread-safe. Between decode chunks of
    `steps_per_chunk` tokens the engine admits waiting requests into free slots
    (one prefill each) and retires finished or cancelled ones.
    """

    def __init__(self, params: Params, config: ModelConfig, tokenizer: TextTokenizer, *,
                 n_slots: int = 8, max_context: Optional[int] = None, steps_per_chunk: int = 8,
                 metrics: Optional[Metrics] = None):
        if n_slots < 1 or steps_per_chunk < 1:
            raise ValueError("n_slots and steps_per_chunk must be >= 1")
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.capacity = min(max_context or config.max_seq_len, config.max_seq_len)
        self.n_slots, self.steps_per_chunk = n_slots, steps_per_chunk
        self.metrics = metrics or Metrics()
        self.stop_ids = jnp.asarray(config.eos_token_ids or (-2,), jnp.int32)  # -2 never matches
        self._stop_set = set(config.eos_token_ids)
        self.slots = init_slots(config, n_slots, self.capacity, params.embed.dtype)
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}
        self._decoders: dict[int, StreamDecoder] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="jaxllm-engine", daemon=True)

    # -- the caller's side -------------------------------------------------------------

    def check(self, prompt_ids: Sequence[int], max_tokens: int) -> None:
        """Raise ValueError / ContextLengthError for a request that cannot run."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.config.vocab_size for t in prompt_ids):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if len(prompt_ids) + max_tokens > self.capacity:
            raise ContextLengthError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"the context of {self.capacity} tokens")

    def submit(self, request: Request) -> Request:
        self.check(request.prompt_ids, request.max_tokens)
        with self._cond:
            if self._closing:
                raise RuntimeError("the engine is shut down")
            self._waiting.append(request)
            self._cond.notify()
        return request

    def cancel(self, request: Request) -> None:
        """The request ends at the next chunk boundary and frees its slot."""
        with self._cond:
            request.cancelled = True
            self._cond.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self, warmup: bool = True) -> "Engine":
        if warmup:
            self._warmup()
        self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _warmup(self) -> None:
        """Compile the decode chunk and the shortest prompt bucket before serving."""
        self.slots = admit(
            self.params, self.config, self.slots, jnp.int32(0),
            jnp.zeros((1, min(bucket_length(1), self.capacity)), jnp.int32), jnp.int32(1),
            jax.random.PRNGKey(0), RowSampling.from_settings([SamplerSettings.greedy()]),
            jnp.int32(2), self.stop_ids)[0]
        self.slots = release(self.slots, jnp.int32(0))
        self.slots, _ = decode_chunk(self.params, self.config, self.slots, self.stop_ids,
                                     self.steps_per_chunk, self._span(0))
        jax.block_until_ready(self.slots)

    # -- the engine thread -------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closing:
                    break
                joining = []
                free = [b for b in range(self.n_slots) if b not in self._running]
                while free and self._waiting:
                    request = self._waiting.popleft()
                    if request.cancelled:
                        self._end(request, "cancelled")
                    else:
                        joining.append((free.pop(0), request))
                self.metrics.occupancy(len(self._waiting), len(self._running) + len(joining))
            for slot, request in joining:
                self._guarded(self._admit, slot, request)
            for slot, request in list(self._running.items()):
                if request.cancelled:
                    self._retire(slot, "cancelled")
            if self._running:
                self._guarded(self._decode)
        for request in list(self._waiting) + list(self._running.values()):
            self._end(request, "cancelled")

    def _guarded(self, fn, *args) -> None:
        """A failure on the device ends the requests in flight with "error" and starts
        from fresh slots (a failed call may have consumed the donated ones); the
        engine keeps serving."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            victims = list(self._running.values()) + [a for a in args if isinstance(a, Request)]
            self._running.clear()
            self._decoders.clear()
            self.slots = init_slots(self.config, self.n_slots, self.capacity, self.params.embed.dtype)
            for request in victims:
                if request.finish_reason is None:
                    request.error = f"{type(e).__name__}: {e}"
                    self._end(request, "error")

    def _admit(self, slot: int, request: Request) -> None:
        n = len(request.prompt_ids)
        T = min(bucket_length(n), self.capacity)
        tokens = np.zeros((1, T), np.int32)
        tokens[0, :n] = request.prompt_ids
        self.slots, token = admit(
            self.params, self.config, self.slots, jnp.int32(slot), jnp.asarray(tokens), jnp.int32(n),
            jax.random.PRNGKey(request.seed), RowSampling.from_settings([request.settings]),
            jnp.int32(request.max_tokens), self.stop_ids)
        self._running[slot] = request
        self._decoders[slot] = StreamDecoder(self.tokenizer)
        self._take(slot, request, [int(token)], still_active=None)

    def _span(self, longest: int) -> int:
        """Cache slots a chunk must read when the longest running row holds `longest`."""
        return min(self.capacity, max(128, 1 << (longest + self.steps_per_chunk - 1).bit_length()))

    def _decode(self) -> None:
        longest = max(len(r.prompt_ids) + len(r.ids) for r in self._running.values())
        self.slots, tokens = decode_chunk(self.params, self.config, self.slots, self.stop_ids,
                                          self.steps_per_chunk, self._span(longest))
        tokens, active = np.asarray(tokens), np.asarray(self.slots.active)
        for slot, request in list(self._running.items()):
            self._take(slot, request, tokens[slot].tolist(), still_active=bool(active[slot]))

    def _take(self, slot: int, request: Request, tokens: list[int], still_active) -> None:
        """Hand a slot's new tokens to its request; retire it if it has finished."""
        reason, fresh = None, []
        for t in tokens:
            if t < 0:
                break
            if t in self._stop_set:
                reason = "stop"
                break
            fresh.append(t)
            if len(request.ids) + len(fresh) >= request.max_tokens:
                reason = "length"
                break
        now = time.perf_counter()
        if fresh:
            if request.delivered_at is None:
                self.metrics.first_token(now - request.submitted_at)
            else:
                self.metrics.tokens(len(fresh), (now - request.delivered_at) / len(fresh))
            request.delivered_at = now
        decoder = self._decoders[slot]
        for piece in ([fresh] if not request.stop else [[t] for t in fresh]):
            request.ids += piece
            request.text += decoder.push(piece)
            if request.stop and self._cut_at_stop(request):
                reason = "stop"
                break
        if reason is None and still_active is False:
            reason = "length"  # the slot's cache row is full
        if reason is not None:
            request.text += "" if request.stop and reason == "stop" else decoder.flush()
            if request.stop and reason != "stop":
                self._cut_at_stop(request)
        self._emit(request, final=reason is not None)
        if reason is not None:
            self._retire(slot, reason)

    @staticmethod
    def _cut_at_stop(request: Request) -> bool:
        longest = max(map(len, request.stop))
        start = max(0, request.emitted - longest)
        hits = [i for i in (request.text.find(s, start) for s in request.stop) if i >= 0]
        if hits:
            request.text = request.text[:min(hits)]
        return bool(hits)

    def _emit(self, request: Request, final: bool) -> None:
        # While a stop string could still be completing, hold back its length - 1 characters.
        hold = 0 if final or not request.stop else max(map(len, request.stop)) - 1
        upto = max(request.emitted, len(request.text) - hold)
        if upto > request.emitted:
            piece, request.emitted = request.text[request.emitted:upto], upto
            request.on_update(request, piece, None)

    def _retire(self, slot: int, reason: str) -> None:
        request = self._running.pop(slot)
        self._decoders.pop(slot, None)
        self.slots = release(self.slots, jnp.int32(slot))
        if reason in ("cancelled", "error"):
            self._emit(request, final=True)
        self._end(request, reason)

    def _end(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        request.on_update(request, "", reason)
