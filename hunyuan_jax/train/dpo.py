"""DPO (Direct Preference Optimization, sigmoid loss) in the one train step: the objective,
the reference log-probabilities, and the run's preference loader.

Per pair (x, chosen y_c, rejected y_r), with log-probabilities summed over the response
tokens only (pi: the model being trained, ref: the initial model):

    margin = beta * ((pi(y_c|x) - ref(y_c|x)) - (pi(y_r|x) - ref(y_r|x)))
    loss   = mean over pairs of -log sigmoid(margin)
             + sft_weight * (negative log-likelihood of the chosen responses per token)
             + the MoE auxiliary / z losses as in SFT

`DPOObjective` is an objective of `train_step.TrainStep` (picked by `train.objective: dpo`),
not a second step builder: same state, optimizer, sharding, accumulation over micro-batches
(the SFT term token-weighted, the rest averaged: micro-batches hold equal numbers of pairs).

Reference log-probabilities are computed ONCE, before the first step, from the initial
weights (`--init-from`, or the random init), by one jitted forward per batch of pairs with
the inference (dropless) MoE dispatch, and stored in <run>/dpo_reference/ (`process-<p>.npz`,
written atomically, with `process-<p>.json` holding its SHA-256 and a fingerprint of the
tokenized pairs). No second copy of the weights is ever held; a resumed run reads them back
(checksum verified: a damaged file is a CheckpointError, exit 4; preference data that changed
since is a DataError, exit 3), so a resume is exact. With LoRA, the adapters start at B = 0:
the initial model is the base model, the same reference.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hunyuan_jax import atomic
from hunyuan_jax.data.corpus import to_global
from hunyuan_jax.errors import CheckpointError, ConfigError, DataError, NonFiniteLoss
from hunyuan_jax.train.data import setup_tokenizer
from hunyuan_jax.train.dpo_data import EncodedPairs, PairLoader, encode_pairs, read_pairs
from hunyuan_jax.train.losses import forward, moe_metrics, row_nll

REFERENCE_DIR = "dpo_reference"


# ----------------------------------------------------------------------------- the loss
def dpo_terms(nll: jax.Array, ref: jax.Array, mask: jax.Array, beta: float, sft_weight: float):
    """The DPO loss of rows [chosen 0, rejected 0, chosen 1, ...]: nll [rows] (the rows'
    summed response negative log-likelihoods under the policy), ref [rows] (reference
    log-probabilities), mask [rows, seq] (the loss mask, for the chosen token count).
    Returns (dpo loss: mean -log sigmoid(margin), sft term, metrics)."""
    logp = -nll.reshape(-1, 2)
    ref = ref.reshape(-1, 2)
    chosen_reward = beta * (logp[:, 0] - ref[:, 0])
    rejected_reward = beta * (logp[:, 1] - ref[:, 1])
    margin = chosen_reward - rejected_reward
    loss = jnp.mean(-jax.nn.log_sigmoid(margin))
    chosen_tokens = jnp.sum(mask.reshape(-1, 2, mask.shape[-1])[:, 0].astype(jnp.float32))
    chosen_nll = jnp.sum(nll.reshape(-1, 2)[:, 0]) / jnp.maximum(chosen_tokens, 1.0)
    metrics = {
        "dpo/loss": loss,
        "dpo/reward_margin": jnp.mean(margin),
        "dpo/accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
        "dpo/chosen_logp": jnp.mean(logp[:, 0]),
        "dpo/rejected_logp": jnp.mean(logp[:, 1]),
        "dpo/chosen_reward": jnp.mean(chosen_reward),
        "dpo/rejected_reward": jnp.mean(rejected_reward),
        "dpo/chosen_nll": chosen_nll,
        "tokens": chosen_tokens,
        # the token-weighted part of the loss (TrainStep weighs it by `tokens` over micro-batches)
        "ce_loss": sft_weight * chosen_nll,
    }
    return loss, sft_weight * chosen_nll, metrics


class DPOObjective:
    """`TrainStep` objective for `train.objective: dpo` (see the module docstring)."""

    extra_batch_keys = ("ref_logp",)

    def __init__(self, tcfg):
        self.beta, self.sft_weight = tcfg.dpo.beta, tcfg.dpo.sft_weight
        self.aux_loss_coef, self.z_loss_coef = tcfg.aux_loss_coef, tcfg.z_loss_coef

    def __call__(self, model, micro: dict, key):
        out, stats, chunk = forward(model, micro, key=key)
        nll = row_nll(out, micro["targets"], micro["loss_mask"], model.logits, chunk)
        ref = jnp.sum(micro["ref_logp"], axis=-1)
        loss, sft, metrics = dpo_terms(nll, ref, micro["loss_mask"], self.beta, self.sft_weight)
        moe = moe_metrics(stats)
        total = loss + sft + self.aux_loss_coef * moe["aux_loss"]
        return total + self.z_loss_coef * moe["z_loss"], {**metrics, **moe}

    @staticmethod
    def loss_tokens(batch: dict) -> jax.Array:
        """The chosen rows' response tokens of a [micro, rows, seq] batch (the SFT term's)."""
        return jnp.sum(batch["loss_mask"][:, 0::2].astype(jnp.float32))


# ----------------------------------------------------------------------------- reference
def reference_fn(step):
    """jitted (params, batch [micro, rows, seq], frozen) -> [micro, rows] response
    log-probabilities of the rows under the model `params` (+ the step's frozen base, with
    LoRA), with the inference dispatch (dropless, no dropout)."""
    graphdef, plan = step.graphdef, step.plan

    def fn(params, batch, frozen):
        model = nnx.merge(graphdef, params, *(() if frozen is None else (frozen,)))

        def one(micro):
            out, _, chunk = forward(model, micro, phase="prefill")
            return -row_nll(out, micro["targets"], micro["loss_mask"], model.logits, chunk)

        return jax.lax.map(one, {k: v for k, v in batch.items() if k != "ref_logp"})

    if not plan.is_sharded:
        return jax.jit(fn)
    spec = step.batch_sharding.spec
    shardings = (
        step.shardings.params,
        step.batch_sharding,
        getattr(step, "frozen_shardings", None),
    )
    return jax.jit(fn, in_shardings=shardings, out_shardings=NamedSharding(plan.mesh, P(*spec[:2])))


def _local(x: jax.Array, step) -> np.ndarray:
    """This host's rows of a [micro, rows] global result (the inverse of `data.to_global`)."""
    if jax.process_count() == 1:
        return np.asarray(x)

    spec = step.batch_sharding.spec
    return np.asarray(
        multihost_utils.global_array_to_host_local_array(x, step.plan.mesh, type(spec)(*spec[:2]))
    )


