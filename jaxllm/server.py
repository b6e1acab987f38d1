"""`jaxllm serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with
`"stream": true` as server-sent events), GET /v1/models, GET /health and GET
/metrics (Prometheus). Every request becomes one or more `batching.Request`s that
share the engine's slots; errors come back as OpenAI-style bodies
{"error": {"message", "type", "param", "code"}} with a 4xx status. An API key, a
metrics key and a body size limit are checked in front of the app (access.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import sys
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Optional, Union

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field

from .access import MAX_BODY_BYTES, Guard
from .batching import Engine, Metrics, Request
from .chat import ChatTemplateError
from .generate import ContextLengthError
from .loading.models import Model
from .scoring import prompt_logprobs
from .grammar import Grammar
from .tools import CallStream, check_tools, forced_call, history_message, parse_tool_calls
from .sampling import SamplerSettings


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


# -- request bodies ---------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share. top_k, min_p and repeat_penalty are
    llama.cpp-style extensions; unknown fields are ignored, as OpenAI's own
    server does for fields it has retired."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    n: int = 1
    best_of: Optional[int] = None
    ignore_eos: bool = False  # vLLM's: run to max_tokens (serving benchmarks)
    logprobs: Optional[Any] = None  # chat: true/false; completions: how many top tokens
    top_logprobs: Optional[int] = None  # chat
    response_format: Optional[dict] = None
    # Constrained output beyond response_format: vLLM's structured_outputs {json |
    # regex | choice | grammar}, llama-server's grammar (GBNF) and json_schema
    structured_outputs: Optional[dict] = None
    grammar: Optional[str] = None
    json_schema: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Optional[Union[str, dict]] = None
    parallel_tool_calls: bool = True
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Optional[Union[str, list[ContentPart]]] = None


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionBody(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False


# -- metrics ----------------------------------------------------------------------------

class PrometheusMetrics(Metrics):
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("jaxllm_requests", "HTTP requests served", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("jaxllm_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("jaxllm_generated_tokens", "tokens generated", registry=r)
        self.reused_tokens = Counter("jaxllm_prefix_reused_tokens",
                                     "prompt tokens copied from a cached prefix, not computed", registry=r)
        self.waiting_gauge = Gauge("jaxllm_queue_length", "requests waiting for a slot", registry=r)
        self.running_gauge = Gauge("jaxllm_running_requests", "requests holding a slot", registry=r)
        self.preemptions = Counter("jaxllm_preemptions", "running requests preempted for KV pages "
                                   "(they resume by recomputing what they had)", registry=r)
        self.pages_gauge = Gauge("jaxllm_kv_pages", "pages of the paged KV cache pool (--kv-pages), by use: "
                                 "running (held by running requests), cached (prefixes of ended requests, "
                                 "evicted when needed), free", ["use"], registry=r)
        self.ttft = Histogram("jaxllm_time_to_first_token_seconds", "time to first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.itl = Histogram("jaxllm_inter_token_latency_seconds", "time between tokens",
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1), registry=r)

    def prefill(self, prompt_tokens: int, reused_tokens: int) -> None:
        self.reused_tokens.inc(reused_tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generated_tokens.inc()

    def tokens(self, count: int, seconds_each: float) -> None:
        for _ in range(count):
            self.itl.observe(seconds_each)
        self.generated_tokens.inc(count)

    def occupancy(self, waiting: int, running: int) -> None:
        self.waiting_gauge.set(waiting)
        self.running_gauge.set(running)

    def preempted(self) -> None:
        self.preemptions.inc()

    def pages(self, use: dict[str, int]) -> None:
        for name, count in use.items():
            self.pages_gauge.labels(name).set(count)


# -- the app ----------------------------------------------------------------------------

def _settings(body: SamplingFields) -> SamplerSettings:
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "best_of is not supported (n choices are all returned)", "best_of")
    penalty = body.repeat_penalty if body.repeat_penalty is not None else body.repetition_penalty
    try:
        penalties = dict(repetition_penalty=1.0 if penalty is None else penalty,
                         presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
        if body.temperature == 0:
            return SamplerSettings.greedy(**penalties)
        return SamplerSettings(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                               min_p=body.min_p, **penalties)
    except ValueError as e:
        raise ApiError(400, str(e), str(e).split("=")[0].split()[-1]) from None


MAX_TOP_LOGPROBS = 20


def _output_format(body: SamplingFields) -> Optional[tuple[str, str, Any]]:
    """What the output is held to, as (field, kind, value) with kind json_schema,
    regex, choice or grammar; None for free text. One such field per request."""
    asked = []
    rf = body.response_format
    if rf is not None:
        kind = rf.get("type", "text") if isinstance(rf, dict) else None
        if kind == "json_object":
            asked.append(("response_format", "json_schema", {"type": "object"}))
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ApiError(400, "response_format json_schema needs json_schema.schema (an object)",
                               "response_format")
            asked.append(("response_format", "json_schema", spec["schema"]))
        elif kind != "text":
            raise ApiError(400, "response_format.type must be text, json_object or json_schema",
                           "response_format")
    so = body.structured_outputs
    if so is not None:
        kinds = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
        given = [k for k in so if so[k] is not None] if isinstance(so, dict) else []
        if len(given) != 1 or given[0] not in kinds:
            raise ApiError(400, "structured_outputs takes one of json, regex, choice or grammar",
                           "structured_outputs")
        asked.append(("structured_outputs", kinds[given[0]], so[given[0]]))
    if body.grammar is not None:
        asked.append(("grammar", "grammar", body.grammar))
    if body.json_schema is not None:
        asked.append(("json_schema", "json_schema", body.json_schema))
    if len(asked) > 1:
        raise ApiError(400, f"the output can follow one format; {', '.join(a[0] for a in asked)} each give one",
                       asked[1][0])
    return asked[0] if asked else None


def _top_logprobs(body: SamplingFields, chat: bool) -> Optional[int]:
    """How many top tokens each token's log-probability comes with; None: none asked.
    Chat: logprobs true/false and top_logprobs 0-20; completions: logprobs 0-20."""
    if chat:
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            raise ApiError(400, "logprobs must be true or false", "logprobs")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        k, name = (body.top_logprobs or 0) if body.logprobs else None, "top_logprobs"
    else:
        k, name = body.logprobs, "logprobs"
        if k is True or k is False:
            raise ApiError(400, "logprobs must be an integer in [0, 20] on completions", "logprobs")
    if k is not None and not (isinstance(k, int) and 0 <= k <= MAX_TOP_LOGPROBS):
        raise ApiError(400, f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}]", name)
    return k


def _stops(body: SamplingFields) -> tuple[str, ...]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop takes up to 4 non-empty strings", "stop")
    return tuple(stop)


def create_app(model: Model, model_id: str, *, max_batch: int = 8, max_context: Optional[int] = None,
               steps_per_chunk: int = 8, prefill_tokens: int = 8192, reuse_prefixes: bool = True,
               warm_prompt_tokens: int = 0, warmup: bool = True, api_key: Optional[str] = None,
               metrics_key: Optional[str] = None, max_body_bytes: int = MAX_BODY_BYTES,
               kv_pages: Optional[int] = None, page_size: int = 64) -> FastAPI:
    """The ASGI app serving `model` under the name `model_id`; its engine starts
    (and compiles) when the app starts and stops with it (batching.Engine says what
    the engine's options do). api_key: every /v1/ request needs `Authorization:
    Bearer api_key`; metrics_key: likewise /metrics; bodies over max_body_bytes get
    413 (access.py)."""
    metrics = PrometheusMetrics()
    engine = Engine(model.params, model.config, model.tokenizer, n_slots=max_batch,
                    max_context=max_context, steps_per_chunk=steps_per_chunk, prefill_tokens=prefill_tokens,
                    reuse_prefixes=reuse_prefixes, warm_prompt_tokens=warm_prompt_tokens, metrics=metrics,
                    kv_pages=kv_pages, page_size=page_size)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_app):
        engine.start(warmup=warmup)
        yield
        engine.shutdown()

    app = FastAPI(title="jaxllm", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(Guard, api_key=api_key, metrics_key=metrics_key, max_body_bytes=max_body_bytes)

    def reply(endpoint: str, status: int, content: dict) -> JSONResponse:
        metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse(content, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: HttpRequest, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = ("the body is not valid JSON" if first.get("type") == "json_invalid"
                   else f"{where or 'body'}: {first.get('msg', 'invalid request')}")
        return reply(request.url.path, 400, ApiError(400, message, where).body())

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, exc: ApiError):
        return reply(request.url.path, exc.status, exc.body())

    def check_model(name: str) -> None:
        if name != model_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_id!r}",
                           "model", "model_not_found")

    def output_grammar(body: SamplingFields, forced_tools=None) -> Optional[Grammar]:
        """The request's output format (or, with forced_tools = (tools, name or None),
        its forced tool call) compiled for the model; 400 for one that does not compile."""
        asked = _output_format(body)
        if asked is not None and forced_tools is not None:
            raise ApiError(400, "a forced tool call and an output format cannot both hold", "tool_choice")
        if asked is None and forced_tools is None:
            return None
        field = "tool_choice" if asked is None else asked[0]
        try:
            grammars = engine.grammars()
            if forced_tools is not None:
                return forced_call(grammars, *forced_tools, model.chat_template or "", body.parallel_tool_calls)
            _, kind, value = asked
            return getattr(grammars, kind)(value)
        except ValueError as e:
            raise ApiError(400, str(e), field) from None

    def make_requests(body: SamplingFields, prompts: list[list[int]], top_logprobs=None,
                      grammar: Optional[Grammar] = None) -> list[Request]:
        """body.n requests per prompt, choice p * n + j drawing with seed + j: the n
        choices of a prompt share its prefill (Engine.submit_group)."""
        settings, stop = _settings(body), _stops(body)
        if not 1 <= body.n <= engine.n_slots:
            raise ApiError(400, f"n must be between 1 and {engine.n_slots} (the server's --max-batch)", "n")
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        requests = []
        for ids in prompts:
            max_tokens = body.max_completion_tokens or body.max_tokens
            if max_tokens is None:
                max_tokens = engine.capacity - len(ids)
            try:
                engine.check(ids, max_tokens)
            except ContextLengthError as e:
                raise ApiError(400, str(e), "max_tokens", "context_length_exceeded") from None
            except ValueError as e:
                raise ApiError(400, str(e), "max_tokens" if "max_tokens" in str(e) else "prompt") from None
            requests += [Request(ids, max_tokens, settings, (seed + j) % (1 << 31), stop, top_logprobs, grammar,
                                 ignore_eos=body.ignore_eos)
                         for j in range(body.n)]
        return requests

    async def run(requests: list[Request], n: int):
        """Submit (n choices of a prompt together); yield (index, text, finish_reason,
        tokens so far, characters of reasoning so far) as the engine produces them."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        for index, r in enumerate(requests):
            r.on_update = (lambda i: lambda _r, text, reason: loop.call_soon_threadsafe(
                queue.put_nowait, (i, text, reason, len(_r.ids), _r.reasoning_emitted)))(index)
        for first in range(0, len(requests), n):
            metrics.prompt_tokens.inc(len(requests[first].prompt_ids))
            engine.submit_group(requests[first:first + n])
        unfinished = len(requests)
        try:
            while unfinished:
                index, text, reason, n, thought = await queue.get()
                unfinished -= reason is not None
                yield index, text, reason, n, thought
        finally:  # the client went away (or we failed): free the slots
            for r in requests:
                if r.finish_reason is None:
                    engine.cancel(r)

    def usage(requests: list[Request], n: int) -> dict:
        prompt = sum(len(r.prompt_ids) for r in requests[::n])  # each prompt once, as OpenAI counts
        completion = sum(len(r.ids) for r in requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def failure(requests: list[Request]) -> Optional[ApiError]:
        bad = next((r for r in requests if r.finish_reason == "error"), None)
        return bad and ApiError(500, f"generation failed: {bad.error}", kind="server_error")

    def token_text(i: int) -> str:
        return model.tokenizer.decode([i], skip_special=False)

    def entry(i: int, logprob: float) -> dict:
        text = token_text(i)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def chat_logprobs(r: Request, start: int, stop: int) -> Optional[dict]:
        """OpenAI's chat logprobs for tokens start..stop of r."""
        if r.top_logprobs is None:
            return None
        return {"content": [{**entry(i, lp), "top_logprobs": [entry(j, t) for j, t in top]}
                            for i, (lp, top) in zip(r.ids[start:stop], r.logprobs[start:stop])],
                "refusal": None}

    def completion_logprobs(ids, scored, offset: int) -> dict:
        """OpenAI's completions logprobs for tokens ids with (logprob, top) each (None
        for a prompt's first token), their text starting at character `offset`."""
        tokens = [token_text(i) for i in ids]
        offsets = [offset + sum(map(len, tokens[:n])) for n in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [None if s is None else s[0] for s in scored],
                "top_logprobs": [None if s is None else {token_text(j): t for j, t in s[1]} for s in scored],
                "text_offset": offsets}

    async def respond(endpoint: str, body: SamplingFields, requests: list[Request], chunk, final):
        """Stream chunk(index, text, finish_reason, tokens start..stop, new reasoning)
        events, or one final(texts, requests) body."""
        ident = f"{'chatcmpl' if endpoint.endswith('chat/completions') else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "created": int(time.time()), "model": model_id}
        if not body.stream:
            texts = [""] * len(requests)
            async for index, text, _, _, _ in run(requests, body.n):
                texts[index] += text
            if error := failure(requests):
                return reply(endpoint, error.status, error.body())
            return reply(endpoint, 200, {**head, **final(texts, requests), "usage": usage(requests, body.n)})

        async def events():
            sse = lambda payload: f"data: {json.dumps(payload)}\n\n"
            sent = [0] * len(requests)  # tokens whose log-probabilities went out
            thought = [0] * len(requests)  # characters of reasoning that went out
            for index in range(len(requests)):
                if (opening := chunk(index, None, None, 0, 0)) is not None:
                    yield sse({**head, **opening})
            async for index, text, reason, n, upto in run(requests, body.n):
                if reason == "error":
                    yield sse(failure(requests).body())
                    break
                thinking = requests[index].reasoning[thought[index]:upto]
                if (text or reason or thinking) and (
                        payload := chunk(index, text, reason, sent[index], n, thinking)) is not None:
                    yield sse({**head, **payload})
                    sent[index], thought[index] = n, upto
            else:
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**head, **chunk(None, None, None, 0, 0), "choices": [],
                               "usage": usage(requests, body.n)})
            yield "data: [DONE]\n\n"

        metrics.requests.labels(endpoint, "200").inc()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def chat_tools(body: ChatBody) -> tuple[Optional[list], Optional[tuple]]:
        """(the tools the template is given and the reply is parsed for, or None; with a
        forced call, (tools, the function's name or None) for its grammar). tool_choice
        "auto" (the default with tools) lets the model choose; "none" gives it no
        tools; "required" or {"type": "function", "function": {"name": ...}} constrains
        the reply to calls (of that function)."""
        choice = body.tool_choice if body.tool_choice is not None else "auto"
        if choice == "none" or (not body.tools and choice == "auto"):
            return None, None
        if not body.tools:
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if not isinstance(name, str):
                raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                               '"function": {"name": ...}}', "tool_choice")
        elif choice not in ("auto", "required"):
            raise ApiError(400, 'tool_choice must be "none", "auto", "required" or a named function', "tool_choice")
        try:
            tools = check_tools(body.tools)
        except ValueError as e:
            raise ApiError(400, str(e), "tools") from None
        if "tools" not in (model.chat_template or ""):
            raise ApiError(400, "this model's chat template does not take tools", "tools")
        forced = None if choice == "auto" else (tools, name if isinstance(choice, dict) else None)
        return tools, forced

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        check_model(body.model)
        tools, forced = chat_tools(body)
        grammar = output_grammar(body, forced)
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else "".join(
                part.text or "" for part in m.content if part.type == "text")
            messages.append(history_message({**(m.model_extra or {}), "role": m.role, "content": content or ""}))
        try:
            text = model.apply_chat_template(messages, tools=tools)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "messages") from None
        requests = make_requests(body, [model.tokenizer.encode(text)], _top_logprobs(body, chat=True), grammar)

        def message(r: Request, text: str) -> tuple[dict, str]:
            """The reply as a message (reasoning, content, tool calls) and its finish reason."""
            content, calls = parse_tool_calls(text) if tools else (text, [])
            thinking = {"reasoning_content": r.reasoning} if r.reasoning else {}
            if not calls:
                return {**thinking, "content": text}, r.finish_reason
            return ({**thinking, "content": content, "tool_calls": calls},
                    "tool_calls" if r.finish_reason == "stop" else r.finish_reason)

        streams = [CallStream() for _ in requests] if tools else None

        def chunk(index, text, reason, start, stop, thinking=""):
            if index is None:
                return {"object": "chat.completion.chunk"}
            if text is None and reason is None:
                delta = {"role": "assistant", "content": ""}
            elif tools:  # content and calls as they can be told apart (tools.CallStream)
                delta = streams[index].push(text or "")
                if reason is not None:
                    last, made_calls = streams[index].finish()
                    for key, value in last.items():
                        delta[key] = delta.get(key, type(value)()) + value
                    reason = "tool_calls" if made_calls and reason == "stop" else reason
                elif not delta and not thinking:
                    return None  # nothing to say yet: these tokens' log-probabilities go with the next
            else:
                delta = {"content": text} if text else {}
            if thinking:  # a harmony reply's analysis channel (harmony.py)
                delta = {"reasoning_content": thinking, **delta}
            logprobs = chat_logprobs(requests[index], start, stop) if stop > start else None
            return {"object": "chat.completion.chunk", "choices": [
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

        def final(texts, requests):
            choices = []
            for i, (t, r) in enumerate(zip(texts, requests)):
                whole, reason = message(r, t)
                choices.append({"index": i, "message": {"role": "assistant", **whole},
                                "logprobs": chat_logprobs(r, 0, len(r.ids)), "finish_reason": reason})
            return {"object": "chat.completion", "choices": choices}

        return await respond("/v1/chat/completions", body, requests, chunk, final)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        check_model(body.model)
        if body.tools:
            raise ApiError(400, "tools are for chat completions", "tools")
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "the prompt is empty", "prompt")
        ids = [p if isinstance(p, list) else model.tokenizer.encode(p) for p in prompt]
        top = _top_logprobs(body, chat=False)
        requests = make_requests(body, ids, top, output_grammar(body))
        echoes = [model.tokenizer.decode(i) if body.echo else "" for i in ids for _ in range(body.n)]
        # echo with logprobs: the prompt's tokens scored by one forward pass (the first has none)
        prompt_scores = [[None] + await asyncio.to_thread(prompt_logprobs, model.params, model.config, i, top)
                         for i in ids] if body.echo and top is not None else None
        ids = [i for i in ids for _ in range(body.n)]  # by choice
        prompt_scores = prompt_scores and [p for p in prompt_scores for _ in range(body.n)]
        offsets = [0] * len(requests)  # characters of each choice's text so far

        def logprobs(index, start, stop):
            r = requests[index]
            return completion_logprobs(r.ids[start:stop], r.logprobs[start:stop], offsets[index])

        def chunk(index, text, reason, start, stop, thinking=""):
            if index is None:
                return {"object": "text_completion"}
            scored = None
            if text is None and reason is None:
                if not body.echo:
                    return None
                text = echoes[index]
                if prompt_scores is not None:
                    scored = completion_logprobs(ids[index], prompt_scores[index], 0)
            elif top is not None:
                scored = logprobs(index, start, stop)
            offsets[index] += len(text or "")
            thought = {"reasoning_content": thinking} if thinking else {}  # a harmony reply's (harmony.py)
            return {"object": "text_completion", "choices": [
                {"index": index, "text": text or "", **thought, "logprobs": scored, "finish_reason": reason}]}

        def final(texts, requests):
            choices = []
            for i, (t, r) in enumerate(zip(texts, requests)):
                scored = None
                if top is not None:
                    offsets[i] = len(echoes[i])
                    scored = logprobs(i, 0, len(r.ids))
                    if prompt_scores is not None:
                        echoed = completion_logprobs(ids[i], prompt_scores[i], 0)
                        scored = {key: echoed[key] + scored[key] for key in scored}
                thought = {"reasoning_content": r.reasoning} if r.reasoning else {}
                choices.append({"index": i, "text": echoes[i] + t, **thought, "logprobs": scored,
                                "finish_reason": r.finish_reason})
            return {"object": "text_completion", "choices": choices}

        return await respond("/v1/completions", body, requests, chunk, final)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": model_id, "object": "model", "created": started, "owned_by": "jaxllm",
             "context_length": engine.capacity}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "slots": engine.n_slots,
                "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def prometheus():
        metrics.occupancy(engine.waiting, engine.running)
        if engine.pool is not None:
            metrics.pages(engine.page_use())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model: Model, model_id: str, host: str = "127.0.0.1", port: int = 8080, **kw) -> None:
    import uvicorn  # noqa: PLC0415

    if not kw.get("api_key") and not loopback(host):
        print(f"jaxllm: warning: serving on {host} without an API key: anyone who reaches this "
              "address can use the model (--api-key or JAXLLM_API_KEY)", file=sys.stderr)

    uvicorn.run(create_app(model, model_id, **kw), host=host, port=port, log_level="info")
