"""Tool calls parsed from the replies of each template family jaxllm serves
(jaxllm/tools.py), and tools rendered through a chat template."""

import json

import pytest

from jaxllm.chat import render_chat
from jaxllm.tools import check_tools, history_message, parse_tool_calls

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
