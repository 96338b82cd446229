"""Tests for hunyuan_jax.data.tokenizer: reference ids of the original Hunyuan tokenizer,
round trips, special tokens, the chat layout (the released jinja chat_template rendered as
Hugging Face does, and the hand-written fallback), SentencePiece training and dispatch."""

import json
import shutil
import unicodedata
from pathlib import Path

import jinja2
import pytest
from conftest import HY_TINY

from hunyuan_jax.data.tokenizer import (
    CHAT_SPECIAL_TOKENS,
    DEFAULT_SYSTEM_PROMPT,
    SPECIAL_TOKENS,
    HunyuanTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    render_chat,
    render_chat_template,
)
from hunyuan_jax.errors import ConfigError, DataError

DATA = Path(__file__).parent / "data"
HY_DIR = DATA / "hunyuan_tokenizer"
REF = json.loads((HY_TINY / "tokenizer.json").read_text())

ROUND_TRIP = [
    "Hello, world!",
    "  leading and trailing spaces  \n\n\ttabs\r\nCRLF",
    "写一首关于秋天的诗。春眠不觉晓，处处闻啼鸟。",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇨🇳",
    "cafe\u0301 vs café, Å vs A\u030a",  # decomposed forms: NFC changes them
    "mixed 中文 and English 123456789 ½ ① ﬁ",
    "",
]

MESSAGE_SETS = [
    REF["chat"]["messages"],
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course."},
    ],
    [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "system", "content": "mid"},
        {"role": "user", "content": "q2"},
    ],
    [{"role": "assistant", "content": "first"}, {"role": "user", "content": "  写诗\n"}],
    [{"role": "user", "content": "x<|eos|>y"}, {"role": "assistant", "content": ""}],
]

# First message with empty content: the template's `context.update(...)` runs, which Hugging
# Face's immutable sandbox refuses (apply_chat_template raises SecurityError).
EMPTY_FIRST = [
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "r"},
    ],
    [{"role": "user", "content": ""}, {"role": "user", "content": "q"}],
]


@pytest.fixture(scope="module")
def hy():
    return HunyuanTokenizer.from_dir(HY_DIR)  # with tokenizer_config.json's chat_template


@pytest.fixture(scope="module")
def hy_fallback():
    return HunyuanTokenizer(HY_DIR / "hy.tiktoken")  # no chat_template: render_chat


