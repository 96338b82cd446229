"""Training objectives: next-token cross entropy (float32, masked) plus the MoE auxiliary
load-balancing loss and an optional router z-loss term; the shared pieces other objectives
(DPO, hunyuan_jax/train/dpo.py) build on: the forward of a loss (`forward`), per-row sequence
negative log-likelihoods (`row_nll`) and the MoE metrics (`moe_metrics`).

With `policy.loss_chunk` = c > 0 the cross entropy is computed c tokens of the sequence at a
time (`chunked_cross_entropy`): each chunk's [B, c, V] float32 logits are made from the hidden
states, reduced to per-token losses and dropped, and recomputed in the backward pass, so the
[B, S, V] logits never exist whole (for the A52B's 129K vocabulary at 32K tokens that is
16 GiB per sequence).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
    """Mean token cross entropy in float32 over `mask` (1 = counts). Returns (loss, tokens)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    tokens = jnp.sum(mask)
    return jnp.sum(nll * mask) / jnp.maximum(tokens, 1.0), tokens


def chunked_cross_entropy(
    logits_fn, hidden: jax.Array, targets: jax.Array, mask: jax.Array | None, chunk: int
):
    """`cross_entropy(logits_fn(hidden), targets, mask)` with the sequence cut into chunks of
    `chunk` tokens (a rematerialised `lax.scan`); same value, O(B x chunk x V) memory."""
    b, s, _ = hidden.shape
    mask = jnp.ones((b, s), jnp.float32) if mask is None else mask.astype(jnp.float32)
    total = jnp.sum(chunked_row_nll(logits_fn, hidden, targets, mask, chunk))
    tokens = jnp.sum(mask)
    return total / jnp.maximum(tokens, 1.0), tokens


def chunked_row_nll(logits_fn, hidden: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int):
    """Per-row sums of the masked token negative log-likelihood [B] (float32), the sequence cut
    into rematerialised chunks of `chunk` tokens as in `chunked_cross_entropy`."""
    b, s, _ = hidden.shape
    mask = mask.astype(jnp.float32)
    pad = -s % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    n = (s + pad) // chunk
    split = lambda a: jnp.swapaxes(a.reshape((b, n, chunk) + a.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_nll(h, t, m):
        logits = logits_fn(h).astype(jnp.float32)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum((log_z - target_logit) * m, axis=-1)

    def body(total, xs):
        return total + chunk_nll(*xs), None

    total, _ = jax.lax.scan(
        body, jnp.zeros((b,), jnp.float32), (split(hidden), split(targets), split(mask))
    )
    return total


def row_nll(out: jax.Array, targets: jax.Array, mask: jax.Array, logits_fn=None, chunk: int = 0):
    """Per-row sums of the masked token negative log-likelihood [B] (float32): `out` are the
    logits [B, S, V], or with `chunk` > 0 the hidden states that `logits_fn` turns into them
    (`chunked_row_nll`). The DPO objective's sequence log-probabilities are minus these."""
    if chunk:
        return chunked_row_nll(logits_fn, out, targets, mask, chunk)
    logits = out.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * mask.astype(jnp.float32), axis=-1)


def forward(model, batch: dict, *, key=None, phase="train", experts_fn=None, loss_chunk=None):
    """The model's forward for a loss: (logits, or with chunking the final hidden states;
    the MoE stats; the chunk size, 0 = none) of a batch {inputs, [positions, segment_ids]}."""
    chunk = model.policy.loss_chunk if loss_chunk is None else loss_chunk
    out, stats, _ = model(
        batch["inputs"],
        batch.get("positions"),
        batch.get("segment_ids"),
        phase=phase,
        key=key,
        experts_fn=experts_fn,
        return_hidden=bool(chunk),
    )
    return out, stats, chunk


def moe_metrics(stats: dict) -> dict:
    """Layer means of the MoE statistics of a forward (aux_loss, z_loss, expert_load, ...)."""
    metrics = {
        "aux_loss": jnp.mean(stats["aux_loss"]),
        "z_loss": jnp.mean(stats["z_loss"]),
        "expert_load": jnp.mean(stats["expert_load"], axis=0),
    }
    for name in ("rerouted_fraction", "dropped_fraction"):
        if name in stats:
            metrics[name] = jnp.mean(stats[name])
    return metrics


def lm_loss(
    model,
    batch: dict,
    *,
    key=None,
    aux_loss_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    phase: str = "train",
    experts_fn=None,
    loss_chunk: int | None = None,
):
    """Loss of a batch {inputs, targets, [positions, segment_ids, loss_mask]}.

    `phase` selects the MoE dispatch (training's capacity routing by default; `key` drives its
    random re-assignment and dropout); `experts_fn` overrides it (tests). `loss_chunk`: see
    `chunked_cross_entropy` (default the model's `policy.loss_chunk`; 0 = whole sequence).

    Returns (total loss, metrics): total = cross entropy + aux_loss_coef * (Switch auxiliary
    loss) + z_loss_coef * (router z-loss), both averaged over layers.
    """
    out, stats, chunk = forward(
        model, batch, key=key, phase=phase, experts_fn=experts_fn, loss_chunk=loss_chunk
    )
    if chunk:
        head = model.head()  # once, outside the chunk loop
        ce, tokens = chunked_cross_entropy(
            lambda h: model.logits(h, head), out, batch["targets"], batch.get("loss_mask"), chunk
        )
    else:
        ce, tokens = cross_entropy(out, batch["targets"], batch.get("loss_mask"))
    metrics = {"ce_loss": ce, "tokens": tokens, **moe_metrics(stats)}
    return ce + aux_loss_coef * metrics["aux_loss"] + z_loss_coef * metrics["z_loss"], metrics
