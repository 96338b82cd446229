"""One engine step as the host builds it (`StepWork`) and as it travels to the device: two flat
arrays (int32 and float32) whose layout depends only on the step's shape (`StepShape`), so
each shape is one compiled program and a multi-host plan is two fixed-size broadcasts.

A step is a ragged stream of T token slots from up to R sequences (vLLM's layout): sequence
i's tokens are stream positions cu_q_lens[i]..cu_q_lens[i+1]-1, the last q_len tokens of its
kv_lens[i] cached tokens; padding slots write into the scratch page 0 and are masked. A
sequence whose last fed token is the end of what it has (`sample[i]`) gets its next token
sampled from that token's logits with its own parameters and key: fold_in(key, count).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hunyuan_jax.model.kernels.paged import PagedBatch


@dataclasses.dataclass(frozen=True)
class StepShape:
    """tokens T, sequences R, pages per sequence P (all static: one program each)."""

    tokens: int
    seqs: int
    pages: int

    # int32 fields per token, per sequence (and the [R, P] page table, [R, 2] keys)
    TOKEN_FIELDS = ("tokens", "positions", "slots", "seq_ids", "valid", "next_tokens")
    SEQ_FIELDS = ("kv_lens", "last_index", "rows", "sample", "reset", "top_k", "count")
    FLOAT_FIELDS = ("temperature", "top_p", "repetition_penalty")

    @property
    def int_size(self) -> int:
        t, r, p = self.tokens, self.seqs, self.pages
        return len(self.TOKEN_FIELDS) * t + len(self.SEQ_FIELDS) * r + r * p + (r + 1) + 1 + 2 * r

    @property
    def float_size(self) -> int:
        return len(self.FLOAT_FIELDS) * self.seqs


@dataclasses.dataclass
class StepWork:
    """Host arrays of one step (numpy); `StepWork.empty(shape)` then fill rows."""

    shape: StepShape
    tokens: np.ndarray  # [T] token fed at each stream position
    positions: np.ndarray  # [T] its position in its sequence
    slots: np.ndarray  # [T] flat cache slot (page * page_size + offset) its K/V goes to
    seq_ids: np.ndarray  # [T] which step sequence it belongs to
    valid: np.ndarray  # [T] 1 for a real token
    next_tokens: np.ndarray  # [T] the prompt token after it (prompt logprobs), else 0
    kv_lens: np.ndarray  # [R] cached tokens of each sequence after this step
    last_index: np.ndarray  # [R] stream position of the sequence's last token this step
    rows: np.ndarray  # [R] the engine row (repetition-penalty state) of each sequence
    sample: np.ndarray  # [R] 1: sample this sequence's next token
    reset: np.ndarray  # [R] 1: its row's seen-token set starts empty (a new sequence)
    top_k: np.ndarray  # [R]
    count: np.ndarray  # [R] tokens the request produced so far (its PRNG stream position)
    page_indices: np.ndarray  # [R, P]
    cu_q_lens: np.ndarray  # [R + 1]
    num_seqs: np.ndarray  # [1]
    keys: np.ndarray  # [R, 2] uint32 key data of each request
    temperature: np.ndarray  # [R] float32
    top_p: np.ndarray  # [R] float32
    repetition_penalty: np.ndarray  # [R] float32

    @classmethod
    def empty(cls, shape: StepShape) -> StepWork:
        t, r, p = shape.tokens, shape.seqs, shape.pages
        zi = lambda *s: np.zeros(s, np.int32)
        return cls(
            shape, *(zi(t) for _ in StepShape.TOKEN_FIELDS), *(zi(r) for _ in StepShape.SEQ_FIELDS),
            zi(r, p), zi(r + 1), zi(1), np.zeros((r, 2), np.uint32),
            np.zeros((r,), np.float32), np.ones((r,), np.float32), np.ones((r,), np.float32),
        )  # fmt: skip

    def pack(self) -> tuple[np.ndarray, np.ndarray]:
        """(int32 [shape.int_size], float32 [shape.float_size]): one transfer each."""
        parts = [getattr(self, f) for f in StepShape.TOKEN_FIELDS + StepShape.SEQ_FIELDS]
        parts += [self.page_indices.ravel(), self.cu_q_lens, self.num_seqs]
        parts.append(np.asarray(self.keys, np.uint32).view(np.int32).ravel())
        ints = np.concatenate([np.asarray(a, np.int32).ravel() for a in parts])
        floats = np.concatenate([getattr(self, f) for f in StepShape.FLOAT_FIELDS])
        return ints, floats.astype(np.float32)


def unpack(shape: StepShape, ints, floats) -> dict:
    """The packed arrays (numpy or traced) -> named fields (keys as int32 pairs [R, 2])."""
    t, r, p = shape.tokens, shape.seqs, shape.pages
    out, at = {}, 0
    for name, n in [(f, t) for f in StepShape.TOKEN_FIELDS] + [
        (f, r) for f in StepShape.SEQ_FIELDS
    ]:
        out[name], at = ints[at : at + n], at + n
    out["page_indices"], at = ints[at : at + r * p].reshape(r, p), at + r * p
    out["cu_q_lens"], at = ints[at : at + r + 1], at + r + 1
    out["num_seqs"], at = ints[at : at + 1], at + 1
    out["keys"] = ints[at : at + 2 * r].reshape(r, 2)
    for i, name in enumerate(StepShape.FLOAT_FIELDS):
        out[name] = floats[i * r : (i + 1) * r]
    return out


def paged_batch(fields: dict) -> PagedBatch:
    """The model's view of a step (traced arrays)."""
    return PagedBatch(
        positions=fields["positions"],
        slots=fields["slots"],
        seq_ids=fields["seq_ids"],
        valid=fields["valid"] > 0,
        kv_lens=fields["kv_lens"],
        page_indices=fields["page_indices"],
        cu_q_lens=fields["cu_q_lens"],
        num_seqs=fields["num_seqs"],
    )
