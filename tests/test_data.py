"""Data pipeline: packing with segment ids and per-segment positions, loss masks (padding, SFT
assistant-only), the iterator state (resume continues with the next unseen batch), each host's
share, the embedded corpus, a packed row scoring exactly like its documents run apart, and the
refusal of bad data (DataError naming file and line) and of bad batches and seq_len."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from hunyuan_jax.data.corpus import (
    BATCH_KEYS,
    PackedLoader,
    check_batch,
    check_seq_len,
    embedded_corpus,
    encode_chat,
    read_documents,
    texts_for_tokenizer,
    tokenize,
)
from hunyuan_jax.data.tokenizer import HunyuanTokenizer, SentencePieceTokenizer
from hunyuan_jax.errors import ConfigError, DataError

DATA = Path(__file__).parent / "data"

CHATS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course."},
    ],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}],
]


def _docs(lengths, start=1000):
    """Synthetic tokenized documents with distinct ids: doc d is d*start + 0..n-1."""
    return [
        (np.arange(n, dtype=np.int32) + (d + 1) * start, np.ones(n, np.float32))
        for d, n in enumerate(lengths)
    ]


def _segments(row):
    """[(segment id, start, stop)] of a row, padding (id 0) excluded."""
    seg = row["segment_ids"]
    out, start = [], 0
    for i in range(1, len(seg) + 1):
        if i == len(seg) or seg[i] != seg[start]:
            if seg[start] != 0:
                out.append((int(seg[start]), start, i))
            start = i
    return out


def _rows(batch):
    n = batch["inputs"].shape[0] * batch["inputs"].shape[1]
    flat = {k: v.reshape(n, -1) for k, v in batch.items()}
    return [{k: flat[k][r] for k in BATCH_KEYS} for r in range(n)]


def test_packing_segments_positions_targets():
    docs = _docs([5, 40, 3, 17, 90, 2, 33])
    loader = PackedLoader(docs, rows=4, seq_len=16, micro_batches=2, shuffle=False)
    pairs_seen = []
    for _ in range(6):
        batch = next(loader)
        assert set(batch) == set(BATCH_KEYS)
        assert batch["inputs"].shape == (2, 2, 16) and batch["inputs"].dtype == np.int32
        for row in _rows(batch):
            segs = _segments(row)
            assert [s for s, _, _ in segs] == list(range(1, len(segs) + 1))  # 1, 2, ...
            assert segs[-1][2] == 16  # packed rows have no padding
            for _, lo, hi in segs:
                np.testing.assert_array_equal(row["positions"][lo:hi], np.arange(hi - lo))
                # targets are the next token of the same document, within the segment
                np.testing.assert_array_equal(
                    row["targets"][lo : hi - 1], row["inputs"][lo + 1 : hi]
                )
                assert np.all(row["targets"][lo:hi] // 1000 == row["inputs"][lo:hi] // 1000)
                assert np.all(row["targets"][lo:hi] == row["inputs"][lo:hi] + 1)
                pairs_seen += list(zip(row["inputs"][lo:hi], row["targets"][lo:hi]))
            assert np.all(row["loss_mask"] == 1.0)
    # In order, every (input, target) pair of every document exactly once per epoch.
    expected = [(a, a + 1) for ids, _ in docs for a in ids[:-1]]
    epochs = -(-len(pairs_seen) // len(expected))
    assert len(pairs_seen) > 2 * len(expected)
    assert pairs_seen == (expected * epochs)[: len(pairs_seen)]


def test_unpacked_rows_pad_and_mask():
    docs = _docs([5, 40, 3])
    loader = PackedLoader(docs, rows=3, seq_len=16, shuffle=False, pack=False, pad_id=7)
    rows = _rows(next(loader))
    for row, (ids, _) in zip(rows, docs):
        used = min(len(ids) - 1, 16)
        assert np.all(row["segment_ids"][:used] == 1) and np.all(row["segment_ids"][used:] == 0)
        assert np.all(row["loss_mask"][:used] == 1) and np.all(row["loss_mask"][used:] == 0)
        assert np.all(row["inputs"][used:] == 7)
        np.testing.assert_array_equal(row["inputs"][:used], ids[:used])


def test_resume_continues_with_next_unseen_batch():
    docs = _docs([7, 50, 3, 21, 64, 9, 13, 30])
    a = PackedLoader(docs, rows=2, seq_len=16, micro_batches=1, seed=3, shuffle=True)
    for _ in range(9):  # crosses an epoch boundary (shuffled order per epoch)
        next(a)
    state = json.loads(json.dumps(a.state()))  # as the checkpoint stores it
    expected = [next(a) for _ in range(20)]
    b = PackedLoader(docs, rows=2, seq_len=16, micro_batches=1, seed=3, shuffle=True)
    b.restore(state)
    for want in expected:
        got = next(b)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(got[k], want[k])
    assert a.state()["epoch"] >= 1


def test_hosts_read_disjoint_shares(tmp_path):
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(11)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[6:]) + "\n")
    (tmp_path / "c.txt").write_text("a whole text file")
    shares = [read_documents(str(tmp_path), "auto", "text", p, 3)[0] for p in range(3)]
    everything = read_documents(str(tmp_path), "auto", "text", 0, 1)[0]
    assert sorted(sum(shares, [])) == sorted(everything)
    assert len(everything) == 12 and all(len(s) == 4 for s in shares)
    assert not set(shares[0]) & set(shares[1])


def test_embedded_corpus_deterministic():
    a, b = embedded_corpus(200_000), embedded_corpus(200_000)
    assert a == b and sum(map(len, a)) == 200_000 and len(a) > 1
    assert "def " in "".join(a)


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    texts = texts_for_tokenizer(embedded_corpus(150_000), "text", 150_000)
    return SentencePieceTokenizer.train(texts, tmp_path_factory.mktemp("sp") / "tok", 600)


@pytest.fixture(scope="module")
def hy_tokenizer():
    return HunyuanTokenizer.from_dir(DATA / "hunyuan_tokenizer")


@pytest.mark.parametrize("which", ["sp", "hunyuan"])
def test_sft_loss_only_on_assistant_tokens(which, sp_tokenizer, hy_tokenizer, tmp_path):
    tok = sp_tokenizer if which == "sp" else hy_tokenizer
    eos = tok.special_tokens["<|eos|>"]
    for messages in CHATS:
        ids, weights = encode_chat(tok, messages)
        # Per-message encoding equals encoding the whole rendered conversation.
        assert ids.tolist() == tok.apply_chat_template(messages)
        # The weighted tokens are exactly the assistant replies, each closed by <|eos|>.
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        weighted = ids[weights == 1].tolist()
        assert tok.decode(weighted) == "<|eos|>".join(replies) + "<|eos|>"
        assert weighted.count(eos) == len(replies)
        assert ids[weights == 0].tolist().count(eos) == 0
    # Through the JSONL reader and the packer: loss_mask marks assistant targets only.
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    docs, kind = read_documents(str(path))
    assert kind == "chat"
    encoded = tokenize(tok, docs, kind)
    total = sum(len(ids) - 1 for ids, _ in encoded)
    loader = PackedLoader(encoded, rows=1, seq_len=total, shuffle=False)
    row = _rows(next(loader))[0]
    targets_weighted = row["targets"][row["loss_mask"] == 1].tolist()
    expected = sum((ids[1:][w[1:] == 1].tolist() for ids, w in encoded), [])
    assert targets_weighted == expected
    assert tok.decode(targets_weighted).count("<|eos|>") == 3
    first_user_prompt = encoded[0][0][: np.argmax(encoded[0][1] == 1)]
    assert tok.decode(first_user_prompt.tolist()).endswith("<|extra_0|>")


def test_packed_row_scores_like_separate_documents():
    """Segment ids + per-segment positions: each document's logits in a packed row equal the
    logits of that document alone (attention never crosses a boundary)."""
    from hunyuan_jax.model.config import ModelConfig
    from hunyuan_jax.model.state import init_model

    cfg = ModelConfig.from_yaml(Path(__file__).parent.parent / "configs" / "tiny.yaml")
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    docs = [
        (rng.integers(1, cfg.vocab_size, 11).astype(np.int32), np.ones(11, np.float32))
        for _ in range(3)
    ]
    loader = PackedLoader(docs, rows=1, seq_len=30, shuffle=False)
    row = _rows(next(loader))[0]
    assert [hi - lo for _, lo, hi in _segments(row)] == [10, 10, 10]
    fwd = jax.jit(lambda m, t, p, s: m(t, p, s)[0])
    packed = fwd(model, row["inputs"][None], row["positions"][None], row["segment_ids"][None])[0]
    alone = fwd(model, np.stack([ids[:10] for ids, _ in docs]), None, None)
    for (_, lo, hi), one in zip(_segments(row), alone):
        np.testing.assert_allclose(packed[lo:hi], one, atol=2e-5)


def test_sft_template_and_fallback_give_the_same_ids(hy_tokenizer):
    fallback = HunyuanTokenizer(DATA / "hunyuan_tokenizer" / "hy.tiktoken")
    assert hy_tokenizer.chat_template is not None and fallback.chat_template is None
    for messages in CHATS:
        ids, weights = encode_chat(hy_tokenizer, messages)
        ids_fb, weights_fb = encode_chat(fallback, messages)
        np.testing.assert_array_equal(ids, ids_fb)
        np.testing.assert_array_equal(weights, weights_fb)


def test_sft_with_a_template_not_split_at_special_tokens(tmp_path):
    """A template whose message boundaries are plain text: the per-message ids are checked
    against encoding the whole conversation, and weights mark the assistant increments."""
    (tmp_path / "hy.tiktoken").symlink_to((DATA / "hunyuan_tokenizer" / "hy.tiktoken").resolve())
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = HunyuanTokenizer.from_dir(tmp_path)
    messages = CHATS[0]
    ids, weights = encode_chat(tok, messages)
    assert ids.tolist() == tok.apply_chat_template(messages, add_generation_prompt=False)
    assert tok.decode(ids[weights == 1].tolist()) == "assistant: 4.\nassistant: 6, of course.\n"
    # A template that rewrites earlier turns is not prefix-stable: refused, naming the record.
    late = "{% for m in messages %}{{ m.content if loop.last else '.' }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": late}))
    tok = HunyuanTokenizer.from_dir(tmp_path)
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    docs, kind = read_documents(str(path))
    with pytest.raises(DataError, match=rf"{path}:1: chat template is not prefix-stable"):
        tokenize(tok, docs, kind)


def test_sft_conversation_the_template_cannot_render(hy_tokenizer, tmp_path):
    """An empty first message: the released template fails under Hugging Face's sandbox."""
    path = tmp_path / "sft.jsonl"
    good = {"messages": CHATS[1]}
    bad = {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "r"},
        ]
    }
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    docs, kind = read_documents(str(path))
    with pytest.raises(DataError, match=rf"{path}:3: chat template .*SecurityError"):
        tokenize(hy_tokenizer, docs, kind)


