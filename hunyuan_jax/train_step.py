"""The sharded train step and the training loop behind `train.py`.

State = TrainState(params: the model's nnx.State (fp32 master weights, the tree decoding uses),
opt_state: optax state (fp32), step: int32). One `jax.jit` with explicit in/out shardings from
the logical-axis rules and the state donated.

Inside the step, the global batch [micro_batches, rows, seq] is processed micro-batch by
micro-batch in a `lax.scan` that accumulates fp32 gradients (gradient accumulation), then one
optimizer update. lax.scan rather than `optax.MultiSteps`: one update per compiled call, so the
step counter, schedule, logging and checkpoints all count optimizer steps; no accumulator
persisted in the optimizer state (MultiSteps keeps a full fp32 copy of the parameters in it, in
every checkpoint); and the whole batch's gradient is exactly the token-weighted sum of the
micro-batch gradients (each micro-batch's cross entropy is weighted by its share of the batch's
loss tokens; the auxiliary losses are averaged).

Compute runs in `model.compute_dtype` (bfloat16 on TPU): the model casts the fp32 parameters
as it uses them, so gradients, moments and updates stay fp32.

Routing in training: capacity routing with random compensation (`moe.assign_slots`) on one
device or when the rules do not shard `exp`; expert parallelism with all-to-all dispatch
(`expert_parallel`) when they do. PRNG: key(seed) folded with the step and the micro-batch
index drives dropout and the random re-assignment, so a resumed run replays exactly.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hunyuan_jax import moe
from hunyuan_jax.config import ModelConfig
from hunyuan_jax.losses import lm_loss
from hunyuan_jax.optim import Optimizer, active_params, group_sizes, make_optimizer
from hunyuan_jax.train_config import TrainConfig
from sharding.rules import get_rules, rules_dict, state_shardings


class TrainState(NamedTuple):
    params: Any  # nnx.State of the model
    opt_state: Any  # optax state
    step: jax.Array  # int32 scalar: optimizer steps taken (batches consumed)


class NonFiniteLoss(RuntimeError):
    """Raised (with on_nonfinite='stop') when a step's loss or gradient is not finite."""


# ----------------------------------------------------------------------------- pieces
def make_experts_fn(mcfg: ModelConfig, tcfg: TrainConfig, mesh, rules) -> moe.ExpertsFn:
    """Training-time expert computation: capacity routing with random compensation, with
    expert parallelism (all_to_all by default) when the rules shard `exp` on this mesh."""
    ep_axes = [
        a for a in rules_dict(get_rules(rules))["exp"] if mesh is not None and mesh.shape[a] > 1
    ]
    if ep_axes:
        from hunyuan_jax.expert_parallel import make_expert_parallel_fn

        return make_expert_parallel_fn(mesh, rules, tcfg.ep_strategy, mcfg.capacity_factor)
    return moe.make_capacity_experts(mcfg.capacity_factor)


def train_shardings(abstract: TrainState, mesh, rules) -> TrainState:
    replicated = NamedSharding(mesh, P())
    return TrainState(
        state_shardings(abstract.params, rules, mesh),
        state_shardings(abstract.opt_state, rules, mesh),
        replicated,
    )


def abstract_train_state(graphdef_params_abstract, opt: Optimizer) -> TrainState:
    params = graphdef_params_abstract
    return TrainState(
        params, jax.eval_shape(opt.tx.init, params), jax.ShapeDtypeStruct((), jnp.int32)
    )


def init_train_state(model: nnx.Module, opt: Optimizer, mesh, rules):
    """(graphdef, TrainState placed by the rules) from a model (random or loaded)."""
    graphdef, params = nnx.split(model)
    abstract = abstract_train_state(jax.eval_shape(lambda: params), opt)
    sh = train_shardings(abstract, mesh, rules)
    params = jax.device_put(params, sh.params)  # no-op when already placed
    opt_state = jax.jit(opt.tx.init, out_shardings=sh.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), sh.step)
    return graphdef, TrainState(params, opt_state, step)


