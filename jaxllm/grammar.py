"""Constrained decoding: output held to a grammar (a JSON schema, any JSON object, a
regular expression, a Lark or GBNF grammar, a choice of strings) by masking, at every
step, the tokens the grammar does not allow.

The grammar engine is llguidance (benchmarks/NOTES.md says why): `Grammars` compiles
and checks a grammar once per request against the model's tokenizer; a `Matchers`
bank holds one matcher per constrained row and computes, on the host, each row's
allowed tokens as a bitmask [R, V/32]; `allowed_logits` applies it on the device.
A batch with constrained rows decodes step by step from the host
(decoding.decode_stepped), the host's grammar work overlapping the device's model
pass; a batch without any runs the compiled loop untouched.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par

from .tokenizer import TextTokenizer


# JSON as json.dumps writes it: free whitespace would let a model pad forever.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Grammar:
    """A compiled, checked grammar (llguidance's form), for one tokenizer."""

    text: str
    source: str  # what it was made from, for messages: "json_schema", "regex", ...
    owner: "Grammars" = field(compare=False, repr=False, default=None)


class Grammars:
    """Grammars for one model's tokenizer. Building the token trie costs ~0.3 s for a
    49k vocabulary, so a server builds one of these and keeps it."""

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int):
        if not tokenizer.eos_ids:
            raise ValueError("constrained decoding needs the model's end-of-sequence token (it has none)")
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.lltokenizer = llguidance.LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab_size,
                                                  eos_token=list(tokenizer.eos_ids))

    def _checked(self, text: str, source: str) -> Grammar:
        error = llguidance.LLMatcher.validate_grammar(text, self.lltokenizer)
        if error and not error.startswith("WARNING"):
            raise ValueError(f"invalid {source}: {error}")
        return Grammar(text, source, self)

    def json_schema(self, schema) -> Grammar:
        """Output that validates against the JSON schema (a dict, or its JSON text);
        {"type": "object"} is any JSON object."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"invalid json_schema: not JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ValueError("invalid json_schema: a schema is a JSON object")
        return self._checked(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT),
                             "json_schema")

    def regex(self, pattern: str) -> Grammar:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("invalid regex: a non-empty string is needed")
        return self._checked(llguidance.LLMatcher.grammar_from_regex(pattern), "regex")

    def grammar(self, grammar: str) -> Grammar:
        """A Lark grammar (llguidance's dialect, with %json{...} for embedded schemas)
        or a GBNF grammar (llama.cpp's), told apart by llguidance."""
        if not isinstance(grammar, str) or not grammar.strip():
            raise ValueError("invalid grammar: a non-empty string is needed")
        try:
            text = llguidance.grammar_from("grammar", grammar)
        except ValueError as e:
            raise ValueError(f"invalid grammar: {e}") from None
        return self._checked(text, "grammar")

    def lark(self, grammar: str) -> Grammar:
        return self._checked(llguidance.LLMatcher.grammar_from_lark(grammar), "grammar")

    def choice(self, options: Sequence[str]) -> Grammar:
        if not isinstance(options, (list, tuple)) or not options or \
                not all(isinstance(o, str) and o for o in options):
            raise ValueError("invalid choice: a list of non-empty strings is needed")
        return self.lark("start: " + " | ".join(json.dumps(o) for o in options))

    def literal(self, text: str) -> str:
        """`text` as a Lark terminal: a special token by id (llguidance matches special
        tokens only that way), else a quoted string."""
        ids = self.tokenizer.encode(text, add_bos=False)
        if len(ids) == 1 and ids[0] in self.tokenizer.special_ids:
            return f"<[{ids[0]}]>"
        return json.dumps(text)


class Matchers:
    """One grammar matcher per constrained row of a batch, advanced on the host by
    each token its row samples; `masks` gives every row's allowed tokens as bits."""

    def __init__(self, grammars: Grammars):
        self.grammars = grammars
        self.words = (grammars.vocab_size + 31) // 32
        self._rows: dict[int, llguidance.LLMatcher] = {}
        self._lock = threading.Lock()
        self._executor = llguidance.LLExecutor()
        self._end = np.zeros(self.words, np.int32)  # a mask allowing only the stop tokens
        for t in grammars.tokenizer.eos_ids:
            self._end[t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))

    def attach(self, row: int, grammar: Grammar) -> None:
        """Row `row` is held to `grammar` from its next sampled token (its first)."""
        matcher = llguidance.LLMatcher(self.grammars.lltokenizer, grammar.text)
        if matcher.is_error():
            raise ValueError(f"invalid {grammar.source}: {matcher.get_error()}")
        with self._lock:
            self._rows[row] = matcher

    def detach(self, row: int) -> None:
        with self._lock:
            self._rows.pop(row, None)

    def take(self, row: int):
        """Row `row`'s matcher, detached as it stands (a preempted request keeps it)."""
        with self._lock:
            return self._rows.pop(row, None)

    def put(self, row: int, matcher) -> None:
        """A matcher `take` returned, attached to row `row` (the request's new slot)."""
        with self._lock:
            self._rows[row] = matcher

    def detach_all(self) -> None:
        with self._lock:
            self._rows.clear()

    def __bool__(self) -> bool:
        return bool(self._rows)

    def consume(self, tokens: np.ndarray, rows: Optional[Sequence[int]] = None) -> None:
        """Advance the rows' matchers by the tokens [R] they sampled (-1: none); rows
        default to 0..R-1. A row whose grammar is complete takes nothing more."""
        rows = range(len(tokens)) if rows is None else rows
        with self._lock:
            for row, token in zip(rows, tokens.tolist()):
                matcher = self._rows.get(row)
                if matcher is not None and token >= 0 and not matcher.is_stopped():
                    matcher.consume_token(token)

    def masks(self, rows: Sequence[int]) -> np.ndarray:
        """Allowed tokens of `rows` as bitmasks [R, words] (int32, bit t % 32 of word
        t // 32): all for a row without a grammar, only the stop tokens for one whose
        grammar is complete (or that left it, which the masks prevent)."""
        out = np.full((len(rows), self.words), -1, np.int32)
        todo = []
        with self._lock:
            for i, row in enumerate(rows):
                matcher = self._rows.get(row)
                if matcher is None:
                    continue
                if matcher.is_error() or matcher.is_stopped():
                    out[i] = self._end
                else:
                    todo.append((matcher, i))
            if todo:
                fill_next_token_bitmask_par(self._executor, todo, out)
        return out


def allowed_logits(logits: jax.Array, masks: Optional[jax.Array]) -> jax.Array:
    """logits [R, V] with the tokens outside bitmasks [R, words] (`Matchers.masks`) at
    -inf; masks None: all allowed."""
    if masks is None:
        return logits
    R, V = logits.shape
    bits = (masks[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return jnp.where(bits.reshape(R, -1)[:, :V].astype(bool), logits, -jnp.inf)