def _write(path: Path, lines) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


OK_CHAT = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]

BAD_CHATS = [
    ({"messages": []}, "'messages' must be a non-empty list of messages, got an empty list"),
    ({"messages": "hi"}, "'messages' must be a non-empty list of messages, got a string"),
    ({"messages": None}, "'messages' must be a non-empty list of messages, got null"),
    ({"messages": [["user", "q"]]}, "message 0 must be an object, got an array"),
    ({"messages": [{"content": "q"}]}, "message 0 has no 'role'"),
    (
        {"messages": [OK_CHAT[0], {"role": "Assistant", "content": "a"}]},
        "message 1 has role 'Assistant'; expected one of 'system', 'user', 'assistant'",
    ),
    (
        {"messages": [{"role": "human", "content": "q"}, OK_CHAT[1]]},
        "message 0 has role 'human'",
    ),
    ({"messages": [OK_CHAT[0], {"role": "gpt", "content": "a"}]}, "message 1 has role 'gpt'"),
    (
        {"messages": [OK_CHAT[0], {"role": "assistant"}]},
        r"message 1 \(assistant\) has no 'content'",
    ),
    (
        {"messages": [{"role": "user", "content": 3}, OK_CHAT[1]]},
        r"message 0 \(user\): 'content' must be a string, got a number",
    ),
    (
        {"messages": [OK_CHAT[0], {"role": "assistant", "content": None}]},
        r"message 1 \(assistant\): 'content' must be a string, got null",
    ),
    (
        {"messages": [OK_CHAT[0], {"role": "assistant", "content": [{"text": "a"}]}]},
        r"message 1 \(assistant\): 'content' must be a string, got an array",
    ),
    (
        {"messages": [{"role": "system", "content": "s"}, OK_CHAT[0]]},
        r"conversation has no assistant message \(it would contribute no loss tokens\)",
    ),
    ({"conversation": OK_CHAT}, "chat record without 'messages'"),
]