def _max_over_processes(n: int) -> int:
    if jax.process_count() == 1:
        return n

    return int(np.max(multihost_utils.process_allgather(np.asarray([n]))))


def compute_reference(step, params, loader: PairLoader, global_rows: int) -> np.ndarray:
    """[num_pairs, 2] log-probabilities (chosen, rejected) of this host's pairs under `params`."""
    n, per = loader.enc.num_pairs, loader.rows // 2
    batches = _max_over_processes(math.ceil(n / per))
    fn, frozen = reference_fn(step), getattr(step, "frozen", None)  # frozen: LoRA's base
    rows = []
    for batch in loader.reference_batches(batches):
        out = fn(params, to_global(batch, step.batch_sharding, global_rows), frozen)
        rows.append(_local(out, step).reshape(-1))
    return np.concatenate(rows)[: 2 * n].reshape(n, 2).astype(np.float32)


def _paths(run_dir: Path) -> tuple[Path, Path]:
    d = Path(run_dir) / REFERENCE_DIR
    p = jax.process_index()
    return d / f"process-{p}.npz", d / f"process-{p}.json"


def save_reference(run_dir: Path, ref: np.ndarray, enc: EncodedPairs, meta: dict) -> Path:
    """<run>/dpo_reference/process-<p>.npz (atomic) and its .json (SHA-256, fingerprint)."""
    npz, sidecar = _paths(run_dir)
    npz.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, logp=ref)
    data = buf.getvalue()
    atomic.write_bytes(npz, data)
    record = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "fingerprint": enc.fingerprint(),
        "pairs": enc.num_pairs,
        **meta,
    }
    atomic.write_json(sidecar, record)
    return npz


