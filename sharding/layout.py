"""The train step's layout when the sequence needs one: context parallelism for long sequences.

One rule, called by the AOT tool (`hunyuan_jax.cli.aot`, `--mode train` without --mesh /
--rules) and by train.py (a train config that names neither `mesh` nor `rules`): a training
sequence longer than `min_seq` tokens (CP_MIN_SEQ, the train key `cp_min_seq`) is split over
the mesh's `tensor` axis (preset `fsdp_ep_cp`); both print the same `layout:` line.
"""

from __future__ import annotations

import math

# Training sequences longer than CP_MIN_SEQ get context parallelism by default: 32K is the
# longest sequence the A52B's activations fit one v5p chip with (docs/tpu.md). The sequence is
# then split into chunks of at most CP_CHUNK tokens per chip (half of that, leaving room for
# the gathered K/V and the longer attention).
CP_MIN_SEQ = 32768
CP_CHUNK = 16384


def context_parallel_layout(
    cfg, chips: int, seq: int, min_seq: int = CP_MIN_SEQ
) -> tuple[str, str, int] | None:
    """(mesh, rules, context shards) for a train step of `seq` tokens per sequence on `chips`
    chips when the sequence needs context parallelism (seq > min_seq), else None: preset
    `fsdp_ep_cp`, the sequence over `tensor` in the fewest chunks of <= CP_CHUNK tokens that
    divide it and the chips, experts (`cfg.num_experts`) over `expert` as the AOT tool's
    default train mesh, fsdp the rest."""
    if seq <= min_seq:
        return None
    cp = next(
        (
            d
            for d in range(2, chips + 1)
            if chips % d == 0 and seq % d == 0 and seq // d <= CP_CHUNK
        ),
        None,
    )
    if cp is None:  # too few chips for CP_CHUNK: as many chunks as the chips allow
        cp = max(d for d in range(1, chips + 1) if chips % d == 0 and seq % d == 0)
    expert = math.gcd(cfg.num_experts, chips // cp)
    return f"fsdp={chips // cp // expert},expert={expert},tensor={cp}", "fsdp_ep_cp", cp


def long_sequence_layout(
    cfg, chips: int, seq: int, min_seq: int, how_to_override: str
) -> tuple[str, str, str] | None:
    """(mesh, rules, the `layout:` line) when `context_parallel_layout` splits the sequence,
    else None. `how_to_override`: the caller's flags that choose another layout."""
    cp = context_parallel_layout(cfg, chips, seq, min_seq)
    if cp is None:
        return None
    mesh, rules, shards = cp
    note = (
        f"seq {seq} > {min_seq}: context parallelism chosen (mesh {mesh}, rules {rules}: each "
        f"sequence in {shards} chunks of {seq // shards} tokens; {how_to_override} choose "
        "another layout)"
    )
    return mesh, rules, note