@pytest.mark.parametrize("record,message", BAD_CHATS, ids=range(len(BAD_CHATS)))
def test_bad_chat_records(tmp_path, record, message):
    path = _write(tmp_path / "sft.jsonl", [{"messages": OK_CHAT}, "", record])
    with pytest.raises(DataError, match=f"^{path}:3: {message}"):
        read_documents(path, "chat")
    if "messages" in record:  # auto-detected as chat data too
        with pytest.raises(DataError, match=f"^{path}:3: {message}"):
            read_documents(path, "auto")


def test_good_chat_records_know_their_line(tmp_path):
    full = [{"role": "system", "content": ""}, *OK_CHAT, {"role": "user", "content": ""}]
    path = _write(tmp_path / "sft.jsonl", ["", {"messages": OK_CHAT}, {"messages": full}])
    docs, kind = read_documents(path)
    assert kind == "chat" and docs == [OK_CHAT, full]
    assert [d.source for d in docs] == [f"{path}:2", f"{path}:3"]


BAD_TEXT = [
    ({"text": 3}, "field 'text' must be a string, got a number"),
    ({"text": 2.5}, "field 'text' must be a string, got a number"),
    ({"text": None}, "field 'text' must be a string, got null"),
    ({"text": ["a", "b"]}, "field 'text' must be a string, got an array"),
    ({"text": {"a": 1}}, "field 'text' must be a string, got an object"),
    ({"text": True}, "field 'text' must be a string, got a boolean"),
    ({"body": "x"}, "no 'text' field"),
    ('{"text": "unterminated', "invalid JSON: "),
    ("not json at all", "invalid JSON: "),
    ('["text"]', "expected a JSON object, got an array"),
    ('"text"', "expected a JSON object, got a string"),
    ({"messages": OK_CHAT}, r"a chat record in text data \(the first record, .*:1, is text\)"),
]


