"""Tool calls in a chat model's output, as the template families jaxllm serves write
them, turned into OpenAI's `tool_calls`:

  Hermes / Qwen2.5 / Qwen3 / SmolLM2   <tool_call>{"name": ..., "arguments": {...}}</tool_call>
                                       (one object or a list of them per tag)
  Mistral                              [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]
  Llama 3.1 / 3.2                      {"name": ..., "parameters": {...}} as the whole reply
                                       (optionally after <|python_tag|>)
  gpt-oss (harmony)                    a commentary message to functions.NAME, which
                                       harmony.py rewrites in the Hermes form

Text that is not a well-formed call stays content: a reply is never lost to parsing.
When tool_choice forces a call, `forced_call` writes a grammar that admits only
calls in the model's own format, to the offered functions, with arguments valid
under their parameter schemas.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Optional

from .grammar import JSON_LAYOUT

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


_MARKERS = ("<tool_call>", _MISTRAL)
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def _object_end(text: str, start: int) -> Optional[int]:
    """Where the JSON object at text[start] ends (the index after its brace), or None
    while it is unfinished (or is not an object)."""
    if not text.startswith("{", start):
        return None
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class CallStream:
    """A reply with tools, streamed as OpenAI streams one: content as long as no call
    can have begun (text that could open a `<tool_call>` or `[TOOL_CALLS]` waits),
    then each call's id and name once written, and its arguments as they are written.
    A reply in Llama 3's bare-JSON form, or with a call the stream cannot follow,
    goes out whole at the end (`finish`), as the non-streamed reply would."""

    def __init__(self):
        self.text = ""
        self.content_sent = 0  # characters of text sent as content
        self.calls: list[list] = []  # per streamed call: [id, arguments characters sent]

    def _marker(self) -> Optional[int]:
        """Where the first call marker in the text begins, or None."""
        hits = [i for i in (self.text.find(m) for m in _MARKERS) if i >= 0]
        return min(hits) if hits else None

    def _calls(self, at: int) -> list[tuple[str, str]]:
        """(name, arguments written so far) of the calls after the marker at `at`."""
        found, pos = [], at
        mistral = self.text.startswith(_MISTRAL, at)
        pos += len(_MISTRAL) if mistral else 0
        while True:
            if mistral:
                pos = len(self.text) - len(self.text[pos:].lstrip(" \n[,"))
            else:
                pos = self.text.find("<tool_call>", pos)
                if pos < 0:
                    break
                pos += len("<tool_call>")
            head = _CALL_HEAD.match(self.text, pos)
            if head is None:
                break
            end = _object_end(self.text, head.end())
            found.append((json.loads(f'"{head.group(1)}"'), self.text[head.end():end]))
            if end is None:
                break
            pos = end
        return found

    def push(self, piece: str) -> dict:
        """The delta for `piece` of new text: {"content": ...} and/or {"tool_calls": [...]}."""
        self.text += piece
        delta: dict = {}
        stripped = self.text.lstrip()
        if stripped.startswith("{") or stripped.startswith(_PYTHON_TAG) or _PYTHON_TAG.startswith(stripped):
            return delta  # perhaps a bare-JSON call: decided at the end
        at = self._marker()
        if at is not None:
            upto = at
        else:  # hold back what could be the start of a marker
            upto = len(self.text) - max((k for m in _MARKERS for k in range(1, len(m))
                                         if self.text.endswith(m[:k])), default=0)
        if upto > self.content_sent:
            delta["content"], self.content_sent = self.text[self.content_sent:upto], upto
        if at is not None:
            updates = self._call_updates(at)
            if updates:
                delta["tool_calls"] = updates
        return delta

    def _call_updates(self, at: int) -> list[dict]:
        """A new call's id and name (arguments "", as OpenAI opens a call), or the
        arguments written since the last update, per call."""
        updates = []
        for k, (name, arguments) in enumerate(self._calls(at)):
            if k == len(self.calls):
                self.calls.append([f"call_{secrets.token_hex(12)}", 0])
                updates.append({"index": k, "id": self.calls[k][0], "type": "function",
                                "function": {"name": name, "arguments": ""}})
            elif len(arguments) > self.calls[k][1]:
                updates.append({"index": k, "function": {"arguments": arguments[self.calls[k][1]:]}})
                self.calls[k][1] = len(arguments)
        return updates

    def finish(self) -> tuple[dict, bool]:
        """(the last delta, whether the reply made calls): what the whole reply's parse
        finds that the stream did not send."""
        content, calls = parse_tool_calls(self.text)
        delta: dict = {}
        if not calls:
            if len(self.text) > self.content_sent and not self.calls:
                delta["content"] = self.text[self.content_sent:]
            return delta, bool(self.calls)
        if not self.calls and content and self.content_sent == 0:
            delta["content"] = content
        streamed = len(self.calls)
        at = self._marker()
        rest = self._call_updates(at) if at is not None and streamed else []
        rest = [u for u in rest if u["index"] < streamed]  # calls begun in the stream: their last arguments
        extra = [{"index": k, **call} for k, call in enumerate(calls) if k >= streamed]
        if rest or extra:
            delta["tool_calls"] = rest + extra
        return delta, True


def template_family(template: str) -> str:
    """The call format a chat template's model writes: "harmony" (gpt-oss), "mistral",
    "llama3" or "hermes" (Hermes, Qwen, SmolLM2, and the format taken when a template
    says none)."""
    if "<|channel|>" in template:
        return "harmony"
    if _MISTRAL in template:
        return "mistral"
    if "<tool_call>" not in template and (_PYTHON_TAG in template or '"parameters"' in template):
        return "llama3"
    return "hermes"


def forced_call(grammars, tools: list[dict], name: Optional[str], template: str, parallel: bool = True):
    """A grammar.Grammar admitting calls of the tools, or of the function `name` only,
    in the template family's format: one or more with `parallel` (OpenAI's
    parallel_tool_calls), else one (Llama 3 makes one in any case)."""
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not functions:
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")
    family = template_family(template)
    if family == "harmony":
        return _harmony_call(grammars, functions)
    key = "parameters" if family == "llama3" else "arguments"
    schema = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", key],
                         "properties": {"name": {"const": f["name"]},
                                        key: f.get("parameters") or {"type": "object"}}}
                        for f in functions]}
    call = "call: %json " + json.dumps({**schema, "x-guidance": JSON_LAYOUT})
    literal = grammars.literal
    if family == "mistral":
        more = '(", " call)*' if parallel else ""
        start = f'start: {literal(_MISTRAL)} "[" call {more} "]"'
    elif family == "llama3":
        start = "start: call"
    else:
        more = '("\\n" block)*' if parallel else ""
        start = (f'start: block {more}\nblock: {literal("<tool_call>")} "\\n" call "\\n" '
                 f'{literal("</tool_call>")}')
    return grammars.lark(f"{start}\n{call}")


def _harmony_call(grammars, functions: list[dict]):
    """gpt-oss's call: a commentary message to functions.NAME whose body is the JSON
    arguments (harmony.py reads it back); one per turn, which <|call|> ends."""
    literal = grammars.literal
    rules = [f"call: {' | '.join(f'f{i}' for i in range(len(functions)))}"]
    for i, f in enumerate(functions):
        header = json.dumps(f"commentary to=functions.{f['name']} ")
        rules.append(f'f{i}: {literal("<|channel|>")} {header} {literal("<|constrain|>")} "json" '
                     f'{literal("<|message|>")} a{i}')
        rules.append(f"a{i}: %json " + json.dumps({**(f.get("parameters") or {"type": "object"}),
                                                  "x-guidance": JSON_LAYOUT}))
    return grammars.lark("start: call\n" + "\n".join(rules))


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
