"""Prompt data for GRPO: JSONL records -> token prompts, and their order over a run.

A record (one JSON object per line) is a prompt plus the fields its reward reads:

    {"prompt": "What is 6 x 7?", "answer": "42"}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "answer": "42"}

`prompt` (a string) or `messages` (a chat conversation ending with a user message). With
`grpo.chat` (default) the prompt is rendered in the tokenizer's chat format with the assistant
cue (a `prompt` is one user message); with `grpo.chat: false` a `prompt` is plain text that
the model continues as is and `messages` records are refused. The built-in rewards read
`grpo.answer_field` (a string or a number), which every record must have; a user reward may
read any field (the whole record is passed to it). Bad records are `DataError`s naming
file:line (exit 3); a prompt longer than seq_len - max_new_tokens is an error too (its
completions would not fit in a training row).

`PromptOrder` hands out this host's prompts, reshuffled every epoch (deterministic in the seed);
its state {epoch, cursor, offset} is stored in every checkpoint (offset: optimizer steps taken
on this host's batches, so the rollout of a resumed run is the one it would have made).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hunyuan_jax.data.corpus import (
    LoaderState,
    ResumableLoader,
    _expand,
    _json_type,
    empty_rows,
    jsonl_records,
)
from hunyuan_jax.data.tokenizer import Tokenizer
from hunyuan_jax.errors import DataError


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: its messages (chat) or text (plain), the record, and "file:line"."""

    messages: tuple | None
    text: str | None
    record: dict
    source: str


def check_record(rec, where: str, fields: Sequence[str], chat: bool) -> PromptRecord:
    """A validated prompt record; DataError starting with `where` otherwise."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(rec)}")
    if ("prompt" in rec) == ("messages" in rec):
        raise DataError(f"{where}: a prompt record needs exactly one of 'prompt' or 'messages'")
    for key in fields:
        if key not in rec:
            raise DataError(f"{where}: no {key!r} field (the reward reads it)")
        if not isinstance(rec[key], str | int | float) or isinstance(rec[key], bool):
            raise DataError(
                f"{where}: {key!r} must be a string or a number, got {_json_type(rec[key])}"
            )
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str):
            raise DataError(f"{where}: 'prompt' must be a string, got {_json_type(rec['prompt'])}")
        if not rec["prompt"].strip():
            raise DataError(f"{where}: 'prompt' is empty")
        if not chat:
            return PromptRecord(None, rec["prompt"], rec, where)
        return PromptRecord(({"role": "user", "content": rec["prompt"]},), None, rec, where)
    if not chat:
        raise DataError(f"{where}: 'messages' needs the chat format; grpo.chat is false")
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        got = "an empty list" if isinstance(msgs, list) else _json_type(msgs)
        raise DataError(f"{where}: 'messages' must be a non-empty list of messages, got {got}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with a string 'content'")
        if m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}: message {i} has role {m.get('role')!r}")
    if msgs[-1]["role"] != "user":
        raise DataError(
            f"{where}: 'messages' must end with a user message (the completion follows it), "
            f"the last one has role {msgs[-1]['role']!r}"
        )
    messages = tuple({"role": m["role"], "content": m["content"]} for m in msgs)
    return PromptRecord(messages, None, rec, where)


def read_prompts(
    spec: str,
    fields: Sequence[str] = (),
    chat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> list[PromptRecord]:
    """This host's share of the prompt records of `spec` (a .jsonl file, directory or glob;
    records numbered across files, process p keeps index % process_count == p)."""
    prompts, index = [], itertools.count()
    for f in _expand(spec):
        if f.stat().st_size == 0:
            raise DataError(f"{f}: empty data file")
        for where, rec in jsonl_records(f, index, process_index, process_count):
            prompts.append(check_record(rec, where, fields, chat))
    if not prompts:
        share = f" for process {process_index} of {process_count}" if process_count > 1 else ""
        raise DataError(f"{spec}: no prompt record{share}")
    return prompts


def encode_prompts(
    tok: Tokenizer, prompts: Sequence[PromptRecord], max_prompt_len: int
) -> list[list[int]]:
    """Token ids of each prompt; DataError naming file:line for one longer than
    `max_prompt_len` (seq_len - max_new_tokens) or one that encodes to nothing."""
    out = []
    for p in prompts:
        try:
            if p.messages is not None:
                ids = tok.apply_chat_template(list(p.messages), add_generation_prompt=True)
            else:
                ids = tok.encode_text(p.text)
        except (ValueError, DataError) as e:
            raise DataError(f"{p.source}: the prompt cannot be encoded: {e}") from None
        if not ids:
            raise DataError(f"{p.source}: the prompt encodes to no tokens")
        if len(ids) > max_prompt_len:
            raise DataError(
                f"{p.source}: the prompt has {len(ids)} tokens; with grpo.max_new_tokens the "
                f"rows of seq_len hold prompts of at most {max_prompt_len}: raise seq_len"
            )
        out.append([int(t) for t in ids])
    return out


class PromptOrder(ResumableLoader):
    """This host's prompts in a deterministic, per-epoch shuffled order (`take(n)`), with a
    checkpointable state {epoch, cursor, offset}."""

    def __init__(self, num: int, seed: int = 0, shuffle: bool = True):
        self.num, self.seed, self.shuffle = num, seed, shuffle
        self.st = LoaderState()
        self._order_epoch, self._order = -1, None

    def take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            if self._order_epoch != self.st.epoch:
                rng = np.random.default_rng([self.seed, self.st.epoch])
                self._order = rng.permutation(self.num) if self.shuffle else np.arange(self.num)
                self._order_epoch = self.st.epoch
            out.append(int(self._order[self.st.cursor]))
            self.st.cursor += 1
            if self.st.cursor == self.num:
                self.st.cursor, self.st.epoch = 0, self.st.epoch + 1
        return out


def pack_rollout(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]],
    seq_len: int,
    pad_id: int,
) -> dict:
    """Rows [n, seq_len] of prompt + completion (inputs = ids[:-1], targets = ids[1:]):
    loss_mask 1 on the completion's tokens as targets, `old_logp` the rollout's log-probability
    of each of them at the same place (0 elsewhere)."""
    n = len(prompts)
    out = empty_rows(n, seq_len, pad_id, "old_logp")
    for r, (p, c, lp) in enumerate(zip(prompts, completions, logprobs, strict=True)):
        ids = np.asarray([*p, *c], np.int32)
        k = len(ids) - 1
        if k > seq_len:
            raise ValueError(f"row {r}: {k} tokens exceed seq_len {seq_len}")
        out["inputs"][r, :k] = ids[:-1]
        out["targets"][r, :k] = ids[1:]
        out["positions"][r, :k] = np.arange(k, dtype=np.int32)
        out["segment_ids"][r, :k] = 1
        at = len(p) - 1
        out["loss_mask"][r, at : at + len(c)] = 1.0
        out["old_logp"][r, at : at + len(c)] = np.asarray(lp, np.float32)
    return out


def completion_text(tok: Tokenizer, tokens: Sequence[int], eos_ids: Sequence[int]) -> str:
    """A completion's text for the reward: up to (not including) its EOS, specials skipped."""
    ids = list(tokens)
    if ids and ids[-1] in set(eos_ids):
        ids = ids[:-1]
    return tok.decode(ids, skip_special_tokens=True)
