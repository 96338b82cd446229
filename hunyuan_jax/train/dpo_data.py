"""Preference data for DPO: JSONL pairs -> chat-rendered token rows -> batches of pairs.

A record (one JSON object per line) is a prompt and two assistant replies to it:

    {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "chosen": "...", "rejected": "..."}

`prompt` (a string: one user message) or `messages` (a chat conversation ending with a user
message), and `chosen` / `rejected` (strings: the assistant's next message). Other fields are
ignored. Each reply is appended to the conversation as an assistant message and rendered with
the tokenizer's chat format exactly as SFT renders chat (`data.encode_chat`); the loss mask
(weight 1) covers that last assistant message only (its text and closing tokens), never the
prompt or earlier assistant turns.

Each pair is two rows of `seq_len` (inputs = ids[:-1], targets = ids[1:], padded, one segment),
chosen first: a micro-batch holds rows [chosen 0, rejected 0, chosen 1, rejected 1, ...].
A pair whose chosen or rejected conversation does not fit in a row (more than seq_len + 1
tokens) is dropped and counted (comparing cut responses would compare different things);
no pair left is a DataError. Bad records are `DataError`s naming file:line (exit 3). A pair
whose chosen reply equals its rejected one teaches nothing (its DPO gradient is 0, its margin
always 0): such pairs get one warning line (their count and first file:line), and data in which
no pair differs is a DataError.

`PairLoader` iterates this host's pairs (reshuffled every epoch, deterministic in the seed;
state {epoch, cursor, offset=0} as `data.PackedLoader`'s, stored in the checkpoints) and adds
the pairs' reference log-probabilities (`ref_logp`, see hunyuan_jax/train/dpo.py) to every batch.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hunyuan_jax.data.corpus import (
    BATCH_KEYS,
    Conversation,
    LoaderState,
    _expand,
    _json_type,
    check_messages,
    empty_rows,
    encode_chat,
    jsonl_records,
)
from hunyuan_jax.data.tokenizer import Tokenizer
from hunyuan_jax.errors import DataError

DPO_BATCH_KEYS = (*BATCH_KEYS, "ref_logp")


@dataclass(frozen=True)
class PreferencePair:
    """A prompt conversation and two assistant replies; `source` is "file:line"."""

    messages: tuple  # of {"role", "content"} dicts, ending with a user message
    chosen: str
    rejected: str
    source: str

    def conversation(self, reply: str) -> Conversation:
        return Conversation([*self.messages, {"role": "assistant", "content": reply}], self.source)


def check_record(rec, where: str) -> PreferencePair:
    """A validated preference record; DataError starting with `where` otherwise."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(rec)}")
    if ("prompt" in rec) == ("messages" in rec):
        raise DataError(f"{where}: a preference record needs exactly one of 'prompt' or 'messages'")
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise DataError(f"{where}: no {key!r} field")
        if not isinstance(rec[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {_json_type(rec[key])}")
        if not rec[key].strip():
            raise DataError(f"{where}: {key!r} is empty")
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str):
            raise DataError(f"{where}: 'prompt' must be a string, got {_json_type(rec['prompt'])}")
        messages = [{"role": "user", "content": rec["prompt"]}]
    else:
        messages = rec["messages"]
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            if messages[-1].get("role") != "user":
                raise DataError(
                    f"{where}: 'messages' must end with a user message (the replies follow "
                    f"it), the last one has role {messages[-1].get('role')!r}"
                )
    # the whole chosen conversation is what gets rendered: SFT's checks of a conversation
    check_messages([*messages, {"role": "assistant", "content": rec["chosen"]}], where)
    msgs = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    return PreferencePair(msgs, rec["chosen"], rec["rejected"], where)


def read_pairs(
    spec: str,
    process_index: int = 0,
    process_count: int = 1,
    log: Callable[[str], object] = print,
) -> list[PreferencePair]:
    """This host's share of the preference records of `spec` (a .jsonl file, directory or
    glob): records are numbered across files in sorted order, process p keeps those with
    index % process_count == p. DataError (file:line) for an empty file, invalid JSON, or a
    record `check_record` refuses; DataError if this host gets no pair, or none whose chosen
    and rejected replies differ; a warning line through `log` if some are the same."""
    files = _expand(spec)
    pairs, index = [], itertools.count()
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: empty data file")
        for where, rec in jsonl_records(f, index, process_index, process_count):
            pairs.append(check_record(rec, where))
    share = f" for process {process_index} of {process_count}" if process_count > 1 else ""
    if not pairs:
        raise DataError(f"{spec}: no preference pair{share}")
    same = [p.source for p in pairs if p.chosen == p.rejected]
    if same:
        where = ", ".join(same[:3]) + (f" and {len(same) - 3} more" if len(same) > 3 else "")
        if len(same) == len(pairs):
            raise DataError(
                f"{spec}: 'chosen' equals 'rejected' in every preference pair{share} "
                f"({len(pairs)}: {where}): there is no preference to learn"
            )
        log(
            f"[data] warning: {len(same)} of {len(pairs)} preference pairs{share} have "
            f"'chosen' equal to 'rejected' (nothing to learn from them): {where}"
        )
    return pairs


# ----------------------------------------------------------------------------- encoding
def encode_reply(tok: Tokenizer, pair: PreferencePair, reply: str):
    """(ids, weights) of the conversation + `reply`: weight 1 on the reply's tokens only."""
    prompt_ids, _ = encode_chat(tok, pair.messages)
    ids, weights = encode_chat(tok, pair.conversation(reply))
    n = len(prompt_ids)
    if list(ids[:n]) != list(prompt_ids):
        raise DataError(
            "chat template: the prompt's tokens are not a prefix of the prompt + reply's"
        )
    weights = weights.copy()
    weights[:n] = 0.0
    return ids, weights


@dataclass
class EncodedPairs:
    """This host's pairs as token rows: rows[2i] chosen, rows[2i + 1] rejected of pair i
    (each (inputs, targets, mask) of their own length <= seq_len)."""

    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    sources: list[str]
    dropped: int

    @property
    def num_pairs(self) -> int:
        return len(self.rows) // 2

    def fingerprint(self) -> str:
        """SHA-256 of the token rows (what the reference log-probabilities were taken of)."""
        h = hashlib.sha256()
        for inputs, targets, mask in self.rows:
            for a in (inputs, targets, mask):
                h.update(np.ascontiguousarray(a).tobytes())
                h.update(b"|")
        return h.hexdigest()


def encode_pairs(tok: Tokenizer, pairs: Sequence[PreferencePair], seq_len: int) -> EncodedPairs:
    """Encoded pairs that fit in rows of `seq_len` (the others dropped and counted).
    DataError naming file:line for a pair the chat format cannot render, or if none fits."""
    rows, sources, dropped = [], [], 0
    for p in pairs:
        try:
            enc = [encode_reply(tok, p, r) for r in (p.chosen, p.rejected)]
        except DataError as e:
            raise DataError(f"{p.source}: {e}") from e
        if any(len(ids) - 1 > seq_len for ids, _ in enc):
            dropped += 1
            continue
        for ids, w in enc:
            rows.append((ids[:-1], ids[1:], w[1:]))
        sources.append(p.source)
    if not sources:
        longest = max(len(encode_reply(tok, p, p.chosen)[0]) for p in pairs[:100])
        raise DataError(
            f"no preference pair fits in seq_len={seq_len}: all {len(pairs)} pairs of this "
            f"host are longer (e.g. {longest} tokens, {pairs[0].source}); raise seq_len"
        )
    return EncodedPairs(rows, sources, dropped)


def pack_rows(enc: EncodedPairs, pair_ids, ref, seq_len: int, pad_id: int) -> dict:
    """The rows of pairs `pair_ids` [chosen, rejected, ...] as [len(pair_ids) * 2, seq_len]
    arrays (DPO_BATCH_KEYS). `ref` [num_pairs, 2] (or None: zeros) goes to ref_logp's column
    0, so that ref_logp.sum(-1) is the row's reference log-probability."""
    n = 2 * len(pair_ids)
    out = empty_rows(n, seq_len, pad_id, "ref_logp")
    for j, p in enumerate(pair_ids):
        for c in (0, 1):
            r = 2 * j + c
            inputs, targets, mask = enc.rows[2 * p + c]
            k = len(inputs)
            out["inputs"][r, :k] = inputs
            out["targets"][r, :k] = targets
            out["loss_mask"][r, :k] = mask
            out["positions"][r, :k] = np.arange(k, dtype=np.int32)
            out["segment_ids"][r, :k] = 1
            if ref is not None:
                out["ref_logp"][r, 0] = ref[p, c]
    return out


class PairLoader:
    """Infinite iterator of this host's DPO batches: DPO_BATCH_KEYS -> [micro_batches,
    rows // micro_batches, seq_len] (rows = 2 x pairs per step on this host). `ref` (the
    pairs' reference log-probabilities [num_pairs, 2]) must be set before iterating."""

    def __init__(
        self,
        enc: EncodedPairs,
        rows: int,
        seq_len: int,
        micro_batches: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        pad_id: int = 0,
    ):
        if rows % micro_batches or (rows // micro_batches) % 2:
            raise ValueError(f"rows per micro-batch ({rows} / {micro_batches}) must be even")
        self.enc, self.rows, self.seq_len, self.micro = enc, rows, seq_len, micro_batches
        self.seed, self.shuffle, self.pad_id = seed, shuffle, pad_id
        self.ref: np.ndarray | None = None
        self.st = LoaderState()
        self._order_epoch, self._order = -1, None

    def state(self) -> dict:
        return self.st.to_dict()

    def restore(self, state: Mapping[str, int]) -> None:
        self.st = LoaderState(int(state["epoch"]), int(state["cursor"]), 0)

    def _next_pair(self) -> int:
        n = self.enc.num_pairs
        if self._order_epoch != self.st.epoch:
            rng = np.random.default_rng([self.seed, self.st.epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = self.st.epoch
        p = int(self._order[self.st.cursor])
        self.st.cursor += 1
        if self.st.cursor == n:
            self.st.cursor, self.st.epoch = 0, self.st.epoch + 1
        return p

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.ref is None:
            raise RuntimeError("PairLoader: the reference log-probabilities are not set")
        ids = [self._next_pair() for _ in range(self.rows // 2)]
        flat = pack_rows(self.enc, ids, self.ref, self.seq_len, self.pad_id)
        return {k: v.reshape(self.micro, -1, self.seq_len) for k, v in flat.items()}

    def reference_batches(self, num_batches: int) -> Iterator[dict]:
        """`num_batches` batches in this loader's layout holding pairs 0, 1, ... in order (the
        rest filled up with pair 0): the input of the reference log-probabilities, row
        2 * i + c of the batches' flattened rows being pair i's chosen (c=0) / rejected."""
        per = self.rows // 2
        n = self.enc.num_pairs
        for b in range(num_batches):
            ids = [i if i < n else 0 for i in range(b * per, (b + 1) * per)]
            flat = pack_rows(self.enc, ids, None, self.seq_len, self.pad_id)
            yield {k: v.reshape(self.micro, -1, self.seq_len) for k, v in flat.items()}
