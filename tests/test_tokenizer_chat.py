import jaxllm
import numpy as np
import pytest

from jaxllm.chat import ChatTemplateError, render_chat
from jaxllm.tokenizer import StreamDecoder

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_render_chat():
    msgs = [{"role": "user", "content": "hi"}]
    assert render_chat(TEMPLATE, msgs) == "<user>hi</s><assistant>"
    assert render_chat(TEMPLATE, msgs, add_generation_prompt=False) == "<user>hi</s>"


def test_template_is_sandboxed_and_errors_are_clear():
    with pytest.raises(ChatTemplateError):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(None, [])
    with pytest.raises(ChatTemplateError, match="role"):
        render_chat(TEMPLATE, [{"content": "x"}])
    with pytest.raises(ChatTemplateError, match="only user"):
        render_chat("{{ raise_exception('only user') }}", [])


class FakeTokenizer:
    """Decodes ids as UTF-8 bytes, like byte-level BPE."""

    def decode(self, ids, skip_special=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_decoder_never_splits_a_character():
    text = "naïve 東京 🚀!"
    data = list(text.encode())
    d = StreamDecoder(FakeTokenizer())
    pieces = [d.push([b]) for b in data] + [d.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_matches_whole_decoding_in_windows():
    """Pieces of a real tokenizer's ids, pushed a few at a time, join to the text of
    all of them, while each push decodes a few ids, not the whole answer."""
    tok = jaxllm.load().tokenizer
    widest = []

    class Counting:
        def decode(self, ids, skip_special=True):
            widest.append(len(ids))
            return tok.decode(ids, skip_special)

    rng = np.random.default_rng(0)
    cases = [tok.encode("Héllo wörld — ünïcode 你好世界 🙂🙃 and  spaces\n\nnew lines " * 8)]
    cases += [rng.integers(0, tok.vocab_size, 300).tolist() for _ in range(20)]
    for ids in cases:
        d, out, i = StreamDecoder(Counting()), "", 0
        while i < len(ids):
            k = int(rng.integers(1, 5))
            out += d.push(ids[i:i + k])
            i += k
        assert out + d.flush() == tok.decode(ids)
    assert max(widest) < 40


def test_gpt_4o_pre_tokenizer_splits_as_o200k():
    """gpt-oss files name tiktoken's o200k split ("gpt-4o"): words split at case
    changes, contractions kept, numbers in threes without their space, punctuation
    runs with their newlines. Splits worked out by hand from the pattern."""
    from jaxllm.tokenizer import GPT2_PRE  # noqa: PLC0415
    pieces = [w for w, _ in GPT2_PRE["gpt-4o"]().pre_tokenize_str("HelloWorld don't 12345 THE end...\n\nx")]
    # byte-level pieces: Ġ is a space, Ċ a newline
    assert pieces == ["Hello", "World", "Ġdon't", "Ġ", "123", "45", "ĠTHE", "Ġend", "...ĊĊ", "x"]


def test_stop_tokens_of_chat_models_and_of_harmony():
    """A turn-ending control token stops generation though the metadata names only the
    end of sequence (Gemma); gpt-oss's <|end|> closes a message, its reasoning too,
    so there only <|return|> and <|call|> end the turn."""
    from jaxllm.tokenizer import CONTROL, NORMAL, stop_ids  # noqa: PLC0415
    gemma = {"a": 0, "<eos>": 1, "<end_of_turn>": 2}
    assert stop_ids({"tokenizer.ggml.eos_token_id": 1}, gemma, [NORMAL, CONTROL, CONTROL]) == (1, 2)
    assert stop_ids({"tokenizer.ggml.eos_token_id": 1}, gemma, [NORMAL, CONTROL, NORMAL]) == (1,)
    harmony = {"a": 0, "<|end|>": 1, "<|return|>": 2, "<|call|>": 3, "<|endoftext|>": 4}
    md = {"tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 1}
    assert stop_ids(md, harmony, [NORMAL] + [CONTROL] * 4) == (2, 3, 4)


def test_tojson_writes_json_as_hugging_face_does():
    """Templates (gpt-oss's tool definitions) write JSON unescaped for HTML, non-ASCII
    kept, and take json.dumps' arguments."""
    template = "{{ messages[0]['content'] | tojson }}|{{ messages[0]['content'] | tojson(indent=1) }}"
    value = {"a": "<b>&'é"}
    out = render_chat(template, [{"role": "user", "content": value}], add_generation_prompt=False)
    assert out == '{"a": "<b>&\'é"}|{\n "a": "<b>&\'é"\n}'