def make_train_step(
    graphdef, opt: Optimizer, mcfg: ModelConfig, tcfg: TrainConfig, experts_fn: moe.ExpertsFn | None
) -> Callable:
    """step(state, batch) -> (state, metrics); batch arrays are [micro, rows, seq]."""
    base_key = jax.random.key(tcfg.seed)

    def step_fn(state: TrainState, batch: dict):
        key = jax.random.fold_in(base_key, state.step)
        num_micro = batch["inputs"].shape[0]
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

        def micro_objective(params, micro, mkey):
            model = nnx.merge(graphdef, params)
            loss, m = lm_loss(
                model,
                micro,
                experts_fn=experts_fn,
                key=mkey,
                aux_loss_coef=tcfg.aux_loss_coef,
                z_loss_coef=tcfg.z_loss_coef,
            )
            ce = m["ce_loss"]
            # The batch's token-mean cross entropy is sum_i ce_i * tokens_i / tokens.
            return ce * (m["tokens"] / total_tokens) + (loss - ce) / num_micro, m

        grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

        def one(params, i):
            micro = {k: v[i] for k, v in batch.items()}
            (obj, m), g = grad_fn(params, micro, jax.random.fold_in(key, i))
            m = dict(m)
            m["ce_sum"] = m.pop("ce_loss") * m["tokens"]
            m["objective"] = obj
            return g, m

        if num_micro == 1:
            grads, sums = one(state.params, 0)
        else:

            def body(carry, i):
                acc, msum = carry
                g, m = one(state.params, i)
                return (jax.tree.map(jnp.add, acc, g), jax.tree.map(jnp.add, msum, m)), None

            zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
            g_shape, m_shape = jax.eval_shape(one, state.params, 0)
            (grads, sums), _ = jax.lax.scan(
                body, (zeros(g_shape), zeros(m_shape)), jnp.arange(num_micro)
            )

        grad_norm = optax.tree.norm(grads)
        loss = sums["objective"]
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = opt.tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = TrainState(
            keep(new_params, state.params), keep(new_opt, state.opt_state), state.step + 1
        )
        metrics = {
            "loss": loss,
            "ce_loss": sums["ce_sum"] / total_tokens,
            "aux_loss": sums["aux_loss"] / num_micro,
            "z_loss": sums["z_loss"] / num_micro,
            "expert_load": sums["expert_load"] / num_micro,
            "tokens": sums["tokens"],
            "grad_norm": grad_norm,
            "lr": opt.schedule(state.step),
            "ok": ok,
        }
        for name in ("rerouted_fraction", "dropped_fraction"):
            if name in sums:
                metrics[name] = sums[name] / num_micro
        return new_state, metrics

    return step_fn


def jit_train_step(step_fn, shardings: TrainState, batch_sharding, mesh):
    """jax.jit with explicit shardings; the state argument is donated."""
    batch_sh = {
        k: batch_sharding for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")
    }
    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,),
    )


# ----------------------------------------------------------------------------- MFU
_PEAK_BF16 = {
    "v4": 275e12,
    "v5p": 459e12,
    "v5 lite": 197e12,
    "v5e": 197e12,
    "v6 lite": 918e12,
    "v6e": 918e12,
}  # SPEC 6, per chip