@pytest.mark.parametrize("record,message", BAD_TEXT, ids=range(len(BAD_TEXT)))
def test_bad_text_records(tmp_path, record, message):
    path = _write(tmp_path / "d.jsonl", [{"text": "fine"}, "", "  ", record, {"text": "x"}])
    with pytest.raises(DataError, match=f"^{path}:4: {message}"):
        read_documents(path)


def test_text_field_and_formats(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"body": "one"}, {"body": 2}])
    with pytest.raises(DataError, match=f"^{path}:2: field 'body' must be a string"):
        read_documents(path, "jsonl", "body")
    # An explicit format: a text record in chat data, a chat record in text data.
    path = _write(tmp_path / "e.jsonl", [{"messages": OK_CHAT}, {"text": "t"}])
    with pytest.raises(DataError, match=f"^{path}:2: chat record without 'messages'"):
        read_documents(path, "chat")
    with pytest.raises(DataError, match=f"^{path}:1: no 'text' field"):
        read_documents(path, "jsonl")
    # Chat data then a plain-text file (auto): refused, naming the file.
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "a.jsonl", [{"messages": OK_CHAT}])
    (tmp_path / "sub" / "b.txt").write_text("plain text")
    with pytest.raises(DataError, match=r"sub/b.txt: a text record in chat data"):
        read_documents(str(tmp_path / "sub"))


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=f"^{path}:2: not UTF-8 text"):
        read_documents(str(path))
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xff\xfe text")
    with pytest.raises(DataError, match=f"^{path}: not UTF-8 text"):
        read_documents(str(path))


