"""`jaxllm serve`: the OpenAI-compatible server, over loopback, with the official
`openai` client and raw HTTP; and the continuous-batching engine underneath."""

import dataclasses
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
import uvicorn
from conftest import tiny
from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI
from prometheus_client.parser import text_string_to_metric_families
from tiny_gguf import write_gguf

import jaxllm
from jaxllm.batching import Engine, Request
from jaxllm.sampling import RowSampling, filter_logits
from jaxllm.server import create_app

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CONTEXT = 96  # the server's slots
ENGINE_CONTEXT = 320  # the engine tests': rows cross the 128- and 256-slot attention spans


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # Big enough that a decode step costs more than the Python around it, so the
    # batching speed-up is measured on compute, not on overhead.
    c = tiny(vocab_size=300, d_model=512, n_heads=8, n_kv_heads=2, d_ff=1536, n_layers=4,
             max_seq_len=ENGINE_CONTEXT)
    params = jaxllm.init_params(c, jax.random.PRNGKey(1))
    path = write_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", c, params,
                      extra={"tokenizer.chat_template": TEMPLATE})
    return jaxllm.load(str(path))


def running(app):
    """Serve `app` on a free loopback port in a thread: yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield port
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, "tiny", max_batch=8, max_context=CONTEXT, steps_per_chunk=4, warm_prompt_tokens=32)
    for port in running(app):
        yield port, app


KEY, METRICS_KEY = "sk-jaxllm-test", "metrics-test"


@pytest.fixture(scope="module")
def guarded(model):
    """A server with an API key, a metrics key and a 4 kB body limit."""
    app = create_app(model, "tiny", max_batch=8, max_context=CONTEXT, steps_per_chunk=4, api_key=KEY,
                     metrics_key=METRICS_KEY, max_body_bytes=4096)
    yield from running(app)


@pytest.fixture
def client(server):
    return OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key="unused", max_retries=0)


def raw(port, method, path, body=None, content_type="application/json", headers=(), chunked=False):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
    if chunked:  # no Content-Length: the body arrives in pieces
        data = iter([data.encode()[i:i + 1000] for i in range(0, len(data), 1000)])
    conn.request(method, path, body=data, headers={"Content-Type": content_type, **dict(headers)},
                 encode_chunked=chunked)
    response = conn.getresponse()
    payload = response.read().decode()
    conn.close()
    return response.status, payload


def expected(model, prompt_ids, max_tokens):
    """What the library's own batch-1 greedy generate() gives."""
    out = jaxllm.generate(model.params, model.config, [prompt_ids], max_new_tokens=max_tokens,
                          settings=jaxllm.SamplerSettings.greedy())
    return out.tokens[0], out.stop_reasons[0]


# -- the engine, without HTTP ------------------------------------------------------------

def test_row_sampling_matches_the_static_filter():
    """One filter for both kinds of settings: per-row arrays give each row what its
    static settings give it (top-k ranks k candidates there, sorts the vocabulary here)."""
    rng = np.random.default_rng(0)
    logits = jax.numpy.asarray(rng.normal(size=(5, 300)) * 3, jax.numpy.float32)
    settings = [jaxllm.SamplerSettings(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05),
                jaxllm.SamplerSettings(temperature=1.3, top_k=0, top_p=0.5, min_p=0.0),
                jaxllm.SamplerSettings(temperature=1.0, top_k=7, top_p=1.0, min_p=0.0),
                jaxllm.SamplerSettings(temperature=0.5, top_k=0, top_p=1.0, min_p=0.2),
                jaxllm.SamplerSettings(temperature=2.0, top_k=1000, top_p=0.99, min_p=0.0)]
    rows = filter_logits(logits, RowSampling.from_settings(settings))
    for b, s in enumerate(settings):
        np.testing.assert_allclose(rows[b], filter_logits(logits[b:b + 1], s)[0], rtol=1e-6)


def collect(engine, prompts, max_tokens, settings=jaxllm.SamplerSettings.greedy(), stop=(), seeds=None):
    finished = threading.Semaphore(0)
    requests = [Request(list(p), max_tokens, settings, seed=(seeds or [0] * len(prompts))[i],
                        stop=stop, on_update=lambda r, text, reason: reason and finished.release())
                for i, p in enumerate(prompts)]
    for r in requests:
        engine.submit(r)
    for _ in requests:
        assert finished.acquire(timeout=120)
    return requests


