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
