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
from .tools import check_tools, history_message, parse_tool_calls
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
    logprobs: Optional[Any] = None  # chat: true/false; completions: how many top tokens
    top_logprobs: Optional[int] = None  # chat
    response_format: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Optional[Union[str, dict]] = None
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
        self.waiting_gauge = Gauge("jaxllm_queue_length", "requests waiting for a slot", registry=r)
        self.running_gauge = Gauge("jaxllm_running_requests", "requests holding a slot", registry=r)
        self.ttft = Histogram("jaxllm_time_to_first_token_seconds", "time to first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.itl = Histogram("jaxllm_inter_token_latency_seconds", "time between tokens",
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1), registry=r)

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


# -- the app ----------------------------------------------------------------------------

def _settings(body: SamplingFields) -> SamplerSettings:
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "best_of is not supported (n choices are all returned)", "best_of")
    # Refused, not ignored: a client asking for a schema or a tool call must not get
    # free text that it takes for one.
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise ApiError(400, "response_format other than text is not supported", "response_format")
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
               steps_per_chunk: int = 8, warmup: bool = True, api_key: Optional[str] = None,
               metrics_key: Optional[str] = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The ASGI app serving `model` under the name `model_id`; its engine starts
    (and compiles) when the app starts and stops with it. api_key: every /v1/ request
    needs `Authorization: Bearer api_key`; metrics_key: likewise /metrics; bodies
    over max_body_bytes get 413 (access.py)."""
    metrics = PrometheusMetrics()
    engine = Engine(model.params, model.config, model.tokenizer, n_slots=max_batch,
                    max_context=max_context, steps_per_chunk=steps_per_chunk, metrics=metrics)
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

    def make_requests(body: SamplingFields, prompts: list[list[int]], top_logprobs=None) -> list[Request]:
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
            requests += [Request(ids, max_tokens, settings, (seed + j) % (1 << 31), stop, top_logprobs)
                         for j in range(body.n)]
        return requests

    async def run(requests: list[Request], n: int):
        """Submit (n choices of a prompt together); yield (index, text, finish_reason,
        tokens so far) as the engine produces them."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        for index, r in enumerate(requests):
            r.on_update = (lambda i: lambda _r, text, reason: loop.call_soon_threadsafe(
                queue.put_nowait, (i, text, reason, len(_r.ids))))(index)
        for first in range(0, len(requests), n):
            metrics.prompt_tokens.inc(len(requests[first].prompt_ids))
            engine.submit_group(requests[first:first + n])
        unfinished = len(requests)
        try:
            while unfinished:
                index, text, reason, n = await queue.get()
                unfinished -= reason is not None
                yield index, text, reason, n
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
        """Stream chunk(index, text, finish_reason, tokens start..stop) events, or one
        final(texts, requests) body."""
        ident = f"{'chatcmpl' if endpoint.endswith('chat/completions') else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "created": int(time.time()), "model": model_id}
        if not body.stream:
            texts = [""] * len(requests)
            async for index, text, _, _ in run(requests, body.n):
                texts[index] += text
            if error := failure(requests):
                return reply(endpoint, error.status, error.body())
            return reply(endpoint, 200, {**head, **final(texts, requests), "usage": usage(requests, body.n)})

        async def events():
            sse = lambda payload: f"data: {json.dumps(payload)}\n\n"
            sent = [0] * len(requests)  # tokens whose log-probabilities went out
            for index in range(len(requests)):
                if (opening := chunk(index, None, None, 0, 0)) is not None:
                    yield sse({**head, **opening})
            async for index, text, reason, n in run(requests, body.n):
                if reason == "error":
                    yield sse(failure(requests).body())
                    break
                if (text or reason) and (payload := chunk(index, text, reason, sent[index], n)) is not None:
                    yield sse({**head, **payload})
                    sent[index] = n
            else:
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**head, **chunk(None, None, None, 0, 0), "choices": [],
                               "usage": usage(requests, body.n)})
            yield "data: [DONE]\n\n"

        metrics.requests.labels(endpoint, "200").inc()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def chat_tools(body: ChatBody) -> Optional[list]:
        """The tools the template is given and the reply is parsed for: tool_choice
        "auto" (the default with tools) or "none" (no tools). "required" and a named
        function need decoding constrained to a call, which is not built yet."""
        choice = body.tool_choice if body.tool_choice is not None else "auto"
        if choice == "none" or (not body.tools and choice == "auto"):
            return None
        if not body.tools:
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        if choice != "auto":
            raise ApiError(400, "tool_choice 'required' or a named function needs decoding constrained to "
                           "a call, which jaxllm does not do yet: use 'auto' or 'none'", "tool_choice")
        try:
            tools = check_tools(body.tools)
        except ValueError as e:
            raise ApiError(400, str(e), "tools") from None
        if "tools" not in (model.chat_template or ""):
            raise ApiError(400, "this model's chat template does not take tools", "tools")
        return tools

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        check_model(body.model)
        tools = chat_tools(body)
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else "".join(
                part.text or "" for part in m.content if part.type == "text")
            messages.append(history_message({**(m.model_extra or {}), "role": m.role, "content": content or ""}))
        try:
            text = model.apply_chat_template(messages, tools=tools)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "messages") from None
        requests = make_requests(body, [model.tokenizer.encode(text)], _top_logprobs(body, chat=True))

        def message(r: Request, text: str) -> tuple[dict, str]:
            """The reply as a message (content, tool calls) and its finish reason."""
            content, calls = parse_tool_calls(text) if tools else (text, [])
            if not calls:
                return {"content": text}, r.finish_reason
            return {"content": content, "tool_calls": calls}, "tool_calls" if r.finish_reason == "stop" else r.finish_reason

        def chunk(index, text, reason, start, stop):
            if index is None:
                return {"object": "chat.completion.chunk"}
            r = requests[index]
            if text is None and reason is None:
                delta = {"role": "assistant", "content": ""}
            elif tools and reason is None:
                return None  # with tools the reply goes out whole, once it can be parsed
            elif tools:
                whole, reason = message(r, r.text)
                delta = {"content": whole["content"]} if whole["content"] else {}
                if "tool_calls" in whole:
                    delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(whole["tool_calls"])]
                start = 0
            else:
                delta = {"content": text} if text else {}
            logprobs = chat_logprobs(r, start, stop) if stop > start else None
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
        requests = make_requests(body, ids, top)
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

        def chunk(index, text, reason, start, stop):
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
            return {"object": "text_completion", "choices": [
                {"index": index, "text": text, "logprobs": scored, "finish_reason": reason}]}

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
                choices.append({"index": i, "text": echoes[i] + t, "logprobs": scored,
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
