"""GRPO (group relative policy optimization) in the one train step: the objective, the
group-relative advantages and the reference policy's log-probabilities.

A rollout batch holds G completions o_1..o_G of each prompt q (hunyuan_jax/train/rollout.py),
each with a reward r_i. Advantages (`group_advantages`): A_i = (r_i - mean(r)) / (std(r) + 1e-4)
over the group (population std; `grpo.std_normalize: false`: A_i = r_i - mean(r)). Per
completion token t of o_i, with pi the policy being trained, pi_old the policy that sampled
the rollout and pi_ref the reference:

    ratio   = exp(log pi(o_it) - log pi_old(o_it))
    pg_it   = -min(ratio A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) A_i)
    kl_it   = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1        (k3, >= 0)
    l_it    = pg_it + beta kl_it

`normalization: token` (default): loss = sum of l_it over the batch's completion tokens / their
number (long completions weigh more, DAPO's choice); `sequence`: the mean over completions of
each one's token mean (the GRPO paper's). Plus the MoE auxiliary / z losses as in SFT.

With one update per rollout batch (`updates_per_rollout: 1`) pi_old is pi itself (the ratio is
exactly 1, its gradient that of log pi; tunix and TRL do the same); with several, pi_old is
the rollout's own log-probabilities, which the train step's recomputation must equal before
the first update: `grpo/rollout_logp_diff` (mean |log pi - rollout log-prob| over the tokens)
reports the gap at every step (0 up to float rounding with `grpo.dropless`, the default: the
train forward uses the inference MoE dispatch, so the policy trained is the policy sampled).

Reference: with LoRA, the base model (the adapters with B = 0: no second copy of anything but
the adapters); full fine-tuning keeps the initial weights as a second copy (only when beta > 0).
Its per-token log-probabilities are computed once per rollout batch (`reference_logp`), outside
the gradient, and travel in the batch as `ref_logp` like the rollout's `old_logp`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hunyuan_jax.train.losses import forward, moe_metrics

GRPO_KEYS = ("old_logp", "ref_logp", "advantages")


# ----------------------------------------------------------------------------- pieces
def token_logp(out, targets, logits_fn=None, chunk: int = 0) -> jax.Array:
    """Per-token log-probabilities of `targets` [B, S] (float32): `out` are logits [B, S, V],
    or with `chunk` > 0 hidden states that `logits_fn` turns into them, chunk tokens at a time
    (rematerialised: the [B, S, V] logits never exist whole)."""

    def lp(logits, t):
        logits = logits.astype(jnp.float32)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    if not chunk:
        return lp(out, targets)
    b, s, _ = out.shape
    pad = -s % chunk
    hidden = jnp.pad(out, ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (s + pad) // chunk
    split = lambda a: jnp.swapaxes(a.reshape((b, n, chunk) + a.shape[2:]), 0, 1)
    one = jax.checkpoint(lambda h, t: lp(logits_fn(h), t))
    _, chunks = jax.lax.scan(lambda c, xs: (c, one(*xs)), None, (split(hidden), split(tgt)))
    return jnp.swapaxes(chunks, 0, 1).reshape(b, n * chunk)[:, :s]


def group_advantages(rewards: np.ndarray, group_size: int, std_normalize: bool = True):
    """Advantages [n] of rewards [n] laid out group by group (G consecutive completions of a
    prompt): (r - group mean) / (group std + 1e-4), float64 on the host."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    a = r - r.mean(axis=1, keepdims=True)
    if std_normalize:
        a = a / (r.std(axis=1, keepdims=True) + 1e-4)
    return a.reshape(-1)


