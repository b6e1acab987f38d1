"""Chat templates: the model's own jinja template, rendered in a sandbox."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Optional

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import JaxllmError


class ChatTemplateError(JaxllmError):
    """The template is missing, invalid, or rejected the messages."""


def _raise(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """Hugging Face's tojson: plain json.dumps (jinja's own escapes <, >, & and ' for
    HTML, which tool schemas in a prompt must not get)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def render_chat(template: Optional[str], messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", tools: Optional[list[dict]] = None) -> str:
    """Prompt text for messages [{"role": ..., "content": ...}, ...]; tools (OpenAI's
    function definitions) go to the template's `tools` variable, as Hugging Face's
    apply_chat_template passes them."""
    if not template:
        raise ChatTemplateError("this model has no chat template (tokenizer.chat_template)")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatTemplateError(f"each message needs 'role' and 'content', got {m!r}")
    # Same environment options as Hugging Face's apply_chat_template.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=_raise,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token, tools=tools)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e
