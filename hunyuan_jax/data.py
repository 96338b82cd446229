"""Training data: documents -> token ids -> fixed-length packed rows with segment ids.

* Sources: text files (one document per file), JSONL (`text` field, or chat `messages` for SFT),
  or the embedded default corpus (the Python standard library's own source files, read from
  `sysconfig.get_paths()['stdlib']` in sorted order: no download, deterministic).
* Each host keeps only its share of the documents (document i goes to process i % count) and
  builds its own rows of the global batch (`jax.make_array_from_process_local_data` assembles
  them).
* Packing: a document of n tokens gives n - 1 (input, target) pairs; pairs are laid into rows
  back to back. Every piece of a document placed in a row is a segment with its own id
  (1, 2, ... per row; 0 = padding) and positions restarting at 0, so attention never crosses a
  boundary and every target is the next token of the same document. loss_mask is 0 on padding
  and, for chat data, on everything but assistant tokens.
* The iterator state (epoch, document cursor, offset in the document) is a small dict that the
  checkpoint stores; restoring it continues with the next unseen batch.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hunyuan_jax.tokenizer import Tokenizer, render_chat

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


# ----------------------------------------------------------------------------- sources
def embedded_corpus(max_bytes: int = 4_000_000) -> list[str]:
    """Python standard-library modules' source text (top-level *.py files, sorted by name) up
    to `max_bytes` characters: a corpus that ships with every Python installation."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if total + len(text) > max_bytes:
            text = text[: max_bytes - total]
        docs.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    if not docs:
        raise RuntimeError(f"embedded corpus: no Python sources found under {stdlib}")
    return docs


def _expand(spec: str) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file() and f.suffix in (".txt", ".md", ".jsonl", ".json", ".py")
        )
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not files:
        raise FileNotFoundError(f"training data: nothing matches {spec!r}")
    return files