def _stdlib_corpus():
    import collections
    import functools
    import inspect
    import itertools
    import json as json_mod
    import os
    import pathlib
    import re
    import string
    import textwrap

    texts = []
    for mod in (
        string,
        textwrap,
        collections,
        functools,
        itertools,
        json_mod,
        pathlib,
        re,
        os,
        inspect,
    ):
        for obj in [mod, *vars(mod).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                texts.extend(p for p in doc.split("\n\n") if p.strip())
    assert len(texts) > 200
    return texts


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def spt(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"sp_{request.param}")
    return SentencePieceTokenizer.train(
        _stdlib_corpus(), out / "tokenizer", 512, model_type=request.param
    )


# --------------------------------------------------------------------------- Hunyuan reference


@pytest.mark.parametrize("case", REF["cases"], ids=lambda c: repr(c["text"][:20]))
def test_reference_ids(hy, case):
    assert hy.encode(case["text"]) == case["ids"]
    assert hy.encode(case["text"], add_special_tokens=True) == case["ids_with_special"]
    assert hy.decode(case["ids"]) == case["text"]


def test_reference_chat(hy):
    chat = REF["chat"]
    assert hy.apply_chat_template(chat["messages"]) == chat["ids"]
    assert hy.apply_chat_template(chat["messages"], add_generation_prompt=False) == chat["ids"]
    # Explicit system message present -> the default system prompt changes nothing.
    assert (
        hy.apply_chat_template(chat["messages"], system_prompt=DEFAULT_SYSTEM_PROMPT) == chat["ids"]
    )
    # Without one, system_prompt=DEFAULT_SYSTEM_PROMPT reproduces the reference conversation.
    assert (
        hy.apply_chat_template(chat["messages"][1:], system_prompt=DEFAULT_SYSTEM_PROMPT)
        == chat["ids"]
    )


def _segments(enc, special, msgs) -> list[int]:
    """The reference chat (system, user, assistant, user) in the Hunyuan layout, piece by piece:
    <sot> sys <extra_4> user <extra_0> assistant <eos> <sot> user <extra_0>."""
    sot, e0, e4, eos = (
        special[t] for t in ("<|startoftext|>", "<|extra_0|>", "<|extra_4|>", "<|eos|>")
    )
    return [sot, *enc(msgs[0]["content"]), e4, *enc(msgs[1]["content"]), e0] + [
        *enc(msgs[2]["content"]),
        eos,
        sot,
        *enc(msgs[3]["content"]),
        e0,
    ]


def test_chat_layout_by_segments(hy):
    msgs = REF["chat"]["messages"]
    expected = _segments(hy.encode, SPECIAL_TOKENS, msgs)
    assert hy.apply_chat_template(msgs) == expected
    assert hy.decode(expected) == render_chat(msgs)


def test_chat_template_loaded(hy, hy_fallback):
    cfg = json.loads((HY_DIR / "tokenizer_config.json").read_text())
    assert hy.chat_template == cfg["chat_template"]
    assert hy.chat_template_source == str(HY_DIR / "tokenizer_config.json")
    # The original HYTokenizer's defaults plus the config's additional_special_tokens.
    assert hy.special_tokens_map == {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "additional_special_tokens": cfg["additional_special_tokens"],
    }
    assert hy_fallback.chat_template is None


def test_reference_chat_both_paths(hy, hy_fallback):
    """The original tokenizer's chat ids (hy_tiny/tokenizer.json) from the template and from
    the fallback."""
    chat = REF["chat"]
    for tok in (hy, hy_fallback):
        for gen in (True, False):
            assert (
                tok.apply_chat_template(chat["messages"], add_generation_prompt=gen) == chat["ids"]
            )
        assert (
            tok.apply_chat_template(chat["messages"][1:], system_prompt=DEFAULT_SYSTEM_PROMPT)
            == chat["ids"]
        )


@pytest.mark.parametrize("messages", MESSAGE_SETS, ids=range(len(MESSAGE_SETS)))
@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("system", [None, DEFAULT_SYSTEM_PROMPT], ids=["nosys", "sys"])
def test_template_and_fallback_agree(hy, hy_fallback, messages, gen, system):
    text = hy.render_chat(messages, add_generation_prompt=gen, system_prompt=system)
    assert text == hy_fallback.render_chat(
        messages, add_generation_prompt=gen, system_prompt=system
    )
    assert text == render_chat(messages, system_prompt=system)
    ids = hy.apply_chat_template(messages, add_generation_prompt=gen, system_prompt=system)
    assert ids == hy_fallback.apply_chat_template(
        messages, add_generation_prompt=gen, system_prompt=system
    )
    assert ids == hy.encode(text)


@pytest.mark.parametrize("messages", EMPTY_FIRST, ids=range(len(EMPTY_FIRST)))
def test_empty_first_message_hf_refuses(hy, hy_fallback, messages):
    """Where template and fallback differ: Hugging Face's sandbox refuses the template's
    dict.update, so the original code cannot render these; the fallback renders them as the
    template would outside the sandbox."""
    with pytest.raises(DataError, match=r"SecurityError.*'update'") as err:
        hy.apply_chat_template(messages)
    assert "tokenizer_config.json" in str(err.value)
    unsandboxed = jinja2.Environment().from_string(hy.chat_template).render(messages=messages)
    assert render_chat(messages) == unsandboxed
    assert hy_fallback.render_chat(messages) == unsandboxed
    assert unsandboxed.startswith("<|startoftext|>")


def test_render_chat_template_like_hf():
    msgs = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "x"}]
    # trim_blocks / lstrip_blocks, loopcontrols, special-token variables, tojson without
    # escaping non-ASCII or HTML, {% generation %} rendered as its body.
    template = (
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "    {% if m.role == 'assistant' %}\n"
        "{% generation %}{{ m.content | tojson }}{% endgeneration %}\n"
        "        {% break %}\n"
        "    {% endif %}\n"
        "{{ m.role }}:{{ m | tojson }}<&>\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}GEN{% endif %}"
        "{{ tools }}{{ documents }}"
    )
    out = render_chat_template(template, msgs, True, {"bos_token": "<s>"})
    assert out == '<s>\nuser:{"role": "user", "content": "héllo"}<&>\n"x"GENNoneNone'
    out = render_chat_template(template, msgs, False, {"bos_token": "<s>"})
    assert out.endswith('<&>\n"x"NoneNone')
    # kwargs win over the special-token map
    assert (
        render_chat_template(
            "{{ bos_token }}", [], bos_token="B", special_tokens_map={"bos_token": "A"}
        )
        == "B"
    )
    with pytest.raises(jinja2.TemplateError, match="no system"):
        render_chat_template("{{ raise_exception('no system') }}", msgs)
    # The sandbox is immutable: templates cannot mutate what they are given.
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.append(1) }}", msgs)
    # No extension beyond HF's: `do` is not a tag there.
    with pytest.raises(jinja2.TemplateSyntaxError, match="'do'"):
        render_chat_template("{% do messages.append(1) %}", msgs)


