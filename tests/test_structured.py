"""Constrained decoding (jaxllm/grammar.py): the mask against the grammar's language
worked out by hand, generations from a tiny random model that always validate where
free ones do not, and the server's response_format / structured_outputs / forced
tool calls through the official `openai` client."""

import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from conftest import tiny
from openai import BadRequestError, OpenAI
from test_server import running
from tiny_gguf import write_gguf

import jaxllm
from jaxllm.batching import Engine, Request
from jaxllm.grammar import Matchers, allowed_logits
from jaxllm.server import create_app

TOOLS_TEMPLATE = ("{% if tools %}[{% for t in tools %}{{ t.function.name }}{% endfor %}]{% endif %}"
                  "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}a:{% endif %}")
# Every string and number bounded, so a random model's output ends inside the budget.
PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "ok", "tags", "kind"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3},
                         "kind": {"enum": ["cat", "dog"]}}}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # 300 tokens: all 256 bytes (GPT-2's byte-level pieces), so any JSON can be written
    c = tiny(vocab_size=300, max_seq_len=320)
    params = jaxllm.init_params(c, jax.random.PRNGKey(3))
    path = write_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", c, params,
                      extra={"tokenizer.chat_template": TOOLS_TEMPLATE})
    return jaxllm.load(str(path))


@pytest.fixture(scope="module")
def grammars(model):
    return jaxllm.Grammars(model.tokenizer, model.config.vocab_size)


def allowed_ids(bank, vocab_size, rows=(0,)):
    """Token ids whose logits the rows' masks leave finite, per row."""
    out = allowed_logits(jnp.zeros((len(rows), vocab_size)), jnp.asarray(bank.masks(rows)))
    return [set(np.flatnonzero(np.isfinite(np.asarray(row))).tolist()) for row in out]


def test_the_mask_is_the_grammar_s_next_tokens(model, grammars):
    """Regex [ab]{2}c: the tokens allowed at each step are exactly those whose text
    continues a string of the language (found by enumerating it here), then only
    the end-of-sequence token; a row without a grammar keeps every token."""
    tok, V = model.tokenizer, model.config.vocab_size
    language = [x + y + "c" for x in "ab" for y in "ab"]
    texts = {i: tok.decode([i]) for i in range(V)}
    bank = Matchers(grammars)
    bank.attach(0, grammars.regex("[ab]{2}c"))
    written = ""
    for token_text in ["a", "b", "c"]:
        expected = {i for i, t in texts.items()
                    if t and i not in tok.eos_ids and any(w.startswith(written + t) for w in language)}
        got, free = allowed_ids(bank, V, rows=(0, 1))
        assert got == expected and free == set(range(V))
        bank.consume(np.asarray(tok.encode(token_text, add_bos=False) + [-1]))  # row 1 has no grammar
        written += token_text
    assert allowed_ids(bank, V)[0] == set(tok.eos_ids)


def test_generated_json_validates_where_free_generation_does_not(model, grammars):
    """100 sampled generations of a tiny random model under a JSON schema all end and
    validate; the same rows unconstrained do not produce JSON."""
    prompts = [[5 + b % 7, 9] for b in range(100)]
    settings = jaxllm.SamplerSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    kw = dict(max_new_tokens=160, settings=settings, seed=11)
    out = jaxllm.generate(model.params, model.config, prompts, grammar=grammars.json_schema(PERSON), **kw)
    assert out.stop_reasons == ["stop"] * 100
    values = [json.loads(model.tokenizer.decode(t)) for t in out.tokens]
    for value in values:
        jsonschema.validate(value, PERSON)
    assert len({json.dumps(v) for v in values}) > 50  # sampled, not one answer
    free = jaxllm.generate(model.params, model.config, prompts, **kw)

    def parses(ids):
        try:
            json.loads(model.tokenizer.decode(ids))
            return True
        except ValueError:
            return False
    assert sum(map(parses, free.tokens)) == 0


def test_rows_hold_their_own_grammars_and_free_rows_are_untouched(model, grammars):
    """A batch mixing grammars (a choice, a regex) with free rows: each constrained row
    is in its language, and each free row's greedy tokens equal generating it alone;
    generate_stream gives generate's tokens."""
    prompts = [[5, 6], [7, 8], [9, 10], [11, 12]]
    per_row = [grammars.choice(["yes", "no", "maybe"]), None, grammars.regex("[0-9]{3}-[a-z]{2}"), None]
    greedy = jaxllm.SamplerSettings.greedy()
    out = jaxllm.generate(model.params, model.config, prompts, max_new_tokens=12, settings=greedy, grammar=per_row)
    texts = [model.tokenizer.decode(t) for t in out.tokens]
    assert texts[0] in ("yes", "no", "maybe") and re.fullmatch("[0-9]{3}-[a-z]{2}", texts[2])
    assert out.stop_reasons[0] == out.stop_reasons[2] == "stop"
    for b in (1, 3):
        alone = jaxllm.generate(model.params, model.config, [prompts[b]], max_new_tokens=12, settings=greedy)
        assert out.tokens[b] == alone.tokens[0]
    streamed = [[] for _ in prompts]
    for piece in jaxllm.generate_stream(model.params, model.config, prompts, max_new_tokens=12, settings=greedy,
                                        grammar=per_row, chunk=4):
        for b, ids in enumerate(piece):
            streamed[b] += ids
    assert streamed == out.tokens
    with pytest.raises(ValueError, match="one per prompt"):
        jaxllm.generate(model.params, model.config, prompts, grammar=per_row[:2])


