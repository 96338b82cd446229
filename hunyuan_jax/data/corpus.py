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
import itertools
import json
import sysconfig
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from hunyuan_jax.data.tokenizer import Tokenizer, render_chat
from hunyuan_jax.errors import ConfigError, DataError

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
        raise DataError(f"training data: nothing matches {spec!r}")
    return files


CHAT_ROLES = ("system", "user", "assistant")


class Conversation(list):
    """A chat document: its messages (a list), plus `source` ("file:line") for errors."""

    def __init__(self, messages: Iterable[Mapping[str, str]] = (), source: str = ""):
        super().__init__(messages)
        self.source = source


def _json_type(value) -> str:
    """'an object', 'an array', 'a string', 'a number', 'a boolean' or 'null'."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    kinds = {dict: "an object", list: "an array", str: "a string", type(None): "null"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def check_messages(messages, where: str) -> Conversation:
    """A validated SFT conversation; `DataError` (message starting with `where`) unless
    `messages` is a non-empty list of objects, each with a `role` in CHAT_ROLES (exact
    spelling) and a string `content`, with at least one assistant message (a conversation
    without one would contribute no loss tokens)."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else _json_type(messages)
        raise DataError(f"{where}: 'messages' must be a non-empty list of messages, got {got}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} must be an object, got {_json_type(m)}")
        if "role" not in m:
            raise DataError(f"{where}: message {i} has no 'role'")
        if m["role"] not in CHAT_ROLES:
            raise DataError(
                f"{where}: message {i} has role {m['role']!r}; expected one of "
                + ", ".join(map(repr, CHAT_ROLES))
            )
        if "content" not in m:
            raise DataError(f"{where}: message {i} ({m['role']}) has no 'content'")
        if not isinstance(m["content"], str):
            raise DataError(
                f"{where}: message {i} ({m['role']}): 'content' must be a string, "
                f"got {_json_type(m['content'])}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: conversation has no assistant message (it would contribute no loss tokens)"
        )
    return Conversation(messages, where)


def _names(files: Sequence[Path], limit: int = 5) -> str:
    shown = ", ".join(str(f) for f in files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def jsonl_records(path: Path, index: Iterator[int], process_index: int, process_count: int):
    """Yields (`file:line`, parsed JSON value) for this host's records of one JSONL file: blank
    lines are skipped, every record draws the next number from `index` (shared across files)
    and process p keeps those with number % process_count == p. DataError (file:line) for text
    that is not UTF-8 or not JSON, and for a file with only blank lines."""
    records = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            records += 1
            if next(index) % process_count != process_index:
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text: {e}") from e
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e}") from e
            yield where, rec
    if not records:
        raise DataError(f"{path}: empty data file (only blank lines)")