def load_reference(run_dir: Path, enc: EncodedPairs, data: str) -> np.ndarray:
    """The stored reference log-probabilities, verified: CheckpointError if missing or
    damaged, DataError if the preference data no longer tokenize to what they were taken of."""
    npz, sidecar = _paths(run_dir)
    redo = f"put it back, or delete {run_dir} to start the run over"
    try:
        record = json.loads(sidecar.read_text())
        blob = npz.read_bytes()
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{npz.parent}: the DPO reference log-probabilities of this run cannot be read "
            f"({type(e).__name__}: {e}); {redo}"
        ) from None
    if hashlib.sha256(blob).hexdigest() != record.get("sha256"):
        raise CheckpointError(f"{npz}: does not match its checksum in {sidecar.name}; {redo}")
    if record.get("fingerprint") != enc.fingerprint():
        raise DataError(
            f"{data}: the preference data differ from those the run's reference "
            f"log-probabilities ({npz}) were computed on ({record.get('pairs')} pairs then, "
            f"{enc.num_pairs} now); restore them or start a new run directory"
        )
    return np.load(io.BytesIO(blob))["logp"]


# ----------------------------------------------------------------------------- the run
def make_dpo_loader(tcfg, mcfg, run_dir: Path, log=print):
    """(tokenizer, PairLoader of this host's pairs) of a DPO run: `train_data.make_loader`'s
    counterpart (same tokenizer rules; the reference is attached by `attach_reference`)."""
    if tcfg.data is None:
        raise ConfigError("objective 'dpo' needs train key 'data': a preference JSONL file")
    pi, pc = jax.process_index(), jax.process_count()
    if tcfg.batch_size % pc or (tcfg.batch_size // pc // tcfg.micro_batches) % 2:
        raise ConfigError(
            f"batch_size {tcfg.batch_size} over {pc} hosts and {tcfg.micro_batches} "
            f"micro-batches: each host's micro-batch must hold an even number of rows"
        )
    t0 = time.time()
    pairs = read_pairs(tcfg.data, pi, pc)
    docs = [p.conversation(r) for p in pairs for r in (p.chosen, p.rejected)]
    tok = setup_tokenizer(tcfg, mcfg, run_dir, docs, "chat", log)
    enc = encode_pairs(tok, pairs, tcfg.seq_len)
    tokens = sum(float(np.sum(m)) for _, _, m in enc.rows)
    log(
        f"[data] {enc.num_pairs} preference pairs on this host, {tokens:,.0f} response tokens"
        + (
            f"; {enc.dropped} pairs longer than seq_len={tcfg.seq_len} dropped"
            if enc.dropped
            else ""
        )
        + f" ({type(tok).__name__}, {tok.vocab_size} ids; {time.time() - t0:.1f}s)"
    )
    loader = PairLoader(
        enc,
        tcfg.batch_size // pc,
        tcfg.seq_len,
        tcfg.micro_batches,
        seed=tcfg.seed,
        shuffle=tcfg.shuffle,
        pad_id=tok.pad_id,
    )
    return tok, loader


def attach_reference(loader: PairLoader, step, params, tcfg, run_dir: Path, resumed, log=print):
    """Sets `loader.ref`: read back (verified) when the run resumes, else computed from
    `params` (the initial weights) and stored."""
    if resumed:
        loader.ref = load_reference(run_dir, loader.enc, tcfg.data)
        log(f"[dpo] reference log-probabilities of {loader.enc.num_pairs} pairs read back")
        return
    t0 = time.time()
    ref = compute_reference(step, params, loader, tcfg.batch_size)
    if not np.all(np.isfinite(ref)):
        raise NonFiniteLoss(
            f"non-finite reference log-probabilities of {tcfg.data} under the initial weights"
        )
    meta = {"init_from": tcfg.init_from, "seq_len": tcfg.seq_len, "dropped": loader.enc.dropped}
    path = save_reference(run_dir, ref, loader.enc, meta)
    loader.ref = ref
    log(
        f"[dpo] reference log-probabilities of {loader.enc.num_pairs} pairs computed from the "
        f"initial weights in {time.time() - t0:.1f}s (mean chosen {ref[:, 0].mean():.2f}, "
        f"rejected {ref[:, 1].mean():.2f}); stored in {path}"
    )