@pytest.fixture(scope="module")
def engine(model):
    e = Engine(model.params, model.config, model.tokenizer, n_slots=3, max_context=ENGINE_CONTEXT,
               steps_per_chunk=4).start()
    yield e
    e.shutdown()


def test_engine_more_requests_than_slots_match_generate(engine, model):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 300, n).tolist() for n in (1, 5, 117, 9, 250, 2, 12)]
    requests = collect(engine, prompts, 16)
    for p, r in zip(prompts, requests):
        ids, reason = expected(model, p, 16)
        assert r.ids == ids and r.finish_reason == reason
        assert r.text == model.tokenizer.decode(ids)
    assert engine.running == 0 and engine.waiting == 0


def test_engine_sampling_is_per_request(engine):
    """A request's sampled tokens depend on its seed, not on who shares the batch."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 300, 6).tolist() for _ in range(3)]
    hot = jaxllm.SamplerSettings(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    together = collect(engine, prompts, 12, hot, seeds=[7, 8, 9])
    alone = collect(engine, prompts[1:2], 12, hot, seeds=[8])
    assert together[1].ids == alone[0].ids
    assert len({tuple(r.ids) for r in together}) == 3


def test_engine_stop_strings_and_cancel(engine, model):
    prompt = [5, 6, 7, 8]
    full = collect(engine, [prompt], 24)[0]
    assert len(full.text) > 4
    stop = full.text[3:5]
    cut = collect(engine, [prompt], 24, stop=(stop,))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    # A cancelled request ends at a chunk boundary and frees its slot.
    ended = threading.Event()
    r = Request(prompt, ENGINE_CONTEXT - len(prompt), on_update=lambda r, t, reason: reason and ended.set())
    engine.submit(r)
    engine.cancel(r)
    assert ended.wait(60) and r.finish_reason == "cancelled"
    deadline = time.time() + 30
    while engine.running:
        assert time.time() < deadline
        time.sleep(0.01)
    assert collect(engine, [prompt], 24)[0].ids == full.ids


def test_engine_ignore_eos_runs_to_the_budget(model):
    """A request with ignore_eos (serving benchmarks') passes the stop id that ends
    the same request without it, and goes on with the tokens `generate` gives."""
    prompt = [5, 6, 7, 8]
    ids, _ = expected(model, prompt, 12)
    config = dataclasses.replace(model.config, eos_token_ids=(ids[3],))
    e = Engine(model.params, config, model.tokenizer, n_slots=2, max_context=64, steps_per_chunk=4).start()
    try:
        done = threading.Semaphore(0)
        plain, through = (Request(prompt, 12, ignore_eos=flag, on_update=lambda r, t, reason: reason and done.release())
                          for flag in (False, True))
        e.submit(plain)
        e.submit(through)
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        e.shutdown()
    first = ids.index(ids[3])
    assert plain.ids == ids[:first] and plain.finish_reason == "stop"
    assert through.ids == ids and through.finish_reason == "length"


def test_engine_rejects_what_cannot_run(engine):
    with pytest.raises(jaxllm.ContextLengthError, match="exceeds the context"):
        engine.check([1] * 310, 11)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.check([1], 0)
    with pytest.raises(ValueError, match="token ids"):
        engine.check([1, 999], 4)


# -- over HTTP ---------------------------------------------------------------------------

def test_chat_completion_and_stream_agree(client, model):
    messages = [{"role": "user", "content": "Hello there"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                           temperature=0, seed=3)
    prompt_ids = model.tokenizer.encode(model.apply_chat_template(messages))
    ids, reason = expected(model, prompt_ids, 20)
    choice = plain.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == model.tokenizer.decode(ids)
    assert choice.finish_reason == reason
    assert plain.usage.prompt_tokens == len(prompt_ids)
    assert plain.usage.completion_tokens == len(ids)
    assert plain.usage.total_tokens == len(prompt_ids) + len(ids)

    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                            temperature=0, seed=3, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_completions_with_stop_and_seeded_sampling(client, model):
    prompt = "The cat sat"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    text = full.choices[0].text
    ids, _ = expected(model, model.tokenizer.encode(prompt), 24)
    assert text == model.tokenizer.decode(ids)
    stop = text[4:6]
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=[stop], stream=True))
    assert streamed == cut.choices[0].text
    hot = dict(model="tiny", prompt=prompt, max_tokens=16, temperature=1.2, seed=11)
    assert client.completions.create(**hot).choices[0].text == client.completions.create(**hot).choices[0].text
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_concurrent_requests_match_alone_and_batch_faster(client, server, model):
    rng = np.random.default_rng(3)
    lengths = rng.integers(2, 30, 8)
    # Four sets of prompts of the same lengths, none a prefix of another's: the timed
    # passes run on shapes compiled before (the server warms prompts up to 32 tokens,
    # the warm-up passes the rest) and reuse no cached prefix.
    warm_alone, alone_prompts, warm_together, prompts = (
        [rng.integers(3, 300, int(n)).tolist() for n in lengths] for _ in range(4))
    ask = lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=48, temperature=0)
    [ask(p) for p in warm_alone]
    start = time.perf_counter()
    alone = [ask(p) for p in alone_prompts]
    sequential = time.perf_counter() - start
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(ask, warm_together))
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    concurrent = time.perf_counter() - start
    for p, t in zip(prompts, together):
        ids, _ = expected(model, p, 48)
        assert t.choices[0].text == model.tokenizer.decode(ids)
        assert t.usage.completion_tokens == len(ids)
    tokens = sum(a.usage.completion_tokens for a in alone)
    ratio = sequential / concurrent
    print(f"\n8 requests, {tokens} tokens: sequential {sequential:.2f}s, concurrent {concurrent:.2f}s, "
          f"throughput ratio {ratio:.2f}x")
    assert ratio >= 3.0


@pytest.mark.parametrize("body, status, words", [
    ('{"model": "tiny", "prompt": "hi"', 400, "not valid JSON"),
    ({"model": "gpt-7", "prompt": "hi"}, 404, "does not exist"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 500}, 400, "exceeds the context"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "n": 0}, 400, "n must be"),
    ({"model": "tiny", "prompt": "hi", "n": 9}, 400, "n must be"),
    ({"model": "tiny", "prompt": "hi", "n": 2, "best_of": 3}, 400, "best_of"),
    ({"model": "tiny", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}},
     400, "response_format"),
    ({"model": "tiny", "prompt": "hi", "response_format": {"type": "json_schema"}}, 400, "json_schema.schema"),
    ({"model": "tiny", "prompt": "hi", "response_format": {"type": "json_object"}, "grammar": "root ::= \"a\""},
     400, "one format"),
    ({"model": "tiny", "prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["a"]}}, 400, "one of"),
    ({"model": "tiny", "prompt": "hi", "structured_outputs": {"regex": "("}}, 400, "invalid regex"),
    ({"model": "tiny", "prompt": "hi", "json_schema": {"type": "object", "properties": 3}}, 400, "json_schema"),
    ({"model": "tiny", "prompt": "hi", "grammar": "root ::= nothing"}, 400, "invalid grammar"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "does not take tools"),
    ({"model": "tiny", "prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "chat"),
    ({"model": "tiny", "prompt": [5, 1000]}, 400, "token ids"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(server, body, status, words):
    port, _ = server
    path = "/v1/chat/completions" if "messages" in str(body) else "/v1/completions"
    code, payload = raw(port, "POST", path, body)
    assert code == status, payload
    error = json.loads(payload)["error"]
    assert words in error["message"] and error["type"]
    assert raw(port, "GET", "/health")[0] == 200


def test_openai_client_raises_on_bad_requests(client):
    with pytest.raises(NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=CONTEXT)


def test_disconnect_mid_stream_frees_the_slot(server, client, model):
    port, app = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"model": "tiny", "prompt": "abc", "max_tokens": CONTEXT - 10, "temperature": 0, "stream": True}),
        headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.read(6) == b"data: "
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    engine = app.state.engine
    deadline = time.time() + 60
    while engine.running or engine.waiting:
        assert time.time() < deadline, "the disconnected request kept its slot"
        time.sleep(0.05)
    out = client.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=0)
    ids, _ = expected(model, model.tokenizer.encode("abc"), 8)
    assert out.choices[0].text == model.tokenizer.decode(ids)


def metric_values(port) -> dict:
    code, text = raw(port, "GET", "/metrics")
    assert code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_parse_and_move(server, client):
    port, _ = server
    before = metric_values(port)
    out = client.completions.create(model="tiny", prompt="count me", max_tokens=6, temperature=0)
    after = metric_values(port)
    get = lambda m, name, **labels: m.get((name, tuple(sorted(labels.items()))), 0.0)
    assert get(after, "jaxllm_generated_tokens_total") - get(before, "jaxllm_generated_tokens_total") \
        >= out.usage.completion_tokens
    assert get(after, "jaxllm_prompt_tokens_total") - get(before, "jaxllm_prompt_tokens_total") \
        == out.usage.prompt_tokens
    assert get(after, "jaxllm_requests_total", endpoint="/v1/completions", status="200") \
        == get(before, "jaxllm_requests_total", endpoint="/v1/completions", status="200") + 1
    assert get(after, "jaxllm_time_to_first_token_seconds_count") \
        == get(before, "jaxllm_time_to_first_token_seconds_count") + 1
    assert ("jaxllm_queue_length", ()) in after and ("jaxllm_running_requests", ()) in after


def test_a_paged_server_answers_as_the_rows_server_and_reports_its_pages(model, server, client):
    """The same greedy completions from a server on a paged KV pool; /metrics counts its
    pages, none held by a running request once the server is idle."""
    prompts = ["one two three", "the paged cache", "one two four"]
    want = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
            for p in prompts]
    app = create_app(model, "tiny", max_batch=16, max_context=CONTEXT, steps_per_chunk=4, kv_pages=9,
                     page_size=16)
    for port in running(app):
        paged = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: paged.completions.create(
                model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text, prompts))
        pages = {labels[0][1]: value for (name, labels), value in metric_values(port).items()
                 if name == "jaxllm_kv_pages"}
    assert got == want
    assert pages["running"] == 0 and pages["cached"] + pages["free"] == 8 and pages["cached"] > 0


@pytest.mark.parametrize("args, message", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-request-bytes", "10"], "--max-request-bytes must be >= 1024"),
    (["--kv-pages", "1"], "--kv-pages must be >= 2"),
    (["--page-size", "24"], "--page-size must be a power of two >= 16"),
    (["--kv-memory", "1.5"], "--kv-memory must be a fraction in (0, 1]"),
    (["--kv-memory", "0.5", "--kv-pages", "100"], "give --kv-pages or --kv-memory, not both")])
def test_serve_command_rejects_bad_arguments(args, message):
    result = subprocess.run([sys.executable, "-m", "jaxllm", "serve", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"jaxllm: error: {message}"


def test_api_key_guards_the_api_and_the_metrics_key_the_metrics(guarded, model):
    """/v1/ without the key: 401 with an OpenAI-style body (streamed requests too, and
    /v1/models); with it, the same completion as the library gives. /health stays
    open; /metrics needs its own key."""
    url = f"http://127.0.0.1:{guarded}/v1"
    for key in ("wrong", KEY[:-1], KEY + "x"):
        bad = OpenAI(base_url=url, api_key=key, max_retries=0)
        with pytest.raises(AuthenticationError):
            bad.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0)
        with pytest.raises(AuthenticationError):
            list(bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=3, stream=True))
        with pytest.raises(AuthenticationError):
            bad.models.list()
    status, payload = raw(guarded, "GET", "/v1/models")  # no Authorization header at all
    error = json.loads(payload)["error"]
    assert status == 401 and error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    good = OpenAI(base_url=url, api_key=KEY, max_retries=0)
    whole = good.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=6, temperature=0)
    assert whole.choices[0].text == model.tokenizer.decode(expected(model, [5, 6, 7], 6)[0])
    streamed = good.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    assert [m.id for m in good.models.list()] == ["tiny"]
    assert raw(guarded, "GET", "/health")[0] == 200
    assert raw(guarded, "GET", "/metrics")[0] == 401
    assert raw(guarded, "GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})[0] == 401
    status, text = raw(guarded, "GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert status == 200 and "jaxllm_requests_total" in text


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_gets_413(guarded, chunked):
    """By its Content-Length, or counted as it arrives without one; a body under the
    limit sent in chunks is served."""
    auth = {"Authorization": f"Bearer {KEY}"}
    big = {"model": "tiny", "prompt": "x" * 5000, "max_tokens": 1}
    status, payload = raw(guarded, "POST", "/v1/completions", big, headers=auth, chunked=chunked)
    assert status == 413 and json.loads(payload)["error"]["code"] == "request_too_large"
    small = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0}
    status, payload = raw(guarded, "POST", "/v1/completions", small, headers=auth, chunked=chunked)
    assert status == 200 and json.loads(payload)["usage"]["completion_tokens"] == 2


def test_serving_beyond_loopback_without_a_key_warns(capsys, monkeypatch):
    from jaxllm import server as server_module
    from jaxllm import tools as tools_module

    monkeypatch.setitem(sys.modules, "uvicorn", type(sys)("uvicorn"))
    sys.modules["uvicorn"].run = lambda *a, **kw: None
    monkeypatch.setattr(server_module, "create_app", lambda *a, **kw: None)
    server_module.serve(None, "tiny", host="0.0.0.0")
    assert "without an API key" in capsys.readouterr().err
    for host, key in (("127.0.0.1", None), ("localhost", None), ("::1", None), ("0.0.0.0", "k")):
        server_module.serve(None, "tiny", host=host, api_key=key)
        assert capsys.readouterr().err == ""


def test_completion_logprobs_equal_scoring_streamed_or_not(client, model):
    """logprobs=3 on /v1/completions: each generated token's log-probability is the
    one teacher-forced scoring gives it (float32, the decode loop against a forward
    pass), its top 3 come sorted with the greedy token first; streamed chunks carry
    the same values; echo adds the prompt's (the first token has none)."""
    prompt = [5, 6, 7]
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = whole.choices[0].logprobs
    generated = expected(model, prompt, 6)[0]
    nll = jaxllm.score_ids(model.params, model.config, prompt + generated)["nll"]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(generated)
    np.testing.assert_allclose(lp.token_logprobs, [-x for x in nll[len(prompt) - 1:]], rtol=0, atol=1e-4)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        values = list(top.values())
        assert 1 <= len(values) <= 3 and values == sorted(values, reverse=True)
        assert abs(values[0] - chosen) < 1e-5  # greedy: the token taken is the most likely
    assert lp.text_offset == [sum(map(len, lp.tokens[:n])) for n in range(len(lp.tokens))]
    streamed = [x for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                                     logprobs=3, stream=True)
                if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    np.testing.assert_allclose(streamed, lp.token_logprobs, rtol=0, atol=1e-6)
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, logprobs=2,
                                       echo=True).choices[0].logprobs
    assert echoed.token_logprobs[0] is None and echoed.top_logprobs[0] is None
    assert len(echoed.tokens) == len(prompt) + 2
    np.testing.assert_allclose(echoed.token_logprobs[1:], [-x for x in nll[:len(prompt) + 1]], rtol=0, atol=1e-4)
    assert all(len(top) <= 2 for top in echoed.top_logprobs[1:])