def read_documents(
    spec: str,
    fmt: str = "auto",
    text_field: str = "text",
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[list, str]:
    """This host's share of the documents of `spec` and their kind ('text' or 'chat').

    Documents are numbered across all files in sorted order; process p keeps those with
    index % process_count == p (JSONL lines of other hosts are skipped without parsing).
    """
    files = _expand(spec)
    kind = "chat" if fmt == "chat" else "text"
    docs, index = [], 0
    for f in files:
        jsonl = f.suffix in (".jsonl", ".json") or fmt in ("jsonl", "chat")
        if not jsonl:
            if index % process_count == process_index:
                docs.append(f.read_text(encoding="utf-8"))
            index += 1
            continue
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                mine = index % process_count == process_index
                index += 1
                if not mine:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{lineno}: invalid JSON: {e}") from e
                if fmt == "auto" and "messages" in rec:
                    kind = "chat"
                if kind == "chat":
                    if "messages" not in rec:
                        raise ValueError(f"{f}:{lineno}: chat record without 'messages'")
                    docs.append(rec["messages"])
                else:
                    if text_field not in rec:
                        raise ValueError(f"{f}:{lineno}: no {text_field!r} field")
                    docs.append(rec[text_field])
    return docs, kind


# ----------------------------------------------------------------------------- tokenization
def encode_text(tok: Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """A pre-training document: <|startoftext|> text <|endoftext|>; every token is a target."""
    ids = np.asarray(tok.encode(text, add_special_tokens=True), np.int32)
    return ids, np.ones(len(ids), np.float32)


def encode_chat(
    tok: Tokenizer, messages: Sequence[Mapping[str, str]]
) -> tuple[np.ndarray, np.ndarray]:
    """An SFT conversation in the Hunyuan chat layout; weight 1 only on assistant tokens (their
    text and the closing <|eos|>), so the loss is taken on what the assistant says.

    Each message is rendered as the template's increment (the template is prefix-stable) and
    encoded separately; the increments end in special tokens, which delimit tokenization, so the
    ids equal those of encoding the whole rendered conversation.
    """
    ids, weights, prev = [], [], ""
    for i, m in enumerate(messages):
        text = render_chat(messages[: i + 1])
        if not text.startswith(prev):
            raise ValueError("chat template is not prefix-stable for this conversation")
        piece = tok.encode(text[len(prev) :])
        ids += piece
        weights += [1.0 if m.get("role") == "assistant" else 0.0] * len(piece)
        prev = text
    return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


def tokenize(tok: Tokenizer, docs: Sequence, kind: str) -> list[tuple[np.ndarray, np.ndarray]]:
    enc = encode_chat if kind == "chat" else encode_text
    out = [enc(tok, d) for d in docs]
    return [d for d in out if len(d[0]) >= 2]


# ----------------------------------------------------------------------------- packing
@dataclass
class LoaderState:
    epoch: int = 0
    cursor: int = 0  # index into this epoch's document order
    offset: int = 0  # (input, target) pairs of the current document already emitted

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset}


class PackedLoader:
    """Infinite iterator of this host's batches: dict of int32/float32 arrays shaped
    [micro_batches, rows // micro_batches, seq_len] (keys BATCH_KEYS).

    rows: this host's rows per optimizer step (global batch_size / process_count).
    """

    def __init__(
        self,
        docs: Sequence[tuple[np.ndarray, np.ndarray]],
        rows: int,
        seq_len: int,
        micro_batches: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        pack: bool = True,
        pad_id: int = 0,
    ):
        if not docs:
            raise ValueError("no documents with at least 2 tokens to train on")
        if rows % micro_batches:
            raise ValueError(
                f"rows per host ({rows}) not divisible by micro_batches ({micro_batches})"
            )
        self.docs = list(docs)
        self.rows, self.seq_len, self.micro = rows, seq_len, micro_batches
        self.seed, self.shuffle, self.pack, self.pad_id = seed, shuffle, pack, pad_id
        self.st = LoaderState()
        self._order_epoch, self._order = -1, None

    # state ------------------------------------------------------------------------------
    def state(self) -> dict:
        return self.st.to_dict()

    def restore(self, state: Mapping[str, int]) -> None:
        self.st = LoaderState(int(state["epoch"]), int(state["cursor"]), int(state["offset"]))

    def _doc(self) -> tuple[np.ndarray, np.ndarray]:
        if self._order_epoch != self.st.epoch:
            n = len(self.docs)
            self._order = (
                np.random.default_rng([self.seed, self.st.epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._order_epoch = self.st.epoch
        return self.docs[self._order[self.st.cursor]]

    def _advance_doc(self) -> None:
        self.st.offset = 0
        self.st.cursor += 1
        if self.st.cursor == len(self.docs):
            self.st.cursor, self.st.epoch = 0, self.st.epoch + 1

    # rows -------------------------------------------------------------------------------
    def _row(self) -> dict[str, np.ndarray]:
        s = self.seq_len
        row = {
            "inputs": np.full(s, self.pad_id, np.int32),
            "targets": np.full(s, self.pad_id, np.int32),
            "positions": np.zeros(s, np.int32),
            "segment_ids": np.zeros(s, np.int32),
            "loss_mask": np.zeros(s, np.float32),
        }
        fill, seg = 0, 0
        while fill < s:
            ids, weights = self._doc()
            pairs = len(ids) - 1
            take = min(pairs - self.st.offset, s - fill)
            lo = self.st.offset
            seg += 1
            row["inputs"][fill : fill + take] = ids[lo : lo + take]
            row["targets"][fill : fill + take] = ids[lo + 1 : lo + take + 1]
            row["loss_mask"][fill : fill + take] = weights[lo + 1 : lo + take + 1]
            row["positions"][fill : fill + take] = np.arange(take, dtype=np.int32)
            row["segment_ids"][fill : fill + take] = seg
            fill += take
            self.st.offset += take
            if not self.pack:  # one document per row: the rest of the row is padding
                self._advance_doc()
                break
            if self.st.offset == pairs:
                self._advance_doc()
        return row

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._row() for _ in range(self.rows)]
        shape = (self.micro, self.rows // self.micro, self.seq_len)
        return {k: np.stack([r[k] for r in rows]).reshape(shape) for k in BATCH_KEYS}


# ----------------------------------------------------------------------------- global batches
def batch_sharding(mesh, rules):
    """NamedSharding of a [micro, rows, seq] batch array: rows over the rules' batch axes."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sharding.rules import logical_to_spec

    spec = logical_to_spec(("batch",), rules, mesh=mesh)
    return NamedSharding(mesh, P(None, *spec, None))


def to_global(local: Mapping[str, np.ndarray], sharding, global_rows: int):
    """This host's rows -> global jax.Arrays [micro, global_rows // micro, seq]."""
    import jax

    out = {}
    for k, v in local.items():
        shape = (v.shape[0], global_rows // v.shape[0], v.shape[2])
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out


def gather_states(state: Mapping[str, int]) -> dict[str, dict]:
    """Every host's loader state, keyed by process index (identical on every host)."""
    import jax

    if jax.process_count() == 1:
        return {"0": dict(state)}
    from jax.experimental import multihost_utils

    local = np.asarray([state["epoch"], state["cursor"], state["offset"]], np.int64)
    everything = np.asarray(multihost_utils.process_allgather(local))  # [processes, 3]
    return {
        str(p): {"epoch": int(e), "cursor": int(c), "offset": int(o)}
        for p, (e, c, o) in enumerate(everything)
    }


def texts_for_tokenizer(docs: Iterable, kind: str, max_bytes: int) -> list[str]:
    """Training sentences for SentencePiece: lines of the documents, up to max_bytes."""
    out, total = [], 0
    for d in docs:
        text = render_chat(d) if kind == "chat" else d
        for line in text.splitlines(keepends=True):
            if total >= max_bytes:
                return out
            if line.strip():
                out.append(line)
                total += len(line)
    return out
