"""Data pipeline: packing with segment ids and per-segment positions, loss masks (padding, SFT
assistant-only), the iterator state (resume continues with the next unseen batch), each host's
share, the embedded corpus, and a packed row scoring exactly like its documents run apart."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from hunyuan_jax.data import (
    BATCH_KEYS,
    PackedLoader,
    embedded_corpus,
    encode_chat,
    read_documents,
    texts_for_tokenizer,
    tokenize,
)
from hunyuan_jax.tokenizer import HunyuanTokenizer, SentencePieceTokenizer

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
    from hunyuan_jax.config import ModelConfig
    from hunyuan_jax.state import init_model

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
