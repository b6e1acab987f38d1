"""Continuous batching: a fixed number of rows ("slots") in one batched KV cache.

Requests join free slots between decode chunks and leave when they finish, so
concurrent requests share one compiled decode loop and nothing recompiles per
request (prompts compile once per power-of-two length bucket). The loop, the
per-row state and the sampler are decoding.py's, the same as `generate`'s: each
row keeps its own sampling parameters, PRNG key and token budget, and writes only
its own cache row, so a request never sees another request's tokens, and what it
generates does not depend on who shares the batch.

The device half is three pure, jitted functions over a donated `DecodeState`
(`admit`, `decode_chunk`, `release`); `Engine` is the host half: a thread that
owns the slots and turns queued `Request`s into tokens and text.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .cache import init_cache, init_paged_cache, put_rows, rows_of
from .config import ModelConfig
from .decoding import (DecodeState, check_prompt, decode, decode_stepped, empty_scores, init_state, prompt_seen,
                       record, take_tokens, token_entries, token_scores)
from .errors import ContextLengthError
from .generate import bucket_length
from .grammar import Grammar, Grammars, Matchers, allowed_logits
from .model import extend_hidden, unembed
from .params import Params
from .pages import PagePool
from .prefix import PrefixIndex, common_length
from .sampling import RowSampling, SamplerSettings, sample
from .sharding import place_cache
from .harmony import HarmonyDecoder, reply_decoder_kind
from .tokenizer import StreamDecoder, TextTokenizer

# Log-probabilities are recorded with this many top tokens, whatever a request asks
# (OpenAI's most): one compiled variant of the loop for every request that wants them.
TOP_LOGPROBS = 20


ENGINE_STACK_BYTES = 256 << 20  # reserved address space, touched only as deep as it goes


def init_slots(params: Params, config: ModelConfig, n_slots: int, capacity: int,
               pool: Optional[PagePool] = None) -> DecodeState:
    """n_slots free rows of up to `capacity` positions each (on params' devices): each
    its own cache row, or with `pool` rows holding pages of one pool (cache.PagedKVCache)."""
    dtype = params.embed.dtype
    cache = init_cache(config, n_slots, capacity, dtype) if pool is None else init_paged_cache(
        config, n_slots, capacity, pool.n_pages, pool.page_size, dtype)
    cache = place_cache(cache, params)
    return init_state(cache, jnp.zeros((n_slots, 2), jnp.uint32),
                      jnp.zeros((n_slots,), jnp.int32),
                      RowSampling.from_settings([SamplerSettings.greedy()] * n_slots),
                      track_seen=True, vocab_size=config.vocab_size, track_counts=True, per_row_stops=True)


@partial(jax.jit, static_argnames=("config", "span"), donate_argnames=("slots",))
def admit(params: Params, config: ModelConfig, slots: DecodeState, tokens, lengths, sources, starts, prompts,
          dest, of_prompt, final, keys, sampling: RowSampling, max_new, obeys_stops, stop_ids, masks=None,
          pages=None, skip=None, generated=None, gen_from=None, *, span: int):
    """Prefill G prompts at once and start R slots on them (a request's n choices
    share one prompt).

    Prompt g's first starts[g] positions are taken from slot sources[g]'s cache row
    (a prefix it already holds: copied, not computed again); its remaining lengths[g]
    tokens are tokens [G, T]; prompts [G, span] holds the whole prompt, zero-padded
    (the repetition penalty's context). Slot dest[r] [R] starts on prompt of_prompt[r]:
    its cache row receives that prompt's keys and values, and it samples its first
    token with its own key (keys [R, 2]), parameters (an R-row RowSampling), budget
    (max_new [R]) and whether a stop id ends it (obeys_stops [R]), among the tokens `masks` allows (grammar.Matchers bits [R, words],
    or None). A slot whose prompt has more to come (final [R] False: a long prompt is
    prefilled a piece per call) takes the keys and values only. dest = the number of
    slots marks a padding entry (dropped). Attention
    and the copies cover the first `span` positions of a row: span >= starts + T.
    pages [B, W]: a paged cache's new page table (the host's PagePool), taking effect
    after the sources are read; skip [R]: the pages at the start of row dest[r] that
    already hold its prompt's beginning (shared with its source), not written.
    A preempted request resumes with its generated tokens as the end of its prompt:
    generated [R] counts them (its budget, its next key fold_in(key, generated) and its
    token counts go on from there), gen_from [G] is where they begin in prompts.
    Returns (slots, first tokens [R], their Scores [R], [R, k])."""
    B = slots.active.shape[0]
    # Each prompt runs against a working copy of the first `span` positions of its
    # source row (the prefix it reuses, or a free row's leftovers that the causal
    # mask never shows): attention costs T x span, not T x the whole row.
    work = rows_of(slots.cache, sources, span, starts)
    if pages is not None:
        slots = slots.replace(cache=slots.cache.replace(pages=pages))
    x, work = extend_hidden(params, config, tokens, lengths, work, span)
    last = jnp.take_along_axis(x, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = unembed(params, config, last)[of_prompt]  # [R, V]
    set_rows = lambda array, value: array.at[dest].set(value, mode="drop")
    whole = starts + lengths
    cache = put_rows(slots.cache, dest, work, of_prompt, span, skip)
    cache = cache.replace(lengths=set_rows(cache.lengths, whole[of_prompt]))
    seen = prompt_seen(prompts, whole, config.vocab_size)[of_prompt]
    R = dest.shape[0]
    generated = jnp.zeros((R,), jnp.int32) if generated is None else generated
    counts = 0
    if slots.counts is not None and gen_from is not None:  # the generated tokens' counts, as decoding kept them
        mine = (jnp.arange(prompts.shape[1]) >= gen_from[:, None]) & (jnp.arange(prompts.shape[1]) < whole[:, None])
        counts = jnp.zeros((prompts.shape[0], config.vocab_size), jnp.int32).at[
            jnp.arange(prompts.shape[0])[:, None], prompts].add(mine.astype(jnp.int32))[of_prompt]
    token = sample(allowed_logits(logits, masks), jax.vmap(jax.random.fold_in)(keys, generated), sampling, seen,
                   None if slots.counts is None else jnp.zeros((R, config.vocab_size), jnp.int32) + counts)
    slots = slots.replace(
        cache=cache, active=set_rows(slots.active, final), n_generated=set_rows(slots.n_generated, generated),
        max_new=set_rows(slots.max_new, max_new), keys=set_rows(slots.keys, keys),
        sampling=jax.tree.map(set_rows, slots.sampling, sampling), seen=set_rows(slots.seen, seen),
        counts=None if slots.counts is None else set_rows(slots.counts, counts),
        obeys_stops=set_rows(slots.obeys_stops, obeys_stops))
    taken = set_rows(jnp.zeros((B,), bool), final)
    tokens_by_row = set_rows(jnp.full((B,), -1, jnp.int32), jnp.where(final, token, -1))
    return (record(slots, tokens_by_row, stop_ids, rows=taken), token,
            token_scores(logits, token, TOP_LOGPROBS))


@partial(jax.jit, static_argnames=("config", "steps", "span", "logprobs"), donate_argnames=("slots",))
def decode_chunk(params: Params, config: ModelConfig, slots: DecodeState, stop_ids, steps: int, span: int,
                 logprobs: bool = False):
    """`steps` decode steps of every active slot (decoding.decode). Returns (slots,
    tokens [B, steps], -1 where a slot was not active, with `logprobs` their
    Scores with the top TOP_LOGPROBS tokens, else None, and which slots are still
    active [B]: an array of its own, still readable once `slots` is donated to the
    next call).

    Attention reads the first `span` slots of each cache row only: the caller
    picks a span (a power of two, so few compile) that holds every active row to
    the end of the chunk. Decode attention over a whole 2048-slot row would cost
    more than the weights for a small model (9x slower on 8 rows of SmolLM2).
    """
    B = slots.active.shape[0]
    scores = empty_scores(B, steps, TOP_LOGPROBS) if logprobs else None
    slots, tokens, _, scores = decode(params, config, None, slots, jnp.full((B, steps), -1, jnp.int32),
                                      jnp.int32(0), stop_ids, jnp.int32(steps), steps_per_sync=steps,
                                      span=span, scores=scores)
    return slots, tokens, scores, slots.active


@partial(jax.jit, donate_argnames=("slots",))
def release(slots: DecodeState, rows) -> DecodeState:
    """Stop the slots where `rows` [B] (bool) is set: their requests ended on the host
    (a stop string, a cancel, a preemption)."""
    return slots.replace(active=slots.active & ~rows)


class Metrics:
    """What the engine reports; the server's subclass feeds Prometheus."""

    def prefill(self, prompt_tokens: int, reused_tokens: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def tokens(self, count: int, seconds_each: float) -> None: ...
    def occupancy(self, waiting: int, running: int) -> None: ...
    def preempted(self) -> None: ...


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
    top_logprobs: Optional[int] = None  # record log-probabilities with this many top tokens (None: none)
    grammar: Optional[Grammar] = None  # hold the output to it (Engine.grammars() makes them)
    ignore_eos: bool = False  # run to max_tokens through stop ids (serving benchmarks' requests)
    on_update: Callable[["Request", str, Optional[str]], None] = lambda r, text, reason: None
    # Filled in by the engine:
    ids: list[int] = field(default_factory=list)  # generated ids, stop token excluded
    # with top_logprobs: per id, (its log-probability, [(id, log-probability)] of the top tokens)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    text: str = ""  # decoded so far (may run past `emitted` while a stop string could start)
    emitted: int = 0  # characters of `text` handed to on_update
    reasoning: str = ""  # a harmony reply's analysis channel (harmony.py), apart from `text`
    reasoning_emitted: int = 0  # characters of `reasoning` there were at the last on_update
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    delivered_at: Optional[float] = None


@dataclass
class Admission:
    """A prompt the next admission call prefills: its requests (n choices), the slots
    they take, and the prefix it copies from slot `source` (`start` tokens; 0: none)."""

    group: list[Request]
    rows: list[int]
    source: int
    start: int
    width: int  # the tokens this call computes, padded to a bucket
    end: int  # the prompt's tokens the slots hold after this call: all of it, or a piece so far
    reused: int = 0  # its tokens copied from another request's row, not computed
    skip: int = 0  # paged cache: the rows' first pages, which hold the prompt's beginning already
    # what the admission prefills in all (taken when planned: admitting one choice of a
    # group adds its first token to its ids, which must not change its sibling's plan)
    length: int = field(init=False)

    def __post_init__(self):
        self.length = len(context_of(self.group[0]))

    @property
    def final(self) -> bool:
        return self.end == self.length


def context_of(request: Request) -> list[int]:
    """What a request's admission prefills: its prompt, and after a preemption also the
    tokens it generated before (recomputed, then generation goes on)."""
    return request.prompt_ids + request.ids


@dataclass
class HeldBack:
    """A preempted request's host state, kept until it runs again."""

    decoder: object  # its StreamDecoder or HarmonyDecoder, mid-text
    matcher: object = None  # its grammar matcher (grammar.Matchers.take), or None


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


# A prompt that shares this many more tokens with one already planned for the same
# admission call than any slot holds waits for the next call, to copy them.
WAIT_FOR_PREFIX = 128
# An admission call copies the rows' first `span` positions to work on: up to this
# many per prefill token of the budget (the copies' memory, 4 x 8192 positions of an
# 8B model's cache: 4.3 GB; an H200 ran out with 128 prompts x 4096).
COPY_PER_TOKEN = 4


class Engine:
    """Serves Requests from `n_slots` slots of one batched cache on a thread of its own.

    submit() and cancel() are thread-safe. Between decode chunks of
    `steps_per_chunk` tokens the engine retires finished or cancelled requests and
    admits waiting ones into free slots: as many prompts as fit `prefill_tokens`
    (their padded lengths summed) in one batched prefill, and a longer prompt a
    budget's worth per call, so running streams keep their pace while the queue
    drains. With `reuse_prefixes` a prompt copies the
    longest prefix some slot's cache row still holds (prefix.py) and prefills the
    rest only.

    With `kv_pages`, the slots' keys and values live in one pool of that many pages of
    `page_size` positions (cache.PagedKVCache, pages.PagePool) instead of a row of
    `max_context` positions per slot: a request holds the pages its prompt and
    max_tokens need, so many more slots fit the same memory (`pages.device_pages` sizes
    the pool from a fraction of the device's free memory).

    With `overlap`, results land a call late: the host takes a chunk's tokens while the
    device runs the next (_decode). Off by default (see __init__).
    """

    def __init__(self, params: Params, config: ModelConfig, tokenizer: TextTokenizer, *,
                 n_slots: int = 8, max_context: Optional[int] = None, steps_per_chunk: int = 8,
                 prefill_tokens: int = 8192, reuse_prefixes: bool = True, warm_prompt_tokens: int = 0,
                 metrics: Optional[Metrics] = None, kv_pages: Optional[int] = None, page_size: int = 64,
                 overlap: bool = False):
        if n_slots < 1 or steps_per_chunk < 1 or prefill_tokens < 1:
            raise ValueError("n_slots, steps_per_chunk and prefill_tokens must be >= 1")
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.capacity = min(max_context or config.max_seq_len, config.max_seq_len)
        self.pool = None
        if kv_pages is not None:
            self.capacity -= self.capacity % page_size
            if self.capacity < page_size:
                raise ValueError(f"max_context must be at least one page ({page_size} positions)")
            self.pool = PagePool(kv_pages, page_size, n_slots, self.capacity)
        self.n_slots, self.steps_per_chunk = n_slots, steps_per_chunk
        # Off by default until measured on a GPU and until a rare wrong answer in the
        # paged soak with it on is explained (benchmarks/NOTES.md, 2026-12-08).
        self.overlap = overlap
        self.prefill_tokens, self.reuse_prefixes = prefill_tokens, reuse_prefixes
        self.warm_prompt_tokens = warm_prompt_tokens
        self.prefixes = PrefixIndex(n_slots)
        self._admitting: list[Request] = []
        self._partial: list[Admission] = []  # long prompts prefilled a piece per call, oldest first
        self.metrics = metrics or Metrics()
        self.stop_ids = jnp.asarray(config.eos_token_ids or (-2,), jnp.int32)  # -2 never matches
        self._stop_set = set(config.eos_token_ids)
        self.slots = init_slots(params, config, n_slots, self.capacity, self.pool)
        # requests wait in groups: the n choices of one prompt, admitted together
        self._waiting: collections.deque[list[Request]] = collections.deque()
        self._running: dict[int, Request] = {}
        self._stopping: set[int] = set()  # slots to stop on the device before its next call
        # Results of device calls dispatched but not yet read back, oldest first: the
        # host takes one chunk's tokens while the device runs the next (_decode).
        self._landing: collections.deque[Callable[[], None]] = collections.deque()
        self._unlanded: dict[Request, int] = {}  # tokens a running request may have beyond its ids
        self._admitted: dict[int, int] = {}  # slot -> admission order (preemption takes the newest)
        self._order = itertools.count()
        self._held_back: dict[Request, HeldBack] = {}  # preempted requests waiting to resume
        self._decoders: dict[int, StreamDecoder | HarmonyDecoder] = {}
        self._reply_decoder = reply_decoder_kind(tokenizer)  # harmony's for gpt-oss (harmony.py)
        self._grammars: Optional[Grammars] = None
        self._matchers: Optional[Matchers] = None  # the slots' grammars
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="jaxllm-engine", daemon=True)

    # -- the caller's side -------------------------------------------------------------

    def check(self, prompt_ids: Sequence[int], max_tokens: int) -> None:
        """Raise ValueError / ContextLengthError for a request that cannot run."""
        check_prompt(self.config, prompt_ids, max_tokens, self.capacity, whole_budget=True)
        if self.pool is not None and self.pool.pages_for(len(prompt_ids) + max_tokens) > self.pool.usable:
            raise ContextLengthError(
                f"the prompt ({len(prompt_ids)} tokens) and max_tokens ({max_tokens}) need "
                f"{len(prompt_ids) + max_tokens} positions; the KV cache pool holds "
                f"{self.pool.usable * self.pool.page_size}")

    def grammars(self) -> Grammars:
        """The model's grammar compiler, built on first use (~0.3 s for a 49k vocabulary)."""
        with self._cond:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.config.vocab_size)
                self._matchers = Matchers(self._grammars)
            return self._grammars

    def submit(self, request: Request) -> Request:
        return self.submit_group([request])[0]

    def submit_group(self, requests: list[Request]) -> list[Request]:
        """Several completions of one prompt (a request's n choices): its prefill runs
        once, into as many slots, when they are free together. The requests differ in
        their seeds only."""
        first = requests[0]
        self.check(first.prompt_ids, first.max_tokens)
        if len(requests) > self.n_slots:
            raise ValueError(f"{len(requests)} choices of one prompt exceed the engine's {self.n_slots} slots")
        if self.pool is not None and len(requests) * self.pool.pages_for(
                len(first.prompt_ids) + first.max_tokens) > self.pool.usable:
            raise ContextLengthError(f"{len(requests)} choices of this prompt and max_tokens exceed the KV cache pool")
        if any(r.prompt_ids != first.prompt_ids or r.max_tokens != first.max_tokens for r in requests):
            raise ValueError("a group's requests share their prompt and max_tokens")
        with self._cond:
            if self._closing:
                raise RuntimeError("the engine is shut down")
            self._waiting.append(list(requests))
            self._cond.notify()
        return requests

    def cancel(self, request: Request) -> None:
        """The request ends at the next chunk boundary and frees its slot."""
        with self._cond:
            request.cancelled = True
            self._cond.notify()

    @property
    def waiting(self) -> int:
        return sum(map(len, self._waiting)) + sum(len(a.group) for a in self._partial)

    @property
    def running(self) -> int:
        return len(self._running)

    def page_use(self) -> dict[str, int]:
        """The paged pool's pages: held by running requests (and long prompts being
        prefilled), cached (rows whose requests ended, holding prefixes), free."""
        busy = set(self._running) | {b for a in self._partial for b in a.rows}
        running = {p for b in busy for p in self.pool.held[b]}
        held = {p for pages in self.pool.held for p in pages}
        return {"running": len(running), "cached": len(held - running), "free": self.pool.free}

    def start(self, warmup: bool = True) -> "Engine":
        if warmup:
            self._warmup()
        # XLA compiles each new admission shape inside this thread; LLVM's passes recurse
        # deeply, and a thread takes the platform's default stack (8 MB on Linux, less
        # on macOS), where XLA sizes its own compile threads itself.
        previous = threading.stack_size(ENGINE_STACK_BYTES)
        try:
            self._thread.start()
        finally:
            threading.stack_size(previous)
        return self

    def shutdown(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _warmup(self) -> None:
        """Compile the decode chunk and the admission calls before serving: one prompt
        of the shortest bucket, and every batch of prompts up to `warm_prompt_tokens`
        long that the prefill budget admits (each call shape compiles once, seconds
        for a large model, so a server that must not stall on a new shape warms them)."""
        shapes, n = [(1, min(bucket_length(1), self.capacity))], bucket_length(1)
        while self.warm_prompt_tokens and n <= bucket_length(self.warm_prompt_tokens):
            width = min(n, self.capacity)
            shapes += [(1 << i, width) for i in range(_pow2(self.n_slots).bit_length())
                       if i == 0 or (1 << i) * width <= self.prefill_tokens]
            n *= 2
        for count, width in dict.fromkeys(shapes):
            count = min(count, self.n_slots, self.pool.usable if self.pool else self.n_slots)
            for b in range(count):
                if self.pool is not None:
                    self.pool.reserve([b], 1, ())
            self._admit([Admission([Request([0], 2)], [b], 0, 0, width, 1) for b in range(count)], quiet=True)
            for b in range(count):
                self._stopping.add(b)
                self.prefixes.forget(b)
                if self.pool is not None:
                    self.pool.release(b)
        self._stop_slots()
        self.slots, *_ = decode_chunk(self.params, self.config, self.slots, self.stop_ids,
                                      self.steps_per_chunk, self._span(0))
        jax.block_until_ready(self.slots)

    # -- the engine thread -------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._cond:
                while (not self._closing and not self._waiting and not self._running and not self._partial
                       and not self._landing):
                    self._cond.wait()
                if self._closing:
                    break
                joining = self._plan()
                self.metrics.occupancy(self.waiting, len(self._running) + sum(len(a.rows) for a in joining))
            if joining:
                self._guarded(self._admit, joining)
            for slot, request in list(self._running.items()):
                if request.cancelled:
                    self._retire(slot, "cancelled")
            self._guarded(self._decode if self._running else self._land_all)
        for request in ([r for group in self._waiting for r in group] + [r for a in self._partial for r in a.group]
                        + list(self._running.values())):
            self._end(request, "cancelled")

    def _guarded(self, fn, *args) -> None:
        """A failure on the device ends the requests in flight with "error" and starts
        from fresh slots (a failed call may have consumed the donated ones); the
        engine keeps serving."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            victims = list(self._running.values()) + self._admitting + [r for a in self._partial for r in a.group]
            self._partial = []
            self._running.clear()
            self._stopping.clear()
            self._landing.clear()
            self._unlanded.clear()
            self._admitted.clear()
            self._decoders.clear()
            self._admitting = []
            if self._matchers is not None:
                self._matchers.detach_all()
            if self.pool is not None:
                self.pool.reset()
            self.slots = init_slots(self.params, self.config, self.n_slots, self.capacity, self.pool)
            self.prefixes = PrefixIndex(self.n_slots)
            for request in victims:
                if request.finish_reason is None:
                    request.error = f"{type(e).__name__}: {e}"
                    self._end(request, "error")

    def _plan(self) -> list[Admission]:
        """Under the lock: what the next admission call prefills, first come first
        served, as many as free slots and the `prefill_tokens` budget allow (at least
        one): the next pieces of long prompts begun before, then waiting prompts. A
        prompt whose remainder exceeds the budget is prefilled a budget's worth per
        call, so that the running streams decode between its pieces."""
        held = {b for a in self._partial for b in a.rows}
        free = self.prefixes.by_age(b for b in range(self.n_slots) if b not in self._running and b not in held)
        plan: list[Admission] = []

        def fits(start: int, width: int) -> bool:
            # Every prompt of a call runs `widest` tokens from its start: the deepest start
            # plus that must fit the row. The call computes G x widest tokens and copies
            # G x span positions of each layer.
            widest = max([width] + [a.width for a in plan])
            deepest = max([start] + [a.start for a in plan])
            span = min(self.capacity, _pow2(deepest + widest))
            return not plan or (deepest + widest <= self.capacity and _pow2(len(plan) + 1) * max(
                widest, span // COPY_PER_TOKEN) <= self.prefill_tokens)

        for a in list(self._partial):
            if any(r.cancelled for r in a.group):
                self._partial.remove(a)
                for request in a.group:
                    self._end(request, "cancelled")
                continue
            piece = self._piece(context_of(a.group[0]), a.end)
            if not fits(a.end, piece[0]):
                return plan
            self._partial.remove(a)
            plan.append(Admission(a.group, a.rows, a.rows[0], a.end, *piece, a.reused,
                                  skip=a.end // self.pool.page_size if self.pool else 0))
        while self._waiting:
            group = self._waiting[0]
            for request in [r for r in group if r.cancelled]:
                group.remove(request)
                self._end(request, "cancelled")
            if not group:
                self._waiting.popleft()
                continue
            if len(group) > len(free):
                break  # the head waits for its slots
            prompt = context_of(group[0])
            n = len(prompt)
            # Not from a row this call also writes a prompt into: its pages may be kept
            # for that prompt (pages.PagePool.reserve), and sharing them would hand this
            # one what that prompt's prefill writes over them.
            source, start = self.prefixes.match(prompt, n - 1, [b for a in plan for b in a.rows]) \
                if self.reuse_prefixes else (-1, 0)
            if self.reuse_prefixes and any(
                    common_length(prompt, context_of(a.group[0])) - start >= WAIT_FOR_PREFIX for a in plan):
                break  # it copies what this call computes, from the next call on
            width, end = self._piece(prompt, start)
            if not fits(start, width):
                break
            # the row already holding the prefix takes it on
            rows = ([source] if source in free else []) + [b for b in free if b != source]
            rows = rows[:len(group)]
            skip = 0
            if self.pool is not None:
                # the prefix's full pages are shared with the source row, not copied
                skip = start // self.pool.page_size
                # pages for the prompt and the first decode chunk; more as it runs (_grow)
                budget = group[0].max_tokens - len(group[0].ids)
                if not self._reserve(rows, n + min(budget, self.steps_per_chunk), plan, source,
                                     self.pool.held[source][:skip] if source >= 0 else []):
                    break  # the head waits for pages
            for b in rows:
                free.remove(b)
            if source >= 0:
                self.prefixes.touch(source)
            self._waiting.popleft()
            plan.append(Admission(group, rows, max(source, 0), start, width, end, start, skip))
        return plan

    def _reserve(self, rows: list[int], positions: int, plan: list[Admission], source: int,
                 prefix: list[int]) -> bool:
        """Pages for `positions` positions in each of `rows`, the `prefix` pages shared
        (pages.PagePool.reserve), evicting the cached prefixes of rows that nothing
        running, planned or being copied from holds, least recently used first."""
        also_busy = set(rows) | {source} | {b for a in plan for b in a.rows} | {a.source for a in plan if a.start}
        evicted = self.pool.reserve(rows, positions, self._idle_rows(also_busy), prefix)
        if evicted is None:
            return False
        for b in evicted:
            self.prefixes.forget(b)
        return True

    def _piece(self, prompt: list[int], start: int) -> tuple[int, int]:
        """(width, end): the next piece of `prompt` from position `start`: the rest, or
        the budget's worth of it, padded to a bucket that fits the row."""
        end = min(len(prompt), start + max(16, self.prefill_tokens))
        return min(bucket_length(end - start), self.capacity - start), end

    def _admit(self, plan: list[Admission], quiet: bool = False) -> None:
        """Prefill the planned prompts in one call and start their slots."""
        self._stop_slots()
        self._admitting = [r for a in plan for r in a.group]
        G, R = _pow2(len(plan)), _pow2(len(self._admitting))
        T = max(a.width for a in plan)
        span = min(self.capacity, _pow2(max(a.start for a in plan) + T))
        tokens, prompts = np.zeros((G, T), np.int32), np.zeros((G, span), np.int32)
        lengths, sources, starts = np.ones(G, np.int32), np.zeros(G, np.int32), np.zeros(G, np.int32)
        dest, of_prompt, skip = np.full(R, self.n_slots, np.int32), np.zeros(R, np.int32), np.zeros(R, np.int32)
        gen_from = np.full(G, span, np.int32)  # where a resumed prompt's generated tokens begin
        entries = [(g, a, slot, request) for g, a in enumerate(plan) for slot, request in zip(a.rows, a.group)]
        for g, a in enumerate(plan):
            prompt = context_of(a.group[0])[:a.end]
            tokens[g, :a.end - a.start] = prompt[a.start:]
            prompts[g, :a.end] = prompt
            lengths[g], sources[g], starts[g] = a.end - a.start, a.source, a.start
            gen_from[g] = len(a.group[0].prompt_ids)
            for slot in a.rows:
                self.prefixes.hold(slot, prompt)
        final = np.zeros(R, bool)
        for r, (g, a, slot, _) in enumerate(entries):
            dest[r], of_prompt[r], final[r], skip[r] = slot, g, a.final, a.skip
        requests = [request for *_, request in entries]
        padding = R - len(requests)
        masks = None
        if any(request.grammar is not None for request in requests):
            self._land_all()  # the matchers take every token sampled before
            self.grammars()  # the slots' matchers, made on first use
            for _, a, slot, request in entries:
                held = self._held_back.get(request)
                if request.grammar is None:
                    continue
                if held is None:
                    self._matchers.attach(slot, request.grammar)
                elif a.final:  # a preempted request's matcher, where its tokens left it
                    self._matchers.put(slot, held.matcher)
            masks = jnp.asarray(self._matchers.masks(dest.tolist()))
        self.slots, token, scores = admit(
            self.params, self.config, self.slots, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(sources),
            jnp.asarray(starts), jnp.asarray(prompts), jnp.asarray(dest), jnp.asarray(of_prompt), jnp.asarray(final),
            jnp.stack([jax.random.PRNGKey(r.seed) for r in requests] + [jnp.zeros(2, jnp.uint32)] * padding),
            RowSampling.from_settings([r.settings for r in requests] + [SamplerSettings.greedy()] * padding),
            jnp.asarray([r.max_tokens for r in requests] + [1] * padding, jnp.int32),
            jnp.asarray([not r.ignore_eos for r in requests] + [True] * padding), self.stop_ids, masks,
            *((None, None) if self.pool is None else (self._table(), jnp.asarray(skip))),
            jnp.asarray([len(r.ids) for r in requests] + [0] * padding, jnp.int32), jnp.asarray(gen_from), span=span)
        self._admitting = []
        if quiet:
            return
        done = [a for a in plan if a.final]
        fresh = [a for a in done if not a.group[0].ids]  # a resumed request's prompt was counted before
        self.metrics.prefill(sum(len(a.group[0].prompt_ids) for a in fresh), sum(a.reused for a in fresh))
        self._partial += [a for a in plan if not a.final]
        started = []
        for r, (_, a, slot, request) in enumerate(entries):
            if not a.final:
                continue
            self._running[slot] = request
            self._admitted[slot] = next(self._order)
            self._unlanded[request] = 1
            held = self._held_back.pop(request, None)
            self._decoders[slot] = held.decoder if held else self._reply_decoder(self.tokenizer)
            started.append((r, slot, request))

        def land():
            first, first_scores = np.asarray(token), [np.asarray(a) for a in scores]
            if masks is not None:
                self._matchers.consume(first[:len(requests)], dest[:len(requests)].tolist())
            for r, slot, request in started:
                if self._running.get(slot) is request:  # not preempted or cancelled meanwhile
                    self._unlanded[request] -= 1
                    self._take(slot, request, [int(first[r])], still_active=None,
                               scores=[a[r][None] for a in first_scores])

        if masks is not None or not self.overlap:
            land()
        else:
            self._landing.append(land)

    def _span(self, longest: int) -> int:
        """Cache slots a chunk must read when the longest running row holds `longest`."""
        return min(self.capacity, max(128, 1 << (longest + self.steps_per_chunk - 1).bit_length()))

    def _grow(self) -> None:
        """Before a decode chunk: pages for each running request's next steps, oldest
        request first; where the pool has none left (after evicting cached prefixes),
        the newest running requests are preempted: their pages freed, they wait at the
        head of the queue and resume by prefilling their prompt and what they generated
        (vLLM's recompute). The oldest always fits: engine.check admits no request
        whose whole budget exceeds the pool."""
        for slot in sorted(self._running, key=self._admitted.__getitem__):
            if slot not in self._running:
                continue  # preempted for an older one
            request = self._running[slot]
            fed = len(request.prompt_ids) + len(request.ids) + self._unlanded[request] - 1
            need = min(len(request.prompt_ids) + request.max_tokens, fed + self.steps_per_chunk)
            while True:
                evicted = self.pool.grow(slot, need, self._idle_rows())
                if evicted is not None:
                    for b in evicted:
                        self.prefixes.forget(b)
                    break
                newest = max(self._running, key=self._admitted.__getitem__)
                self._preempt(newest)
                if newest == slot:
                    break

    def _idle_rows(self, also_busy: frozenset[int] = frozenset()):
        """The rows nothing running, being prefilled or in `also_busy` holds, least
        recently used first: those whose cached prefixes may be evicted. Lazy: sorted
        only where the pool must evict (most growth takes free pages, and 256 sorts of
        256 rows before each chunk cost 19 ms)."""
        busy = set(self._running) | {b for a in self._partial for b in a.rows} | also_busy
        yield from self.prefixes.by_age(b for b in range(self.n_slots) if b not in busy)

    def _preempt(self, slot: int) -> None:
        request = self._running.pop(slot)
        del self._admitted[slot]
        del self._unlanded[request]  # what the device computes for it meanwhile is dropped
        self._held_back[request] = HeldBack(self._decoders.pop(slot),
                                            self._matchers.take(slot) if self._matchers is not None else None)
        self._stopping.add(slot)
        self.pool.release(slot)
        self.prefixes.forget(slot)
        self.metrics.preempted()
        with self._cond:
            self._waiting.appendleft([request])

    def _table(self) -> jax.Array:
        """The pool's page table as the device's: a copy, since a transfer may read (or
        on the CPU alias) the host's array after the call that takes it is dispatched,
        while the host already changes the table for the next one."""
        return jnp.array(self.pool.table, copy=True)

    def _stop_slots(self) -> None:
        """The slots whose requests ended on the host stopped on the device, in one call
        (one per slot cost ~1 ms each, 256 of them when a wave of requests ends)."""
        if self._stopping:
            rows = np.zeros(self.n_slots, bool)
            rows[list(self._stopping)] = True
            self.slots = release(self.slots, jnp.asarray(rows))
            self._stopping.clear()

    def _decode(self) -> None:
        """A chunk of decode steps for the running requests. The chunk is dispatched
        first and the results still pending from before (the previous chunk, the
        admissions since) are taken while the device runs it: the host's work on a
        chunk (tokens to text, stop strings, streaming, retiring: ~20 ms for 256 rows
        on a 2-core CPU) overlaps the device's instead of following it. A row that
        ended in the previous chunk so runs one chunk more, its tokens dropped, unless
        its budget shows it is done. Rows held to a grammar step with the host
        (decode_stepped), once everything pending is taken."""
        stepped = bool(self._matchers)
        if stepped:
            self._land_all()
        if self.pool is not None:
            self._grow()
        if not any(r.max_tokens > len(r.ids) + self._unlanded[r] for r in self._running.values()):
            self._land_all()  # nothing left to run until the pending results say what ended
            return
        self._stop_slots()
        if self.pool is not None:
            # the grown, evicted and preempted rows' pages, before any step writes through them
            self.slots = self.slots.replace(cache=self.slots.cache.replace(pages=self._table()))
        running = dict(self._running)
        longest = max(len(r.prompt_ids) + len(r.ids) + self._unlanded[r] for r in running.values())
        logprobs = any(r.top_logprobs is not None for r in running.values())
        if stepped:
            self.slots, tokens, scores = decode_stepped(
                self.params, self.config, None, self.slots, self._matchers, self.steps_per_chunk, self.stop_ids,
                self._span(longest), TOP_LOGPROBS if logprobs else None)
            self._land_chunk(running, 0, tokens, scores, self.slots.active)
            return
        self.slots, tokens, scores, active = decode_chunk(self.params, self.config, self.slots, self.stop_ids,
                                                          self.steps_per_chunk, self._span(longest), logprobs)
        for request in running.values():
            self._unlanded[request] += self.steps_per_chunk
        earlier = list(self._landing)
        self._landing.clear()
        self._landing.append(partial(self._land_chunk, running, self.steps_per_chunk, tokens, scores, active))
        for land in earlier:
            land()
        if not self.overlap:
            self._land_all()  # this chunk's too: the host waits for the device

    def _land_chunk(self, running: dict[int, Request], counted: int, tokens, scores, active) -> None:
        """A decode chunk's results handed to the requests that ran it (`running`, slot
        -> request, when dispatched) and still run: one preempted, cancelled or ended
        since has its tokens dropped."""
        tokens, active = np.asarray(tokens), np.asarray(active)
        scores = None if scores is None else [np.asarray(a) for a in scores]
        for slot, request in running.items():
            if self._running.get(slot) is not request:
                continue
            self._unlanded[request] -= counted
            self._take(slot, request, tokens[slot].tolist(), still_active=bool(active[slot]),
                       scores=None if scores is None else [a[slot] for a in scores])

    def _land_all(self) -> None:
        """Every result still pending taken, oldest first."""
        while self._landing:
            self._landing.popleft()()

    def _take(self, slot: int, request: Request, tokens: list[int], still_active, scores=None) -> None:
        """Hand a slot's new tokens to its request; retire it if it has finished.
        scores: the tokens' log-probabilities [n], top ids and theirs [n, k] (numpy)."""
        fresh, reason = take_tokens(tokens, () if request.ignore_eos else self._stop_set,
                                    request.max_tokens - len(request.ids))
        now = time.perf_counter()
        if fresh:
            if request.delivered_at is None:
                self.metrics.first_token(now - request.submitted_at)
            else:
                self.metrics.tokens(len(fresh), (now - request.delivered_at) / len(fresh))
            request.delivered_at = now
        decoder, taken = self._decoders[slot], 0
        for piece in ([fresh] if not request.stop else [[t] for t in fresh]):
            if request.top_logprobs is not None and scores is not None:
                request.logprobs += token_entries(*(a[taken:taken + len(piece)] for a in scores),
                                                  request.top_logprobs)
            taken += len(piece)
            request.ids += piece
            request.text += decoder.push(piece)
            request.reasoning = decoder.reasoning
            if request.stop and self._cut_at_stop(request):
                reason = "stop"
                break
        if reason is None and still_active is False:
            reason = "length"  # the slot's cache row is full
        if reason is not None:
            request.text += "" if request.stop and reason == "stop" else decoder.flush()
            request.reasoning = decoder.reasoning
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
        if upto > request.emitted or len(request.reasoning) > request.reasoning_emitted:
            piece, request.emitted = request.text[request.emitted:upto], upto
            request.reasoning_emitted = len(request.reasoning)
            request.on_update(request, piece, None)

    def _retire(self, slot: int, reason: str) -> None:
        request = self._running.pop(slot)
        self._admitted.pop(slot, None)
        self._unlanded.pop(request, None)
        # The row holds every token sampled but the last (never fed back).
        self.prefixes.hold(slot, request.prompt_ids + request.ids[:-1])
        self._decoders.pop(slot, None)
        if self._matchers is not None:
            self._matchers.detach(slot)
        self._stopping.add(slot)
        if reason in ("cancelled", "error"):
            self._emit(request, final=True)
        self._end(request, reason)

    def _end(self, request: Request, reason: str) -> None:
        if self._held_back.pop(request, None) is not None and reason in ("cancelled", "error"):
            self._emit(request, final=True)  # preempted, it had streamed part of its text
        request.finish_reason = reason
        request.on_update(request, "", reason)