def grpo_terms(logp, old_logp, ref_logp, adv, mask, *, epsilon, epsilon_high, beta, normalization):
    """The GRPO loss of rows [rows, seq] (see the module docstring): logp (the policy's),
    old_logp, ref_logp, adv (each row's advantage at every position), mask (completion tokens).
    Returns (loss, metrics); for `token` normalization the loss is the micro-batch's token
    mean, to be weighted by `tokens` over micro-batches."""
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp(logp - old_logp)
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    pg = -jnp.minimum(ratio * adv, clipped * adv)
    d = ref_logp - logp
    kl = jnp.exp(d) - d - 1.0 if beta > 0 else jnp.zeros_like(logp)  # beta 0: no reference
    per_token = pg + beta * kl
    tokens = jnp.sum(mask)
    per_row = jnp.sum(mask, axis=-1)
    tmean = lambda x: jnp.sum(x * mask) / jnp.maximum(tokens, 1.0)
    if normalization == "token":
        loss = tmean(per_token)
    else:
        loss = jnp.mean(jnp.sum(per_token * mask, axis=-1) / jnp.maximum(per_row, 1.0))
    was_clipped = ((adv > 0) & (ratio > 1.0 + epsilon_high)) | ((adv < 0) & (ratio < 1.0 - epsilon))
    metrics = {
        "grpo/policy_loss": tmean(pg),
        "grpo/kl": tmean(kl),
        "grpo/clip_fraction": tmean(was_clipped.astype(jnp.float32)),
        "grpo/ratio": tmean(ratio),
        "tokens": tokens,
    }
    return loss, metrics


# ----------------------------------------------------------------------------- objective
class GRPOObjective:
    """`TrainStep` objective for `train.objective: grpo` (see the module docstring)."""

    extra_batch_keys = GRPO_KEYS

    def __init__(self, tcfg):
        g = tcfg.grpo
        self.epsilon, self.epsilon_high, self.beta = g.epsilon, g.clip_high, g.beta
        self.normalization, self.on_policy = g.normalization, g.updates_per_rollout == 1
        self.phase = "prefill" if g.dropless else "train"
        self.aux_loss_coef, self.z_loss_coef = tcfg.aux_loss_coef, tcfg.z_loss_coef

    def __call__(self, model, micro: dict, key):
        out, stats, chunk = forward(model, micro, key=key, phase=self.phase)
        head = model.head() if chunk else None
        logits_fn = (lambda h: model.logits(h, head)) if chunk else None
        logp = token_logp(out, micro["targets"], logits_fn, chunk)
        mask = micro["loss_mask"]
        old = jax.lax.stop_gradient(logp) if self.on_policy else micro["old_logp"]
        loss, metrics = grpo_terms(
            logp, old, micro["ref_logp"], micro["advantages"], mask,
            epsilon=self.epsilon, epsilon_high=self.epsilon_high, beta=self.beta,
            normalization=self.normalization,
        )  # fmt: skip
        gap = jnp.abs(jax.lax.stop_gradient(logp) - micro["old_logp"]) * mask
        metrics["grpo/rollout_logp_diff"] = jnp.sum(gap) / jnp.maximum(metrics["tokens"], 1.0)
        # the token-weighted part of the loss (TrainStep weighs it by `tokens` over micro-batches)
        metrics["ce_loss"] = loss if self.normalization == "token" else jnp.zeros(())
        moe = moe_metrics(stats)
        total = loss + self.aux_loss_coef * moe["aux_loss"] + self.z_loss_coef * moe["z_loss"]
        return total, {**metrics, **moe}


# ----------------------------------------------------------------------------- reference
def reference_params(params, lora: bool):
    """The reference policy's trainable parameters: with LoRA the adapters with every B zeroed
    (the base model), else `params` themselves (the caller's copy of the initial weights)."""
    if not lora:
        return params

    def zero_b(path, x):
        return jnp.zeros_like(x) if "_lora_b" in jax.tree_util.keystr(path) else x

    return jax.tree_util.tree_map_with_path(zero_b, params)


def reference_fn(step, lora: bool):
    """jitted (params, batch [micro, rows, seq], frozen) -> per-token log-probabilities
    [micro, rows, seq] of the batch's targets under the reference policy of `params` (LoRA: B
    zeroed inside the program), with the inference (dropless) MoE dispatch."""
    graphdef = step.graphdef

    def fn(params, batch, frozen):
        params = reference_params(params, lora)
        model = nnx.merge(graphdef, params, *(() if frozen is None else (frozen,)))

        def one(micro):
            out, _, chunk = forward(model, micro, phase="prefill")
            head = model.head() if chunk else None
            logits_fn = (lambda h: model.logits(h, head)) if chunk else None
            return token_logp(out, micro["targets"], logits_fn, chunk)

        return jax.lax.map(one, {k: v for k, v in batch.items() if k not in GRPO_KEYS})

    if not step.plan.is_sharded:
        return jax.jit(fn)
    shardings = (step.shardings.params, step.batch_sharding, step.frozen_shardings)
    return jax.jit(fn, in_shardings=shardings, out_shardings=step.batch_sharding)
