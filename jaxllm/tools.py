"""Tool calls in a chat model's output, as the template families jaxllm serves write
them, turned into OpenAI's `tool_calls`:

  Hermes / Qwen2.5 / Qwen3 / SmolLM2   <tool_call>{"name": ..., "arguments": {...}}</tool_call>
                                       (one object or a list of them per tag)
  Mistral                              [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]
  Llama 3.1 / 3.2                      {"name": ..., "parameters": {...}} as the whole reply
                                       (optionally after <|python_tag|>)

Text that is not a well-formed call stays content: a reply is never lost to parsing.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Optional

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_MISTRAL = "[TOOL_CALLS]"
_PYTHON_TAG = "<|python_tag|>"


def _calls(value) -> Optional[list[dict]]:
    """OpenAI tool calls from a parsed {"name", "arguments" | "parameters"} object or a
    list of them; None if it is not one."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):  # already encoded: keep it if it is JSON
            try:
                json.loads(arguments)
            except ValueError:
                return None
        else:
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                      "function": {"name": item["name"], "arguments": arguments}})
    return calls or None


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_tool_calls(text: str) -> tuple[Optional[str], list[dict]]:
    """(content, tool calls) of a reply: the calls it makes in any of the formats
    above, and the rest of its text (None when nothing else is left)."""
    if _HERMES.search(text):
        calls = []
        for match in _HERMES.finditer(text):
            found = _calls(_json(match.group(1)))
            if found is None:
                return text, []  # a malformed call: the reply stays text
            calls += found
        kept = _HERMES.sub("", text).strip()
        return kept or None, calls
    stripped = text.strip()
    if stripped.startswith(_MISTRAL):
        found = _calls(_json(stripped[len(_MISTRAL):].strip()))
        return (None, found) if found else (text, [])
    if stripped.startswith(_PYTHON_TAG):
        stripped = stripped[len(_PYTHON_TAG):].strip()
    if stripped.startswith("{"):
        value = _json(stripped)
        if isinstance(value, dict) and ("parameters" in value or "arguments" in value):
            found = _calls(value)
            if found:
                return None, found
    return text, []


def check_tools(tools: list) -> list[dict]:
    """The request's `tools` as a template takes them; ValueError naming what is wrong."""
    checked = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        checked.append(tool)
    return checked


def history_message(message: dict) -> dict:
    """A chat history message for the template: an assistant's tool_calls with their
    arguments decoded to objects (as Hugging Face templates expect), a tool result
    with its call id."""
    out = dict(message)
    if out.get("tool_calls"):
        calls = []
        for call in out["tool_calls"]:
            function = dict(call.get("function") or {})
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                decoded = _json(arguments)
                function["arguments"] = decoded if decoded is not None else arguments
            calls.append({**call, "function": function})
        out["tool_calls"] = calls
    return out