def test_chat_logprobs_streamed_and_not(client):
    """logprobs with top_logprobs on chat: one entry per generated token with its text,
    bytes and top 2; the stream's entries equal the whole reply's; none unless asked."""
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 2 and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5
        assert e.bytes == list(e.token.encode()) and e.logprob <= 0
    assert "".join(e.token for e in content).startswith(whole.choices[0].message.content[:1])
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    np.testing.assert_allclose([e.logprob for e in streamed], [e.logprob for e in content], rtol=0, atol=1e-6)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_n_choices_share_the_prefill_and_match_single_requests(client):
    """n=3 with a seed: choice j is what one request with seed + j gives (each row
    draws with its own key, whoever shares the batch), one prefill serves all three
    (prompt tokens counted once), and the stream tells the choices apart by index."""
    prompt, kw = [5, 6, 7], dict(model="tiny", max_tokens=8, temperature=1.5, top_p=1.0)
    grouped = client.completions.create(prompt=prompt, n=3, seed=11, **kw)
    assert [c.index for c in grouped.choices] == [0, 1, 2]
    singles = [client.completions.create(prompt=prompt, seed=11 + j, **kw) for j in range(3)]
    alone = [r.choices[0].text for r in singles]
    assert [c.text for c in grouped.choices] == alone
    assert len(set(alone)) > 1  # the seeds differ, so do the choices
    assert grouped.usage.prompt_tokens == len(prompt)
    assert grouped.usage.completion_tokens == sum(r.usage.completion_tokens for r in singles)
    texts = ["", "", ""]
    for c in client.completions.create(prompt=prompt, n=3, seed=11, stream=True, **kw):
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts == alone
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=5, temperature=0)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content