def test_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("a document")
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(DataError, match=f"^{tmp_path / 'b.jsonl'}: empty data file$"):
        read_documents(str(tmp_path))
    (tmp_path / "b.jsonl").write_text("\n  \n\n")
    with pytest.raises(DataError, match=f"^{tmp_path / 'b.jsonl'}: empty data file"):
        read_documents(str(tmp_path))
    (tmp_path / "b.jsonl").unlink()
    (tmp_path / "c.txt").write_text(" \n\t")
    with pytest.raises(DataError, match=f"^{tmp_path / 'c.txt'}: empty data file"):
        read_documents(str(tmp_path))
    # An empty file is refused on every host, even when its documents are another host's.
    (tmp_path / "c.txt").write_text("")
    for p in range(2):
        with pytest.raises(DataError, match=f"^{tmp_path / 'c.txt'}: empty data file"):
            read_documents(str(tmp_path), process_index=p, process_count=2)
    with pytest.raises(DataError, match="nothing matches"):
        read_documents(str(tmp_path / "missing" / "*.jsonl"))


def test_no_usable_document(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"text": ""}, {"text": " \n "}])
    b = _write(tmp_path / "b.jsonl", [{"text": "\t"}])
    with pytest.raises(DataError, match="no usable document") as err:
        read_documents(str(tmp_path))
    assert a in str(err.value) and b in str(err.value)
    assert "3 records with empty 'text' skipped" in str(err.value)
    # Empty texts are skipped, the others kept.
    _write(tmp_path / "b.jsonl", [{"text": ""}, {"text": "kept"}])
    assert read_documents(str(tmp_path)) == (["kept"], "text")
    # One record, two hosts: process 1 has nothing to train on.
    c = _write(tmp_path / "c.jsonl", [{"text": "only one"}])
    assert read_documents(c, process_index=0, process_count=2) == (["only one"], "text")
    with pytest.raises(DataError, match=f"^{c}: no usable document for process 1 of 2 in {c}$"):
        read_documents(c, process_index=1, process_count=2)


class _ByteTokenizer:
    """Bytes as ids, no special tokens: enough for tokenize's text path."""

    special_tokens: dict = {}

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())


def test_no_input_target_pairs():
    with pytest.raises(DataError, match="none of the 2 text documents has 2 tokens or more"):
        tokenize(_ByteTokenizer(), ["a", "b"], "text")
    assert len(tokenize(_ByteTokenizer(), ["a", "bc"], "text")) == 1
    with pytest.raises(DataError, match="no .input, target. pair"):
        PackedLoader([], rows=1, seq_len=8)
    with pytest.raises(DataError, match="none of the 2 documents"):
        PackedLoader(_docs([1, 1]), rows=1, seq_len=8)


def test_check_batch():
    loader = PackedLoader(_docs([5, 9]), rows=2, seq_len=4, micro_batches=2, shuffle=False)
    batch = next(loader)
    assert check_batch(batch, 7) == 8.0
    batch["loss_mask"][:] = 0
    with pytest.raises(
        DataError, match=r"^step 7: the batch has no loss tokens \(loss_mask \[2x1x4\]"
    ):
        check_batch(batch, 7)


def test_check_seq_len():
    check_seq_len(4096, 4096, False)
    check_seq_len(8192, 4096, True)
    with pytest.raises(
        ConfigError, match="seq_len 4097 exceeds the model's max_position_embeddings 4096"
    ):
        check_seq_len(4097, 4096, False)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="seq_len must be a positive integer"):
            check_seq_len(bad, 4096, True)
