"""Tokenizers built with Hugging Face `tokenizers` from GGUF metadata or tokenizer.json.

GGUF `tokenizer.ggml.model`:
  gpt2   byte-level BPE: vocabulary, merges, and a pre-tokenizer chosen by
         `tokenizer.ggml.pre` (the split regex llama.cpp uses for that name)
  llama  SentencePiece BPE with scores and byte fallback (Gemma, Llama 2)
Control tokens become special tokens, parsed in text unless asked not to;
user-defined tokens are always matched whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .errors import ModelFileError, UnsupportedArchitectureError

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
HARMONY_TURN_ENDS = ("<|return|>", "<|call|>")  # gpt-oss

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# gpt-oss (tokenizer.ggml.pre "gpt-4o"): tiktoken's o200k_base, which also splits
# words at case changes ("HelloWorld" -> "Hello", "World")
O200K_SPLIT = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+"])


def _byte_level(split: Optional[str], digits: bool = False):
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


# tokenizer.ggml.pre -> pre-tokenizer (llama.cpp's llama-vocab.cpp names)
GPT2_PRE = {
    "default": lambda: _byte_level(None), "gpt-2": lambda: _byte_level(None),
    "gpt2": lambda: _byte_level(None),
    "smollm": lambda: _byte_level(None, digits=True),
    "starcoder": lambda: _byte_level(None, digits=True),
    "llama-bpe": lambda: _byte_level(LLAMA3_SPLIT), "llama3": lambda: _byte_level(LLAMA3_SPLIT),
    "qwen2": lambda: _byte_level(QWEN2_SPLIT), "gpt-4o": lambda: _byte_level(O200K_SPLIT),
}


@dataclass
class TextTokenizer:
    """Text <-> ids with the model's BOS convention. `tok` is a `tokenizers.Tokenizer`."""

    tok: Tokenizer
    bos_id: Optional[int] = None
    add_bos: bool = False
    eos_ids: tuple[int, ...] = ()
    special_ids: frozenset = field(default_factory=frozenset)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: Optional[bool] = None, parse_special: bool = True) -> list[int]:
        """ids of text; BOS per the model unless add_bos says otherwise; special
        tokens written in the text (e.g. "<|im_start|>") become their ids."""
        self.tok.encode_special_tokens = not parse_special
        try:
            ids = self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = False
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(i)


class StreamDecoder:
    """Incremental detokenisation: feed ids, get the new text, never half a UTF-8
    character (bytes of an unfinished character wait for the next ids).

    Each push decodes a window of ids, not all of them (a 2,000-token answer would
    otherwise cost 2,000 x 2,000 / chunk token decodes on the server's thread): the
    ids since the last emitted text, after the few before it that give the decoder
    its context (a word's leading space, a character split across tokens). The new
    text is what the window adds to its context's decoding (the scheme of TGI and
    vLLM's incremental detokenizer)."""

    CONTEXT = 6  # ids of context before the new ones
    reasoning = ""  # a plain reply has none (harmony.HarmonyDecoder's has)

    def __init__(self, tokenizer: TextTokenizer, skip_special: bool = True):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.ids: list[int] = []
        self.done = 0  # ids whose text has been returned

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(ids)
        return self._new(final=False)

    def flush(self) -> str:
        return self._new(final=True)

    def _new(self, final: bool) -> str:
        start = max(0, self.done - self.CONTEXT)
        decode = lambda part: self.tokenizer.decode(part, self.skip_special)
        context, text = decode(self.ids[start:self.done]), decode(self.ids[start:])
        if not final and text.endswith("\ufffd"):  # an incomplete multi-byte character: wait
            return ""
        if not text.startswith(context):  # the context decodes differently now: the slow way
            context, text = decode(self.ids[:self.done]), decode(self.ids)
        self.done = len(self.ids)
        return text[len(context):]


def _added_tokens(tokens, types) -> list[AddedToken]:
    """Control tokens are special (parsed in text only when asked); user-defined
    tokens (Gemma's runs of spaces, say) are always matched whole, as llama.cpp does."""
    return [AddedToken(t, special=ty == CONTROL, normalized=False) for t, ty in zip(tokens, types)
            if ty in (CONTROL, USER_DEFINED)]