def test_presence_and_frequency_penalties_match_generate(client, model):
    """The engine's per-row penalties give what generate's static ones give."""
    prompt = [5, 6, 7]
    settings = jaxllm.SamplerSettings.greedy(presence_penalty=0.5, frequency_penalty=1.5)
    want = jaxllm.generate(model.params, model.config, [prompt], max_new_tokens=12, settings=settings).tokens[0]
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                    presence_penalty=0.5, frequency_penalty=1.5)
    assert got.choices[0].text == model.tokenizer.decode(want)


# Short, for the tiny model's 96-token slots (its tokens are nearly characters): tool
# names, calls by name and city, roles by their first letter
TOOLS_TEMPLATE = ("{% if tools %}[{% for t in tools %}{{ t.function.name }}{% endfor %}]{% endif %}"
                  "{% for m in messages %}{{ m['role'][0] }}:{% if m.tool_calls %}{% for c in m.tool_calls %}"
                  "{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}"
                  "{% endif %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}a:{% endif %}")
WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "description": "today's weather",
                                                 "parameters": {"type": "object", "properties": {
                                                     "city": {"type": "string"}}, "required": ["city"]}}}


ASK = [{"role": "user", "content": "Paris?"}]


@pytest.fixture(scope="module")
def tooled(model):
    """The tiny model with a chat template that takes tools, whose engine stops on the
    third token the model answers ASK with (given the tools), so that a reply ends
    with "stop"."""
    import dataclasses

    tool_model = dataclasses.replace(model, chat_template=TOOLS_TEMPLATE)
    ids = tool_model.tokenizer.encode(tool_model.apply_chat_template(ASK, tools=[WEATHER_TOOL]))
    third = jaxllm.generate(model.params, model.config, [ids], max_new_tokens=3, stop_tokens=[],
                            settings=jaxllm.SamplerSettings.greedy()).tokens[0][2]
    app = create_app(tool_model, "tiny", max_batch=8, max_context=CONTEXT, steps_per_chunk=4)
    app.state.engine.stop_ids = jax.numpy.asarray([third], jax.numpy.int32)  # an argument: no recompilation
    app.state.engine._stop_set = {third}
    for port in running(app):
        yield OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0), tool_model


