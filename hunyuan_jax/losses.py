"""Training objectives: next-token cross entropy (float32, masked) plus the MoE auxiliary
load-balancing loss and an optional router z-loss term."""

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


def lm_loss(
    model,
    batch: dict,
    *,
    key=None,
    aux_loss_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    phase: str = "train",
    experts_fn=None,
):
    """Loss of a batch {inputs, targets, [positions, segment_ids, loss_mask]}.

    `phase` selects the MoE dispatch (training's capacity routing by default; `key` drives its
    random re-assignment and dropout); `experts_fn` overrides it (tests).

    Returns (total loss, metrics): total = cross entropy + aux_loss_coef * (Switch auxiliary
    loss) + z_loss_coef * (router z-loss), both averaged over layers.
    """
    logits, stats, _ = model(
        batch["inputs"],
        batch.get("positions"),
        batch.get("segment_ids"),
        phase=phase,
        key=key,
        experts_fn=experts_fn,
    )
    ce, tokens = cross_entropy(logits, batch["targets"], batch.get("loss_mask"))
    aux, z = jnp.mean(stats["aux_loss"]), jnp.mean(stats["z_loss"])
    metrics = {
        "ce_loss": ce,
        "aux_loss": aux,
        "z_loss": z,
        "tokens": tokens,
        "expert_load": jnp.mean(stats["expert_load"], axis=0),
    }
    for name in ("rerouted_fraction", "dropped_fraction"):
        if name in stats:
            metrics[name] = jnp.mean(stats[name])
    return ce + aux_loss_coef * aux + z_loss_coef * z, metrics