def read_documents(
    spec: str,
    fmt: str = "auto",
    text_field: str = "text",
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[list, str]:
    """This host's share of the documents of `spec` and their kind ('text' or 'chat').

    Documents are numbered across all files in sorted order; process p keeps those with
    index % process_count == p (JSONL lines of other hosts are skipped without parsing, so each
    host checks its own records). Text documents are strings; chat documents are
    `Conversation`s (lists of messages that know their "file:line").

    `DataError` (naming the file, and the line for JSONL) for: no file matching `spec`; an
    empty file (0 bytes, or only whitespace / blank lines); text that is not UTF-8; a JSONL
    line that is not JSON or not a JSON object; a text record without `text_field` or whose
    value is not a string; a chat record without `messages` or failing `check_messages`; with
    fmt="auto", records of both kinds (the first record decides); no usable document in this
    host's share. Records whose text is empty or only whitespace are skipped.
    """
    files = _expand(spec)
    kind = {"chat": "chat", "jsonl": "text", "text": "text"}.get(fmt)  # None: the data decide
    first = None  # where the data decided the kind (fmt="auto")
    docs, index, skipped = [], itertools.count(), 0

    def decide(rec_kind: str, where: str) -> None:
        nonlocal kind, first
        if kind is None:
            kind, first = rec_kind, where
        elif fmt == "auto" and rec_kind != kind:
            raise DataError(
                f"{where}: a {rec_kind} record in {kind} data (the first record, {first}, is "
                f"{kind}); set data_format to 'chat' or 'text'"
            )

    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: empty data file")
        jsonl = f.suffix in (".jsonl", ".json") or fmt in ("jsonl", "chat")
        if not jsonl:  # one document per file
            if next(index) % process_count != process_index:
                continue
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text: {e}") from e
            if not text.strip():
                raise DataError(f"{f}: empty data file (only whitespace)")
            decide("text", str(f))
            docs.append(text)
            continue
        for where, rec in jsonl_records(f, index, process_index, process_count):
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {_json_type(rec)}")
            decide("chat" if "messages" in rec else "text", where)
            if kind == "chat":
                if "messages" not in rec:
                    raise DataError(f"{where}: chat record without 'messages'")
                docs.append(check_messages(rec["messages"], where))
                continue
            if text_field not in rec:
                raise DataError(f"{where}: no {text_field!r} field")
            text = rec[text_field]
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: field {text_field!r} must be a string, got {_json_type(text)}"
                )
            if not text.strip():
                skipped += 1
                continue
            docs.append(text)
    if not docs:
        share = f" for process {process_index} of {process_count}" if process_count > 1 else ""
        note = f" ({skipped} records with empty {text_field!r} skipped)" if skipped else ""
        raise DataError(f"{spec}: no usable document{share} in {_names(files)}{note}")
    return docs, kind or "text"