def test_tools_render_and_a_tool_round_trip_is_served(tooled):
    """tools with tool_choice auto: the reply is parsed for calls (a random model makes
    none, so it stays content); a history with the assistant's call and the tool's
    result goes through the template (the prompt the server counts is the template's
    rendering of it, the call's arguments decoded) and is answered. (Forced calls:
    tests/test_structured.py.)"""
    client, tool_model = tooled
    ask = ASK
    reply = client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER_TOOL], max_tokens=5,
                                           temperature=0)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER_TOOL], max_tokens=5,
                                            temperature=0)
    rendered = "[weather]u:Paris?\na:weather(Paris)\nt:ok\na:"
    assert tool_model.apply_chat_template([{**m, "content": m["content"] or ""} for m in history[:1]] + [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather",
                                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "ok"}], tools=[WEATHER_TOOL]) == rendered
    assert answer.usage.prompt_tokens == len(tool_model.tokenizer.encode(rendered))
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(BadRequestError, match="tools"):
        client.chat.completions.create(model="tiny", messages=ask, tools=[{"type": "function"}])


def test_parsed_tool_calls_come_back_as_openai_sends_them(tooled, monkeypatch):
    """The reply's calls (the parser is made to find one in whatever the random model
    says: parsing itself is tests/test_tools.py's) come back as message.tool_calls with
    finish_reason "tool_calls", and streamed (text the stream could not follow as a
    call) as one tool_calls delta at the end; tool_choice "none" leaves the reply as
    text."""
    from jaxllm import server as server_module
    from jaxllm import tools as tools_module

    client, _ = tooled
    call = {"id": "call_abc", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    kw = dict(model="tiny", messages=ASK, tools=[WEATHER_TOOL], max_tokens=6, temperature=0)
    monkeypatch.setattr(server_module, "parse_tool_calls", lambda text: (None, [call]))
    monkeypatch.setattr(tools_module, "parse_tool_calls", lambda text: (None, [call]))  # the stream's
    whole = client.chat.completions.create(**kw)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.content is None
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("call_abc", "weather", {"city": "Paris"})]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].index == 0 and deltas[0][0].function.name == "weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    untouched = client.chat.completions.create(**{**kw, "tools": None}, tool_choice="none")
    assert untouched.choices[0].message.tool_calls is None and untouched.choices[0].finish_reason != "tool_calls"