def test_custom_template_is_used(tmp_path):
    (tmp_path / "hy.tiktoken").symlink_to((HY_DIR / "hy.tiktoken").resolve())
    cfg = {
        "chat_template": "{% for m in messages %}<|startoftext|>{{ m.role }}\n{{ m.content }}"
        "<|eos|>{% endfor %}{% if add_generation_prompt %}<|startoftext|>assistant\n{% endif %}",
        "bos_token": {"content": "<|bos|>", "lstrip": False},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    assert tok.special_tokens_map["bos_token"] == "<|bos|>"
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.render_chat(msgs) == "<|startoftext|>user\nhi<|eos|><|startoftext|>assistant\n"
    assert tok.render_chat(msgs, add_generation_prompt=False) == "<|startoftext|>user\nhi<|eos|>"
    assert tok.apply_chat_template(msgs) == tok.encode(tok.render_chat(msgs))


def test_bad_chat_template_config(tmp_path):
    (tmp_path / "hy.tiktoken").symlink_to((HY_DIR / "hy.tiktoken").resolve())
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "{% for m in messages %}{{ m }}"}))
    with pytest.raises(ConfigError, match=str(config) + ": chat_template line 1"):
        load_tokenizer(tmp_path)
    config.write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(ConfigError, match="must be a string"):
        load_tokenizer(tmp_path)
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}]}))
    with pytest.raises(ConfigError, match="none named 'default'"):
        load_tokenizer(tmp_path)
    config.write_text(json.dumps({"chat_template": [{"name": "default", "template": "T"}]}))
    assert load_tokenizer(tmp_path).render_chat([]) == "T"
    config.write_text("{not json")
    with pytest.raises(ConfigError, match=str(config)):
        load_tokenizer(tmp_path)


def test_hunyuan_properties(hy):
    assert isinstance(hy, Tokenizer)
    assert hy.vocab_size == 128166
    assert hy.eos_ids == [127960, 127967]  # from generation_config.json
    assert hy.pad_id == 127961
    assert hy.bos_id == 127958
    specials = hy.special_tokens
    assert len(specials) == 209
    assert specials["<|endoftext|>"] == 127957 and specials["<|pad|>"] == 127961
    assert specials["<|extra_0|>"] == 127962 and specials["<|extra_203|>"] == 128165


def test_hunyuan_defaults_without_generation_config(tmp_path):
    (tmp_path / "hy.tiktoken").symlink_to((HY_DIR / "hy.tiktoken").resolve())
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HunyuanTokenizer)
    assert tok.eos_ids == [127960, 127967] and tok.pad_id == 127961