def test_the_engine_retires_grammars_with_their_rows(model):
    """More constrained requests than slots: slots are reused by requests with other
    grammars (and none), each output in its own language."""
    engine = Engine(model.params, model.config, model.tokenizer, n_slots=2, max_context=128).start()
    try:
        g = engine.grammars()
        kinds = [g.choice(["alpha", "beta"]), None, g.regex("x+y"), g.json_schema({"enum": [1, 2, 3]}), None]
        requests = [Request([5 + i, 6], 24, jaxllm.SamplerSettings(temperature=1.0), seed=i, grammar=kinds[i % 5])
                    for i in range(10)]
        for r in requests:
            engine.submit(r)
        deadline = __import__("time").time() + 120
        while any(r.finish_reason is None for r in requests):
            assert __import__("time").time() < deadline
            __import__("time").sleep(0.02)
        for i, r in enumerate(requests):
            if i % 5 == 0:
                assert r.text in ("alpha", "beta") and r.finish_reason == "stop"
            elif i % 5 == 2:
                assert re.fullmatch("x+y", r.text) or (r.finish_reason == "length" and re.fullmatch("x+", r.text))
            elif i % 5 == 3:
                assert r.text in ("1", "2", "3") and r.finish_reason == "stop"
        assert not engine._matchers  # every slot's grammar left with its request
    finally:
        engine.shutdown()


# -- the server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(model):
    app = create_app(model, "tiny", max_batch=8, max_context=320, steps_per_chunk=8)
    for port in running(app):
        yield OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)


ASK = [{"role": "user", "content": "hi"}]


def test_response_format_json_schema_and_json_object(client):
    """Strict json_schema: every choice validates, streamed text equals the whole reply
    for the same seed; json_object: a JSON object."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    kw = dict(model="tiny", messages=ASK, response_format=fmt, n=4, temperature=1.0, seed=5, max_tokens=160)
    reply = client.chat.completions.create(**kw)
    texts = [c.message.content for c in reply.choices]
    for text, choice in zip(texts, reply.choices):
        jsonschema.validate(json.loads(text), PERSON)
        assert choice.finish_reason == "stop"
    streamed = [""] * 4
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts
    obj = client.completions.create(model="tiny", prompt="x", max_tokens=200, temperature=0,
                                    extra_body={"response_format": {"type": "json_object"}})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].text), dict)
    else:  # a random model may write an object longer than the budget: still an object's start
        assert obj.choices[0].text.startswith("{")


def test_structured_outputs_regex_choice_and_grammar(client):
    """vLLM's structured_outputs (regex, choice) and llama-server's GBNF grammar."""
    ask = lambda **extra: client.completions.create(model="tiny", prompt="q", max_tokens=20, temperature=1.0,
                                                    seed=3, n=3, extra_body=extra).choices
    for c in ask(structured_outputs={"regex": "[0-9]{4}-[0-9]{2}"}):
        assert re.fullmatch("[0-9]{4}-[0-9]{2}", c.text)
    for c in ask(structured_outputs={"choice": ["red", "green", "blue"]}):
        assert c.text in ("red", "green", "blue")
    for c in ask(grammar='root ::= "(" [a-c]+ ")"', max_tokens=40):
        assert re.fullmatch(r"\([a-c]+\)", c.text) or c.finish_reason == "length"


def test_forced_tool_calls_follow_the_functions_schemas(client):
    """tool_choice "required" and a named function: the reply is a call (finish_reason
    tool_calls) with arguments valid under the function's parameters, streamed as
    a tool_calls delta; parallel_tool_calls false gives one call; an unknown name
    is a 400."""
    params = {"weather": WEATHER["function"]["parameters"], "time": TIME["function"]["parameters"]}
    kw = dict(model="tiny", messages=ASK, tools=[WEATHER, TIME], max_tokens=200, temperature=1.0, seed=2)
    for choice, names in (("required", {"weather", "time"}), ({"type": "function", "function": {"name": "time"}},
                                                              {"time"})):
        reply = client.chat.completions.create(**kw, tool_choice=choice, n=3, parallel_tool_calls=False)
        for c in reply.choices:
            assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
            call = c.message.tool_calls[0].function
            assert call.name in names
            jsonschema.validate(json.loads(call.arguments), params[call.name])
    # Streamed as OpenAI streams a call: its id and name first, then its arguments in pieces
    chunks = list(client.chat.completions.create(**kw, tool_choice="required", stream=True))
    pieces = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    streamed = {}
    for p in pieces:  # per call: its first piece opens it, the others carry arguments only
        opens = p.index not in streamed
        assert (p.id is not None and p.id.startswith("call_") and p.function.name in params) == opens
        assert not opens or p.function.arguments == ""
        streamed.setdefault(p.index, []).append(p.function.arguments)
    assert pieces[0].index == 0
    assert len(streamed[0]) > 2  # arguments arrived over several chunks
    whole = client.chat.completions.create(**kw, tool_choice="required")
    made = whole.choices[0].message.tool_calls
    assert [json.loads("".join(streamed[k])) for k in sorted(streamed)] == [json.loads(c.function.arguments)
                                                                             for c in made]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    with pytest.raises(BadRequestError, match="not among the tools"):
        client.chat.completions.create(**kw, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(BadRequestError, match="cannot both"):
        client.chat.completions.create(**kw, tool_choice="required", response_format={"type": "json_object"})
