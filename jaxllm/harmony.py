"""gpt-oss's harmony format, read from a reply's token ids.

A harmony reply is a run of messages, each a header and a body:

  <|channel|>analysis<|message|>The user asks...<|end|>
  <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>
  <|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>

`HarmonyDecoder` has StreamDecoder's interface (push ids, get new text; flush) and
routes each body by its header: the analysis channel to `reasoning` (the chat API's
reasoning_content), a message to `functions.NAME` to the content as a call in the Hermes
form the server's tool-call parser reads (tools.py), everything else (the final
channel, commentary preambles) to the content. The markers are special tokens, found by
id, so text that merely looks like one is never mistaken for it.
"""

from __future__ import annotations

import json
import re
from typing import Iterable, Optional

from .tokenizer import StreamDecoder, TextTokenizer

MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>")
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")
_RECIPIENT = re.compile(r"\bto=functions\.([^\s<]+)")


def is_harmony(tokenizer: TextTokenizer) -> bool:
    """Whether the tokenizer has harmony's markers as tokens (gpt-oss)."""
    return all(tokenizer.tok.token_to_id(m) is not None for m in MARKERS)


def reply_decoder_kind(tokenizer: TextTokenizer) -> type:
    """The incremental decoder class for a model's replies, decided once per model:
    harmony's for gpt-oss, else the plain one. Either is made as kind(tokenizer)."""
    return HarmonyDecoder if is_harmony(tokenizer) else StreamDecoder


def reply_decoder(tokenizer: TextTokenizer):
    """A decoder for one reply (reply_decoder_kind's, made)."""
    return reply_decoder_kind(tokenizer)(tokenizer)


def decode_reply(tokenizer: TextTokenizer, ids: list[int]) -> tuple[str, str]:
    """A whole reply's (content, reasoning); reasoning is "" but for harmony replies."""
    decoder = reply_decoder(tokenizer)
    content = decoder.push(ids) + decoder.flush()
    return content, decoder.reasoning


class HarmonyDecoder:
    """Incremental decoding of a harmony reply: `push` returns the content's new text,
    `reasoning` holds the analysis channel's text so far (module docstring)."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        ids = {m: tokenizer.tok.token_to_id(m) for m in MARKERS}
        self._start, self._message = ids["<|start|>"], ids["<|message|>"]
        self._ends = {ids["<|end|>"], ids["<|return|>"], ids["<|call|>"]}
        self.reasoning = ""
        self._header: list[int] = []  # the open header's ids (a reply opens with one)
        self._body: Optional[StreamDecoder] = None  # the open message's body
        self._route = "content"  # where the open body goes: "content", "reasoning" or "call"
        self._opened = False  # whether any message has begun

    def push(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            if self._body is not None:
                if i in self._ends:
                    out.append(self._close())
                else:
                    out.append(self._take(self._body.push([i])))
            elif i == self._start:
                self._header = []
            elif i == self._message:
                out.append(self._open())
            else:
                self._header.append(i)
        return "".join(out)

    def flush(self) -> str:
        """The rest: an open message closed (a reply stops before its <|return|> or
        <|call|>, stop tokens), or, from a reply that never opened a message, its text."""
        if self._body is not None:
            return self._close()
        if not self._opened:
            return self.tokenizer.decode(self._header)
        return ""

    def _open(self) -> str:
        header = self.tokenizer.decode(self._header, skip_special=False)
        self._header, self._body, self._opened = [], StreamDecoder(self.tokenizer), True
        channel, recipient = _CHANNEL.search(header), _RECIPIENT.search(header)
        if recipient is not None:
            self._route = "call"
            return f'<tool_call>{{"name": {json.dumps(recipient.group(1))}, "arguments": '
        self._route = "reasoning" if channel is not None and channel.group(1) == "analysis" else "content"
        return ""

    def _take(self, text: str) -> str:
        if self._route == "reasoning":
            self.reasoning += text
            return ""
        return text

    def _close(self) -> str:
        text = self._take(self._body.flush())
        self._body = None
        return text + ("}</tool_call>" if self._route == "call" else "")
