"""Tool calls parsed from the replies of each template family jaxllm serves
(jaxllm/tools.py), and tools rendered through a chat template."""

import json
import re

import pytest

from jaxllm.chat import render_chat
from jaxllm.tools import CallStream, check_tools, history_message, parse_tool_calls

WEATHER = {"city": "Paris", "unit": "celsius"}


def names_and_arguments(calls):
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("reply, content, calls", [
    # Hermes / Qwen2.5 / Qwen3: one object per tag, text around it kept as content
    ('<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     None, [("weather", WEATHER)]),
    ('Let me look.\n<tool_call>{"name": "weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
     '<tool_call>{"name": "time", "arguments": {}}</tool_call>', "Let me look.",
     [("weather", WEATHER), ("time", {})]),
    # SmolLM2: a list inside one tag; a reply cut at the end of its call (no closing tag)
    ('<tool_call>[{"name": "weather", "arguments": {"city": "Paris", "unit": "celsius"}}]</tool_call>',
     None, [("weather", WEATHER)]),
    ('<tool_call>{"name": "time", "arguments": "{}"}', None, [("time", {})]),
    # Mistral
    ('[TOOL_CALLS] [{"name": "weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
     None, [("weather", WEATHER)]),
    # Llama 3.1 / 3.2: the reply is the call, "parameters" for arguments
    ('{"name": "weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None, [("weather", WEATHER)]),
    ('<|python_tag|>{"name": "time", "parameters": {}}', None, [("time", {})]),
])
def test_each_family_s_calls_are_parsed(reply, content, calls):
    got_content, got = parse_tool_calls(reply)
    assert got_content == content and names_and_arguments(got) == calls


@pytest.mark.parametrize("reply", [
    "Paris is sunny today.",
    '{"city": "Paris"}',  # JSON, but no call
    '<tool_call>{"name": "weather", "arguments": {"city": </tool_call>',  # malformed: stays text
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '[TOOL_CALLS] not json',
    '{"name": "weather", "arguments": "not json"}',
])
def test_what_is_not_a_call_stays_text(reply):
    assert parse_tool_calls(reply) == (reply, [])


def test_tools_are_checked_and_history_arguments_decoded():
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    assert check_tools([tool]) == [tool]
    for bad in ({"type": "function"}, {"type": "code", "function": {"name": "x"}}, "weather",
                {"type": "function", "function": {"name": ""}}):
        with pytest.raises(ValueError, match=r"tools\[0\]"):
            check_tools([bad])
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": json.dumps(WEATHER)}}
    message = history_message({"role": "assistant", "content": "", "tool_calls": [call]})
    assert message["tool_calls"][0]["function"]["arguments"] == WEATHER
    assert call["function"]["arguments"] == json.dumps(WEATHER)  # the request is left as it was


def test_tools_and_tool_messages_reach_the_template():
    template = ("{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
                "{% for m in messages %}<{{ m.role }}>"
                "{% if m.tool_calls %}{% for c in m.tool_calls %}call {{ c.function.name }}"
                "({{ c.function.arguments.city }}){% endfor %}{% endif %}"
                "{% if m.role == 'tool' %}[{{ m.tool_call_id }}]{% endif %}{{ m.content }}{% endfor %}")
    tools = [{"type": "function", "function": {"name": "weather"}}]
    messages = [{"role": "user", "content": "weather?"},
                history_message({"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "weather", "arguments": json.dumps(WEATHER)}}]}),
                {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    text = render_chat(template, messages, add_generation_prompt=False, tools=tools)
    assert text == "<tools>weather;</tools><user>weather?<assistant>call weather(Paris)<tool>[call_1]sunny"
    assert render_chat(template, messages[:1], add_generation_prompt=False) == "<user>weather?"


def _streamed(text: str, step: int):
    """CallStream fed `text` in pieces of `step` characters: (content, {index: (id, name,
    arguments)}, made calls, number of deltas)."""
    stream, deltas = CallStream(), []
    for i in range(0, len(text), step):
        deltas.append(stream.push(text[i:i + step]))
    last, made = stream.finish()
    deltas = [d for d in deltas + [last] if d]
    content, calls = "".join(d.get("content", "") for d in deltas), {}
    for d in deltas:
        for piece in d.get("tool_calls", []):
            entry = calls.setdefault(piece["index"], [piece.get("id"), piece["function"].get("name"), ""])
            entry[2] += piece["function"].get("arguments", "")
    return content, {k: (i, n, json.loads(a)) for k, (i, n, a) in calls.items()}, made, len(deltas)


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_a_streamed_reply_sends_content_then_each_call_as_it_is_written(step):
    """Content up to the marker (never a partial marker), then per call its id and name
    once, then its arguments in pieces that join to the whole reply's parse; text
    that only looks like a marker's start stays content; a bare-JSON (Llama 3) call
    or one that names itself last comes whole at the end."""
    reply = ('Let me check. <tool_call>\n{"name": "weather", "arguments": {"city": "Pa\\"ris", "n": [1, {"a": 2}]}}'
             '\n</tool_call>\n<tool_call>\n{"name": "time", "arguments": {"zone": "UTC"}}\n</tool_call>')
    content, calls, made, n = _streamed(reply, step)
    assert made and content == "Let me check. "
    assert {k: (name, args) for k, (_, name, args) in calls.items()} == {
        0: ("weather", {"city": 'Pa"ris', "n": [1, {"a": 2}]}), 1: ("time", {"zone": "UTC"})}
    assert all(ident.startswith("call_") for ident, _, _ in calls.values())
    if step == 1:
        assert n > 40  # the arguments went out as they were written
    mistral = _streamed('[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]', step)
    assert mistral[2] and [(c[1], c[2]) for c in mistral[1].values()] == [("a", {"x": 1}), ("b", {})]
    for whole in ('{"name": "f", "parameters": {"q": "z"}}', '<tool_call>{"arguments": {}, "name": "g"}</tool_call>'):
        content, calls, made, _ = _streamed(whole, step)
        assert made and content == "" and [c[1] for c in calls.values()] == [json.loads(
            re.sub("</?tool_call>", "", whole))["name"]]
    text = "a < b and [TOOL_CALL is not a call <tool_"
    assert _streamed(text, step)[:3] == (text, {}, False)