def tokenizer_from_gguf(g) -> TextTokenizer:
    md = g.metadata
    kind = md.get("tokenizer.ggml.model")
    tokens = g.array("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelFileError(f"{g.path}: no tokenizer in the file (tokenizer.ggml.tokens missing)")
    types = g.array("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        pre = md.get("tokenizer.ggml.pre", "default")
        if pre not in GPT2_PRE:
            raise UnsupportedArchitectureError(
                f"{g.path}: BPE pre-tokenizer {pre!r} is not supported (supported: {', '.join(GPT2_PRE)})")
        merges = [tuple(m.split(" ", 1)) for m in g.array("tokenizer.ggml.merges") or []]
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=False))
        tok.pre_tokenizer = GPT2_PRE[pre]()
        tok.decoder = decoders.ByteLevel()
        default_bos = False
    elif kind == "llama":
        tok = _sentencepiece_bpe(tokens, g.array("tokenizer.ggml.scores"), types, md)
        default_bos = True
    else:
        raise UnsupportedArchitectureError(
            f"{g.path}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    added = _added_tokens(tokens, types)
    tok.add_special_tokens([t for t in added if t.special])
    tok.add_tokens([t for t in added if not t.special])
    bos = md.get("tokenizer.ggml.bos_token_id")
    eos = stop_ids(md, vocab, types)
    return TextTokenizer(tok, bos, bool(md.get("tokenizer.ggml.add_bos_token", default_bos)), eos,
                         frozenset(i for i, ty in enumerate(types) if ty == CONTROL))


def stop_ids(md: dict, vocab: dict[str, int], types: list[int]) -> tuple[int, ...]:
    """The ids that end a generation: the metadata's end-of-sequence and end-of-turn
    tokens, and the control tokens chat models end a turn with that the metadata may
    not name (Gemma's <end_of_turn>; llama.cpp stops on these too). gpt-oss's harmony
    format closes every message with <|end|>, its reasoning too, and ends the turn
    with <|return|> or <|call|>: there <|end|> is no stop (llama.cpp drops it alike)."""
    eos = {int(md[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in md}
    eos |= {vocab[t] for t in END_OF_TURN if t in vocab and types[vocab[t]] == CONTROL}
    return tuple(sorted(_harmony_stops(eos, vocab.get)))


def _harmony_stops(eos: set[int], token_id) -> set[int]:
    """eos with harmony's turn ends in place of <|end|> where the vocabulary has them."""
    ends = [token_id(t) for t in HARMONY_TURN_ENDS]
    if None in ends:
        return eos
    return (eos - {token_id("<|end|>")}) | set(ends)


def _sentencepiece_bpe(tokens, scores, types, md) -> Tokenizer:
    """SentencePiece BPE as llama.cpp runs it: merges ranked by the merged piece's
    score, spaces as U+2581, byte fallback through <0xXX> pieces."""
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = scores or [0.0] * len(tokens)
    ranked = []  # (-score of the merged piece, left id, right id): ~2 M lookups for Gemma
    find = vocab.get
    for i, (piece, ty) in enumerate(zip(tokens, types)):
        if ty not in (NORMAL, USER_DEFINED) or len(piece) < 2 or find(piece) != i:
            continue
        for cut in range(1, len(piece)):
            left = find(piece[:cut])
            if left is not None:
                right = find(piece[cut:])
                if right is not None:
                    ranked.append((-scores[i], left, right))
    ranked.sort()
    unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab, [(tokens[a], tokens[b]) for _, a, b in ranked], unk_token=unk,
                               fuse_unk=True, byte_fallback=True, ignore_merges=False))
    steps = [normalizers.Replace(" ", "\u2581")]
    if md.get("tokenizer.ggml.add_space_prefix", False):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    return tok


def tokenizer_from_json(folder: str) -> TextTokenizer:
    """tokenizer.json (+ tokenizer_config.json for BOS and the chat template)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise ModelFileError(f"{folder}: no tokenizer.json")
    tok = Tokenizer.from_file(path)
    cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
    bos_token = cfg.get("bos_token")
    if isinstance(bos_token, dict):
        bos_token = bos_token.get("content")
    bos_id = tok.token_to_id(bos_token) if bos_token else None
    eos_token = cfg.get("eos_token")
    if isinstance(eos_token, dict):
        eos_token = eos_token.get("content")
    eos = {tok.token_to_id(eos_token)} if eos_token and tok.token_to_id(eos_token) is not None else set()
    eos = tuple(sorted(_harmony_stops(eos, tok.token_to_id)))
    specials = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
    # The post-processor may add BOS itself; we add it explicitly instead.
    add_bos = bool(cfg.get("add_bos_token", False))
    tok.post_processor = None
    return TextTokenizer(tok, bos_id, add_bos, eos, specials)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
