"""gpt-oss's harmony replies (jaxllm/harmony.py): reasoning, content and tool calls told
apart by the marker tokens, one id at a time as at once, and through the server's chat
endpoint (a grammar makes a tiny random model write a harmony reply)."""

import dataclasses

import jax
import pytest
from conftest import tiny
from openai import OpenAI
from test_server import running
from tiny_gguf import write_gguf

import jaxllm
from jaxllm.harmony import HarmonyDecoder, decode_reply, is_harmony
from jaxllm.server import create_app
from jaxllm.tools import parse_tool_calls

MARKERS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"]
TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|start|>assistant{% endif %}")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    c = tiny(vocab_size=300, max_seq_len=256)
    path = write_gguf(tmp_path_factory.mktemp("h") / "harmony.gguf", c, jaxllm.init_params(c, jax.random.PRNGKey(4)),
                      control=MARKERS, extra={"tokenizer.chat_template": TEMPLATE})
    return jaxllm.load(str(path))


def ids(model, text):
    return model.tokenizer.encode(text, add_bos=False)


REPLY = ("<|channel|>analysis<|message|>The user greets; answer briefly.<|end|>"
         "<|start|>assistant<|channel|>final<|message|>Hello, wörld!")


def test_reasoning_and_content_apart_at_once_and_id_by_id(model):
    tok = model.tokenizer
    assert is_harmony(tok) and tok.eos_ids == tuple(sorted({0, *(tok.tok.token_to_id(m)
                                                              for m in ("<|return|>", "<|call|>"))}))
    reply = ids(model, REPLY)
    assert decode_reply(tok, reply) == ("Hello, wörld!", "The user greets; answer briefly.")
    decoder, content = HarmonyDecoder(tok), ""
    for i in reply:
        content += decoder.push([i])
    assert content + decoder.flush() == "Hello, wörld!"
    assert decoder.reasoning == "The user greets; answer briefly."


def test_a_call_becomes_a_tool_call_and_unmarked_text_stays(model):
    """A message to functions.NAME is written as the Hermes call the server parses; the
    commentary channel's preamble is content; a reply without markers is kept whole."""
    reply = ids(model, '<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>commentary '
                       'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}')
    content, reasoning = decode_reply(model.tokenizer, reply)
    assert reasoning == ""
    assert content == 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    text, calls = parse_tool_calls(content)
    assert text == "Checking." and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_weather", '{"city": "Paris"}')]
    assert decode_reply(model.tokenizer, ids(model, "no markers here")) == ("no markers here", "")


def test_the_chat_endpoint_returns_reasoning_content(model):
    """A grammar holds the reply to a harmony exchange: the chat endpoint's message and
    stream both carry it as reasoning_content and content; a completion as its text
    and reasoning_content."""
    special = lambda m: f"<[{model.tokenizer.tok.token_to_id(m)}]>"
    grammar = (f'start: {special("<|channel|>")} "analysis" {special("<|message|>")} "Think first." '
               f'{special("<|end|>")} {special("<|start|>")} "assistant" {special("<|channel|>")} "final" '
               f'{special("<|message|>")} "Hi."')
    app = create_app(model, "tiny", max_batch=2, max_context=256, steps_per_chunk=4)
    for port in running(app):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        ask = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=200,
                   extra_body={"structured_outputs": {"grammar": grammar}})
        message = client.chat.completions.create(**ask).choices[0].message
        assert message.content == "Hi." and message.model_extra["reasoning_content"] == "Think first."
        thought, said = "", ""
        for event in client.chat.completions.create(**ask, stream=True):
            delta = event.choices[0].delta
            thought += (delta.model_extra or {}).get("reasoning_content") or ""
            said += delta.content or ""
        assert (thought, said) == ("Think first.", "Hi.")
        # a completion of the same reply: its text and, beside it, its reasoning
        prompt = model.apply_chat_template([{"role": "user", "content": "hi"}])
        done = client.completions.create(model="tiny", prompt=prompt, max_tokens=200,
                                         extra_body={"structured_outputs": {"grammar": grammar}}).choices[0]
        assert done.text == "Hi." and done.model_extra["reasoning_content"] == "Think first."


def test_a_hugging_face_folder_stops_at_harmony_s_turn_ends(tmp_path):
    """gpt-oss's tokenizer_config names <|return|> only: <|call|> must stop a reply too
    (it ends a turn with a tool call), and <|end|> must not (it ends the reasoning)."""
    import json  # noqa: PLC0415

    from tokenizers import Tokenizer, models  # noqa: PLC0415

    from jaxllm.tokenizer import tokenizer_from_json  # noqa: PLC0415
    tok = Tokenizer(models.BPE({"a": 0, "b": 1}, []))
    tok.add_special_tokens(MARKERS)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    loaded = tokenizer_from_json(str(tmp_path))
    assert loaded.eos_ids == tuple(sorted(tok.token_to_id(m) for m in ("<|return|>", "<|call|>")))


def test_a_forced_call_is_a_harmony_call(model):
    """tool_choice "required" on a harmony model: the grammar holds the reply to
    harmony's own call (a commentary message to functions.NAME, JSON arguments valid
    under the tool's schema), which comes back as tool_calls."""
    import json  # noqa: PLC0415

    import jsonschema  # noqa: PLC0415
    params = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
              "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    # a byte-level vocabulary: the call alone is ~60 tokens
    template = TEMPLATE + "{% if tools %}<|channel|>{% endif %}"
    app = create_app(dataclasses.replace(model, chat_template=template), "tiny", max_batch=2, max_context=256)
    for port in running(app):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        choice = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "weather?"}],
                                                tools=tools, tool_choice="required", max_tokens=200,
                                                temperature=0).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), params)