# ----------------------------------------------------------------------------- tokenization
def encode_text(tok: Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """A pre-training document: <|startoftext|> text <|endoftext|>; every token is a target."""
    ids = np.asarray(tok.encode(text, add_special_tokens=True), np.int32)
    return ids, np.ones(len(ids), np.float32)


def encode_chat(
    tok: Tokenizer, messages: Sequence[Mapping[str, str]]
) -> tuple[np.ndarray, np.ndarray]:
    """An SFT conversation in the tokenizer's chat format (its chat_template as Hugging Face
    renders it with add_generation_prompt=False, else the Hunyuan layout); weight 1 only on
    assistant tokens (their text and the closing <|eos|>), so the loss is taken on what the
    assistant says.

    Each message is rendered as the template's increment (rendering a prefix of the
    conversation must give a prefix of the whole rendering) and encoded separately. The ids
    equal those of encoding the whole rendered conversation: increments that start right after
    a special token are delimited by it; otherwise the whole text is encoded to check.
    DataError if the template is not prefix-stable or the two encodings differ.
    """
    specials = tuple(tok.special_tokens)
    ids, weights, prev, check = [], [], "", False
    for i, m in enumerate(messages):
        text = tok.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(prev):
            raise DataError(
                f"chat template is not prefix-stable for this conversation (message {i} "
                "changes the rendering of the messages before it)"
            )
        check = check or (prev != "" and not prev.endswith(specials))
        piece = tok.encode(text[len(prev) :])
        ids += piece
        weights += [1.0 if m.get("role") == "assistant" else 0.0] * len(piece)
        prev = text
    if check and tok.encode(prev) != ids:
        raise DataError(
            "chat template: encoding the messages one by one differs from encoding the whole "
            "conversation (a message boundary is not at a special token)"
        )
    return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


def tokenize(tok: Tokenizer, docs: Sequence, kind: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encoded documents (ids, weights), without those shorter than 2 tokens. DataError for a
    conversation the chat format cannot render (naming its file:line), or when no document
    yields an (input, target) pair."""
    enc = encode_chat if kind == "chat" else encode_text
    out = []
    for i, d in enumerate(docs):
        try:
            out.append(enc(tok, d))
        except DataError as e:
            where = getattr(d, "source", "") or f"{kind} document {i} of this host"
            raise DataError(f"{where}: {e}") from e
    kept = [d for d in out if len(d[0]) >= 2]
    if not kept:
        raise DataError(
            f"no (input, target) pair to train on: none of the {len(docs)} {kind} documents "
            "has 2 tokens or more"
        )
    return kept


def check_batch(batch: Mapping[str, np.ndarray], step: int) -> float:
    """The number of loss tokens of a host batch (sum of loss_mask); DataError naming `step`
    if it is 0 (the step would train on nothing). With several hosts, each checks its own
    share: sum the returned counts over hosts to judge the global batch instead."""
    n = float(np.sum(batch["loss_mask"]))
    if n == 0:
        shape = "x".join(map(str, np.shape(batch["loss_mask"])))
        raise DataError(
            f"step {step}: the batch has no loss tokens (loss_mask [{shape}] is 0 everywhere), "
            "e.g. chat data whose assistant replies all fall outside these rows"
        )
    return n


def check_seq_len(seq_len: int, max_position_embeddings: int, allow_longer: bool) -> None:
    """ConfigError unless 0 < seq_len <= max_position_embeddings; with `allow_longer`, a longer
    seq_len is accepted (the explicit opt-in to train past the model's trained positions)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
    if seq_len > max_position_embeddings and not allow_longer:
        raise ConfigError(
            f"seq_len {seq_len} exceeds the model's max_position_embeddings "
            f"{max_position_embeddings}; positions past it were never trained "
            "(opt in with --set allow_long_sequences=true to train longer rows anyway)"
        )


# ----------------------------------------------------------------------------- packing
@dataclass
class LoaderState:
    epoch: int = 0
    cursor: int = 0  # index into this epoch's document order
    offset: int = 0  # (input, target) pairs of the current document already emitted

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset}


class ResumableLoader:
    """`state()` / `restore()` of a loader whose position is `self.st` (a LoaderState): what a
    checkpoint saves and an exact resume restores."""

    st: LoaderState

    def state(self) -> dict:
        return self.st.to_dict()

    def restore(self, state: Mapping[str, int]) -> None:
        self.st = LoaderState(int(state["epoch"]), int(state["cursor"]), int(state["offset"]))


def empty_rows(n: int, seq_len: int, pad_id: int, *float_keys: str) -> dict:
    """[n, seq_len] arrays of the BATCH_KEYS (inputs and targets pad_id, the rest 0) and a
    float32 zero array for each of `float_keys` (e.g. a preference or RL row's log-probs)."""
    out = {
        "inputs": np.full((n, seq_len), pad_id, np.int32),
        "targets": np.full((n, seq_len), pad_id, np.int32),
        "positions": np.zeros((n, seq_len), np.int32),
        "segment_ids": np.zeros((n, seq_len), np.int32),
        "loss_mask": np.zeros((n, seq_len), np.float32),
    }
    return out | {k: np.zeros((n, seq_len), np.float32) for k in float_keys}


class PackedLoader(ResumableLoader):
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
        if not any(len(ids) >= 2 for ids, _ in docs):
            raise DataError(
                f"no (input, target) pair to train on: none of the {len(docs)} documents has "
                "2 tokens or more"
            )
        if rows % micro_batches:
            raise ValueError(
                f"rows per host ({rows}) not divisible by micro_batches ({micro_batches})"
            )
        self.docs = list(docs)
        self.rows, self.seq_len, self.micro = rows, seq_len, micro_batches
        self.seed, self.shuffle, self.pack, self.pad_id = seed, shuffle, pack, pad_id
        self.st = LoaderState()
        self._order_epoch, self._order = -1, None

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
def to_global(local: Mapping[str, np.ndarray], sharding, global_rows: int):
    """This host's rows -> global jax.Arrays [micro, global_rows // micro, seq]."""
    out = {}
    for k, v in local.items():
        shape = (v.shape[0], global_rows // v.shape[0], v.shape[2])
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out


def gather_states(state: Mapping[str, int]) -> dict[str, dict]:
    """Every host's loader state, keyed by process index (identical on every host)."""
    if jax.process_count() == 1:
        return {"0": dict(state)}

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