@pytest.mark.parametrize("text", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_hunyuan_round_trip(hy, text):
    ids = hy.encode(text)
    assert all(0 <= i < 127957 for i in ids)
    assert hy.decode(ids) == unicodedata.normalize("NFC", text)


def test_nfc_applied(hy):
    assert hy.encode("cafe\u0301") == hy.encode("café")


def test_special_tokens_in_text(hy):
    for name, idx in SPECIAL_TOKENS.items():
        assert hy.encode(name) == [idx]
        assert hy.decode([idx]) == name
    ids = hy.encode("Hi<|eos|>there<|extra_203|><|pad|>")
    assert ids == hy.encode("Hi") + [127960] + hy.encode("there") + [128165, 127961]
    assert hy.decode(ids) == "Hi<|eos|>there<|extra_203|><|pad|>"
    assert hy.decode(ids, skip_special_tokens=True) == "Hithere"
    # Not a special token: an unknown extra is plain text.
    assert 128166 not in hy.encode("<|extra_204|>")
    assert len(hy.encode("<|extra_204|>")) > 1


def test_decode_out_of_range(hy):
    with pytest.raises(ValueError, match=r"128166.*128166"):
        hy.decode([1, 128166])
    with pytest.raises(ValueError, match=r"-1"):
        hy.decode([-1])


def test_partial_utf8_decodes_with_replacement(hy):
    ids = hy.encode("😀")
    assert len(ids) > 1
    assert "\ufffd" in hy.decode(ids[:1])


# --------------------------------------------------------------------------- errors and dispatch


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "hy.tiktoken")):
        HunyuanTokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer.load(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "hy.tiktoken" in msg and "tokenizer.model" in msg
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_tokenizer(tmp_path / "does_not_exist")


def test_load_tokenizer_dispatch(tmp_path, spt):
    assert isinstance(load_tokenizer(HY_DIR), HunyuanTokenizer)
    assert isinstance(load_tokenizer(HY_DIR / "hy.tiktoken"), HunyuanTokenizer)
    # A directory holding tokenizer.model and the model file itself.
    assert isinstance(load_tokenizer(spt.path.parent), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(spt.path), SentencePieceTokenizer)
    # Any single *.model in a directory.
    shutil.copy(spt.path, tmp_path / "other.model")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode("hello world") == spt.encode("hello world")
    shutil.copy(spt.path, tmp_path / "third.model")
    with pytest.raises(ValueError, match="several"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------- SentencePiece


def test_sentencepiece_specials(spt):
    assert isinstance(spt, Tokenizer)
    assert spt.vocab_size == 512
    specials = spt.special_tokens
    assert set(specials) == set(CHAT_SPECIAL_TOKENS)
    assert spt.bos_id == specials["<|startoftext|>"]
    assert spt.pad_id == specials["<|pad|>"]
    assert spt.eos_ids == [specials["<|eos|>"], specials["<|endoftext|>"]]
    for name, idx in specials.items():
        assert spt.encode(name) == [idx]
        assert spt.decode([idx]) == name
    body = spt.encode("hello")
    assert spt.encode("hello", add_special_tokens=True) == [
        spt.bos_id,
        *body,
        specials["<|endoftext|>"],
    ]


@pytest.mark.parametrize("text", ROUND_TRIP + ["def f(x):\n    return x ** 2  # <|eos|> inline"])
def test_sentencepiece_round_trip(spt, text):
    assert spt.decode(spt.encode(text)) == unicodedata.normalize("NFC", text)


def test_sentencepiece_chat(spt):
    msgs = REF["chat"]["messages"]
    expected = _segments(spt.encode, spt.special_tokens, msgs)
    ids = spt.apply_chat_template(msgs)
    assert ids == expected
    assert spt.decode(ids) == render_chat(msgs)
    assert spt.decode(ids, skip_special_tokens=True) == "".join(m["content"] for m in msgs)


def test_sentencepiece_decode_out_of_range(spt):
    with pytest.raises(ValueError, match=r"512.*512"):
        spt.decode([512])