def peak_flops_per_device(tcfg: TrainConfig) -> float | None:
    if tcfg.peak_flops_per_device is not None:
        return tcfg.peak_flops_per_device
    dev = jax.devices()[0]
    if dev.platform != "tpu":
        return None
    kind = dev.device_kind.lower()
    for name, flops in sorted(_PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return flops
    return None


# ----------------------------------------------------------------------------- data setup
def _find_tokenizer(path):
    """A tokenizer inside a checkpoint / run directory (itself or its tokenizer/), or None."""
    from hunyuan_jax.tokenizer import load_tokenizer

    for cand in (Path(path), Path(path) / "tokenizer"):
        try:
            return load_tokenizer(cand)
        except (FileNotFoundError, ValueError):
            continue
    return None


def setup_tokenizer(tcfg: TrainConfig, mcfg: ModelConfig, run_dir: Path, docs, kind: str):
    """The run's tokenizer, copied into <run>/tokenizer/ (a resumed run reuses that copy):
    tokenizer="auto": the --init-from checkpoint's tokenizer if it has one, else as
    "sentencepiece": train a SentencePiece model on (this host's share of) the corpus; any
    other value: a tokenizer path (hy.tiktoken directory or file, SentencePiece .model)."""
    from hunyuan_jax.checkpointing import copy_tokenizer_files
    from hunyuan_jax.data import texts_for_tokenizer
    from hunyuan_jax.tokenizer import SentencePieceTokenizer, load_tokenizer

    tok_dir = run_dir / "tokenizer"
    tok = _find_tokenizer(tok_dir) if tok_dir.is_dir() else None
    if tok is None and tcfg.tokenizer == "auto" and tcfg.init_from:
        tok = _find_tokenizer(tcfg.init_from)
    if tok is None and tcfg.tokenizer in ("auto", "sentencepiece"):
        if jax.process_index() == 0:
            vocab = tcfg.tokenizer_vocab_size or mcfg.vocab_size
            SentencePieceTokenizer.train(
                texts_for_tokenizer(docs, kind, tcfg.tokenizer_train_bytes),
                tok_dir / "tokenizer",
                vocab,
                hard_vocab_limit=False,
            )  # small corpora: fewer
        if jax.process_count() > 1:  # the run directory is shared by the hosts
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("tokenizer trained")
        tok = SentencePieceTokenizer.load(tok_dir / "tokenizer.model")
    if tok is None:
        tok = load_tokenizer(tcfg.tokenizer)
    copy_tokenizer_files(tok, run_dir)
    if tok.vocab_size > mcfg.vocab_size:
        raise ValueError(
            f"tokenizer {type(tok).__name__} has {tok.vocab_size} ids but the "
            f"model's vocab_size is {mcfg.vocab_size} (tokenizer=sentencepiece "
            f"trains one that fits)"
        )
    return tok


def make_loader(tcfg: TrainConfig, mcfg: ModelConfig, run_dir: Path, log=print):
    from hunyuan_jax.data import PackedLoader, embedded_corpus, read_documents, tokenize

    pi, pc = jax.process_index(), jax.process_count()
    if tcfg.batch_size % pc:
        raise ValueError(f"batch_size {tcfg.batch_size} not divisible by {pc} hosts")
    if tcfg.data is None:
        docs = embedded_corpus(tcfg.corpus_max_bytes)[pi::pc]
        kind = "text"
    else:
        fmt = tcfg.data_format
        docs, kind = read_documents(tcfg.data, fmt, tcfg.text_field, pi, pc)
    t0 = time.time()
    tok = setup_tokenizer(tcfg, mcfg, run_dir, docs, kind)
    tokenized = tokenize(tok, docs, kind)
    n_tokens = sum(len(ids) for ids, _ in tokenized)
    log(
        f"[data] {len(tokenized)} {kind} documents, {n_tokens:,} tokens on this host "
        f"({type(tok).__name__}, {tok.vocab_size} ids; {time.time() - t0:.1f}s)"
    )
    rows = tcfg.batch_size // pc
    loader = PackedLoader(
        tokenized,
        rows,
        tcfg.seq_len,
        tcfg.micro_batches,
        seed=tcfg.seed,
        shuffle=tcfg.shuffle,
        pack=tcfg.pack,
        pad_id=tok.pad_id,
    )
    return tok, loader


# ----------------------------------------------------------------------------- init-from
_POLICY_FIELDS = (
    "capacity_factor",
    "attention_dropout",
    "hidden_dropout",
    "param_dtype",
    "compute_dtype",
    "remat",
    "scan_layers",
)


def load_initial_model(path: str, mcfg: ModelConfig, mesh, rules):
    """(ModelConfig, model) from `--init-from`: a run directory of ours (config.yaml +
    checkpoints/: its latest params), a checkpoint converted by `hunyuan_jax.convert`
    (`checkpoint_format.restore_model`, cast to our param_dtype on read), or a Hugging Face
    directory (config.json + .bin / .safetensors shards, loaded in host memory). The
    architecture comes from the checkpoint; the training-policy fields (capacity_factor,
    dropout, param/compute dtype, remat, scan) from our config. Restores go straight into the
    rules' shardings on `mesh`."""
    from hunyuan_jax import checkpoint_format

    policy = {k: getattr(mcfg, k) for k in _POLICY_FIELDS}
    p = Path(path)
    if (p / "config.yaml").is_file() and (p / "checkpoints").is_dir():
        from hunyuan_jax.checkpointing import restore_params

        return restore_params(p, mesh, rules, **policy)
    if checkpoint_format.is_converted(p):
        return checkpoint_format.restore_model(p, mesh, rules, **policy)
    if (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin"))):
        from hunyuan_jax.state import load_hf_model

        return load_hf_model(p, mesh=mesh, rules=rules, **policy)
    raise FileNotFoundError(
        f"--init-from {path}: not a run directory (config.yaml + "
        f"checkpoints/), a converted checkpoint (hunyuan_jax.convert) or a "
        f"Hugging Face directory (config.json + shards)"
    )


# ----------------------------------------------------------------------------- metrics
class MetricsLog:
    """<run>/metrics.jsonl (process 0); on resume, lines past the restored step are dropped."""

    def __init__(self, run_dir: Path, start_step: int):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError):
                    pass
        self.path.write_text("".join(line + "\n" for line in kept))
        self.fh = open(self.path, "a")

    def write(self, record: dict) -> None:
        if self.enabled:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.enabled:
            self.fh.close()


def _to_record(step: int, m: dict) -> dict:
    rec = {"step": step}
    for k, v in m.items():
        v = np.asarray(v)
        rec[k] = v.tolist() if v.ndim else (bool(v) if v.dtype == bool else float(v))
    return rec


# ----------------------------------------------------------------------------- the loop
def _check_resume_config(run_dir: Path, mcfg: ModelConfig) -> None:
    from hunyuan_jax.checkpointing import read_run_config

    try:
        saved, _ = read_run_config(run_dir)
    except FileNotFoundError:
        return
    diff = [
        f
        for f in saved.__dataclass_fields__
        if f not in _POLICY_FIELDS and getattr(saved, f) != getattr(mcfg, f)
    ]
    if diff:
        raise ValueError(
            f"cannot resume {run_dir}: the model config differs from the run's "
            f"config.yaml in {diff}"
        )


def make_mesh(spec: str):
    """The mesh of `spec`; a fully specified mesh smaller than the host's devices uses the
    first devices (e.g. a one-device run on a simulated 8-device CPU)."""
    import math

    from sharding.mesh import MeshConfig, build_mesh

    cfg = MeshConfig.coerce(spec)
    sizes = tuple(cfg.ici) + tuple(cfg.dcn)
    n = math.prod(sizes)
    if -1 not in sizes and jax.process_count() == 1 and n < jax.device_count():
        return build_mesh(cfg, jax.devices()[:n])
    return build_mesh(cfg)


def train(mcfg: ModelConfig, tcfg: TrainConfig, *, log: Callable[[str], Any] = print) -> dict:
    """Trains (or resumes) the run in tcfg.run_dir up to tcfg.end_step. Returns a summary."""
    from hunyuan_jax.checkpointing import Checkpointer

    if jax.process_index() != 0:
        log = lambda *_: None
    run_dir = Path(tcfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh, rules = make_mesh(tcfg.mesh), get_rules(tcfg.rules)
    ckpt = Checkpointer(run_dir, tcfg.keep_checkpoints, tcfg.async_checkpointing)
    try:
        return _train(mcfg, tcfg, log, run_dir, mesh, rules, ckpt)
    finally:
        ckpt.close()  # pending async saves complete (or the process dies: tmp dirs only)


def _train(mcfg, tcfg, log, run_dir, mesh, rules, ckpt) -> dict:
    from hunyuan_jax.checkpointing import with_shardings, write_run_config
    from hunyuan_jax.data import batch_sharding, gather_states, to_global
    from hunyuan_jax.state import abstract_model, init_model

    resume_step = ckpt.latest_step()
    if resume_step is not None:
        _check_resume_config(run_dir, mcfg)
    t0 = time.time()
    if resume_step is None and tcfg.init_from:  # the checkpoint's architecture from here on
        mcfg, model = load_initial_model(tcfg.init_from, mcfg, mesh, rules)
        log(f"[init] weights from {tcfg.init_from} ({time.time() - t0:.1f}s)")
    tok, loader = make_loader(tcfg, mcfg, run_dir, log)
    opt = make_optimizer(tcfg, mcfg)

    if resume_step is not None:
        graphdef, abstract_params = nnx.split(abstract_model(mcfg, rules))
        abstract = abstract_train_state(abstract_params, opt)
        sh = train_shardings(abstract, mesh, rules)
        params, opt_state, data_states = ckpt.restore(
            resume_step,
            with_shardings(abstract.params, sh.params),
            with_shardings(abstract.opt_state, sh.opt_state),
        )
        state = TrainState(
            params, opt_state, jax.device_put(jnp.asarray(resume_step, jnp.int32), sh.step)
        )
        if str(jax.process_index()) not in data_states:
            raise ValueError(
                f"checkpoint {resume_step} holds data-iterator states of processes "
                f"{sorted(data_states)}; this is process {jax.process_index()} "
                f"of {jax.process_count()} (resume with the same host count)"
            )
        loader.restore(data_states[str(jax.process_index())])
        log(
            f"[ckpt] resumed from step {resume_step} ({time.time() - t0:.1f}s); data at "
            f"{loader.state()}"
        )
    else:
        if not tcfg.init_from:
            model = init_model(mcfg, tcfg.seed, mesh, rules)
        graphdef, state = init_train_state(model, opt, mesh, rules)
        del model
        sh = train_shardings(jax.eval_shape(lambda: state), mesh, rules)
    write_run_config(run_dir, mcfg, tcfg)
    if mcfg.param_dtype != "float32":
        log(
            f"[train] warning: param_dtype={mcfg.param_dtype}: master weights and AdamW state "
            f"are kept in that dtype (float32 is the intended policy)"
        )

    start = int(resume_step or 0)
    end = tcfg.end_step
    sizes = group_sizes(state.params)
    n_active = active_params(mcfg, state.params)
    log(
        f"[model] {sum(sizes.values()):,} params ({n_active:,} active per token); lr factors "
        f"{ {k: round(v, 4) for k, v in opt.scales.items()} }; mesh "
        f"{dict(mesh.shape)} rules {tcfg.rules}"
    )
    metrics_log = MetricsLog(run_dir, start)
    if start >= end:
        log(f"[train] nothing to do: at step {start}, end step {end}")
        metrics_log.close()
        return {"start_step": start, "end_step": start, "losses": []}

    b_sh = batch_sharding(mesh, rules)
    shards = math.prod(mesh.shape[a] for a in jax.tree.leaves(tuple(b_sh.spec[1:2])))
    rows = tcfg.batch_size // tcfg.micro_batches
    if rows % shards:
        raise ValueError(
            f"batch_size / micro_batches = {rows} rows per micro-batch must be "
            f"divisible by the {shards} devices the batch is sharded over "
            f"({b_sh.spec[1]} of mesh {dict(mesh.shape)})"
        )
    experts_fn = make_experts_fn(mcfg, tcfg, mesh, rules)
    step_fn = make_train_step(graphdef, opt, mcfg, tcfg, experts_fn)
    jitted = jit_train_step(step_fn, sh, b_sh, mesh)
    peak = peak_flops_per_device(tcfg)
    flops_per_token = 6.0 * n_active
    losses, last_good = [], resume_step
    t_compile = None
    with jax.set_mesh(mesh):
        t_log, tokens_since = time.time(), 0
        for step in range(start, end):
            batch = to_global(next(loader), b_sh, tcfg.batch_size)
            if t_compile is None:
                t0 = time.time()
                jitted = jitted.lower(state, batch).compile()
                t_compile = time.time() - t0
                log(
                    f"[train] step compiled in {t_compile:.1f}s; steps {start} -> {end}, "
                    f"{tcfg.tokens_per_step:,} tokens per step"
                )
                t_log = time.time()
            state, metrics = jitted(state, batch)
            m = jax.device_get(metrics)
            done = step + 1
            rec = _to_record(done, m)
            if not m["ok"]:
                msg = (
                    f"non-finite loss or gradient at step {done} (loss={float(m['loss'])}, "
                    f"grad_norm={float(m['grad_norm'])})"
                )
                if tcfg.on_nonfinite == "stop":
                    metrics_log.write(rec)
                    metrics_log.close()
                    where = (
                        f"the last good checkpoint is step {last_good} in {ckpt.directory}"
                        if last_good is not None
                        else "no checkpoint was saved"
                    )
                    raise NonFiniteLoss(f"{msg}: stopping without saving; {where}")
                log(f"[train] {msg}: batch skipped (parameters unchanged)")
            losses.append(float(m["loss"]))
            tokens_since += tcfg.tokens_per_step
            if done % tcfg.log_every == 0 or done == end:
                dt = max(time.time() - t_log, 1e-9)
                tps = tokens_since / dt
                mfu = (flops_per_token * tps / (peak * jax.device_count())) if peak else None
                rec.update(tokens_per_s=tps, mfu=mfu)
                load = np.asarray(m["expert_load"])
                log(
                    f"step {done:6d} | loss {float(m['loss']):.4f} | ce {float(m['ce_loss']):.4f}"
                    f" | aux {float(m['aux_loss']):.3f} | rerouted "
                    f"{float(m.get('rerouted_fraction', 0.0)):.3f} | load max/min "
                    f"{load.max():.3f}/{load.min():.3f} | gnorm {float(m['grad_norm']):.3f} | "
                    f"lr {float(m['lr']):.2e} | {tps:,.0f} tok/s | MFU "
                    + (f"{100 * mfu:.1f}%" if mfu is not None else "n/a")
                )
                t_log, tokens_since = time.time(), 0
            metrics_log.write(rec)
            if done % tcfg.save_every == 0 or done == end:
                ckpt.save(done, state.params, state.opt_state, gather_states(loader.state()))
                last_good = done
    metrics_log.close()
    log(f"[train] done at step {end}; checkpoints {ckpt.all_steps()} in {ckpt.directory}")
    return {
        "start_step": start,
        "end_step": end,
        "losses": losses,
        "compile_s": t_compile,
        "params": sum(sizes.values()),
        "active_params": n_active,
    }


# ----------------------------------------------------------------------------- smoke run
def smoke_train(
    run_dir: str | Path,
    config: str | Path | None = None,
    overrides=(),
    log: Callable[[str], Any] = print,
) -> dict:
    """The CPU smoke run (configs/tiny.yaml: tiny model, embedded corpus, SentencePiece,
    8-device expert-parallel mesh): train to half the steps and stop, resume from the
    checkpoint in a second `train` call (as a restarted process would), finish, and check that
    the loss fell. Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX
    starts (for the default mesh). Returns a summary dict (printed by `log`)."""
    import shutil

    from hunyuan_jax.train_config import load_configs

    config = config or Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    run_dir = Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    mcfg, tcfg = load_configs(config, [*overrides, f"run_dir={run_dir}"])
    half = max(1, tcfg.steps // 2)
    t0 = time.time()
    first = train(mcfg, tcfg.replace(stop_at=half), log=log)
    second = train(mcfg, tcfg, log=log)
    losses = first["losses"] + second["losses"]
    k = min(5, len(losses))
    summary = {
        "steps": tcfg.steps,
        "resumed_at": second["start_step"],
        "first_loss": losses[0],
        "last_loss_mean": float(np.mean(losses[-k:])),
        "checkpoints": sorted(
            int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()
        ),
        "wall_s": time.time() - t0,
        "run_dir": str(run_dir),
    }
    summary["ok"] = (
        second["start_step"] == half and summary["last_loss_mean"] < summary["first_loss"] - 0.5
    )
    log(
        f"[smoke] trained {tcfg.steps} steps on {jax.device_count()} devices, stopped at "
        f"{half} and resumed from its checkpoint; loss {summary['first_loss']:.3f} -> "
        f"{summary['last_loss_mean']:.3f} (mean of the last {k}); checkpoints "
        f"{summary['checkpoints']}; {summary['wall_s']:.0f}s; "
        f"{'PASS' if summary['ok'] else 'FAIL'}"
    )
    return summary
