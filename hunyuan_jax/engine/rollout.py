"""GRPO's batches: rollouts from the serving engine on the arrays the train step updates, their
rewards, advantages and reference log-probabilities, as the run loop's data source.

    tok, source = make_grpo_source(tcfg, mcfg, run_dir, log)       # prompts, reward checked
    source.bind(step)                                               # after TrainStep is built
    local = source.batch_for(state)                                 # rollout every mu steps

Every `grpo.updates_per_rollout` (mu) optimizer steps, `batch_size / group_size` prompts (this
host's share) are taken in the run's shuffled order and each is sampled G times by the one
decode engine (`engine.offline.OfflineGenerator`: paged KV cache, the prompt prefilled once and
its full pages shared by the group's G requests through the prefix cache, the run's sampling
settings, each token's log-probability returned with it). The engine runs on `state.params`
themselves (with LoRA: the frozen base the step holds + the current adapters), set before each
rollout with `set_params`: no weight copy, no transfer. Then the rewards (`rewards.Reward`) on
the completions' text, group-relative advantages (`grpo.group_advantages`), rows of prompt +
completion with the rollout's log-probs as `old_logp`, and (beta > 0) the reference policy's
per-token log-probabilities (`grpo.reference_fn`). The same batch serves the mu updates.

Determinism: rollout k samples with a seed made of (train.seed, k, process index), k = the
number of steps taken / mu, and the prompt order is a `PromptOrder` whose state is in every
checkpoint; checkpoints fall between rollouts (config check), so a resumed run makes the same
rollouts as an uninterrupted one.

It lives in the engine package (which may import train/, never the reverse): train.py hands
`make_grpo_source` to the run loop (`train.loop.train(..., make_grpo_source=...)`).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from hunyuan_jax.data.corpus import to_global
from hunyuan_jax.decode.sampling import SamplingConfig
from hunyuan_jax.engine.offline import OfflineGenerator
from hunyuan_jax.errors import ConfigError
from hunyuan_jax.train.data import setup_tokenizer
from hunyuan_jax.train.grpo import group_advantages, reference_fn
from hunyuan_jax.train.grpo_data import (
    PromptOrder,
    completion_text,
    encode_prompts,
    pack_rollout,
    read_prompts,
)
from hunyuan_jax.train.rewards import Reward


def rollout_seed(seed: int, rollout: int, process: int) -> int:
    """The engine seed of rollout `rollout` on process `process`."""
    state = np.random.SeedSequence([seed, rollout, process]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class RolloutSource:
    """The run loop's data source for `objective: grpo` (see the module docstring)."""

    def __init__(self, tcfg, tok, prompts, records, reward: Reward, log=print):
        self.tcfg, self.g, self.tok = tcfg, tcfg.grpo, tok
        self.prompts, self.records, self.reward, self.log = prompts, records, reward, log
        pc = jax.process_count()
        self.rows = tcfg.batch_size // pc
        self.per_rollout = self.rows // self.g.group_size
        self.order = PromptOrder(len(prompts), tcfg.seed, tcfg.shuffle)
        self.eos_ids = tuple(tok.eos_ids)
        self.step = self.gen = self.ref_fn = self.ref_params = None
        self.batch: dict | None = None
        self.metrics: dict = {}

    # ------------------------------------------------------------------ set-up
    def bind(self, step, ref_params=None) -> None:
        """The train step whose state the rollouts decode; `ref_params`: full fine-tuning's
        copy of the initial weights (the reference, beta > 0)."""
        self.step, self.ref_params = step, ref_params
        self.lora = step.tcfg.lora is not None
        if self.g.beta > 0:
            self.ref_fn = reference_fn(step, self.lora)

    def state(self) -> dict:
        return self.order.state()

    def restore(self, state) -> None:
        self.order.restore(state)
        self.batch = None

    def _engine_params(self, params):
        rest = () if self.step.frozen is None else (self.step.frozen,)
        model = nnx.merge(self.step.graphdef, params, *rest)
        if self.gen is None:
            s = SamplingConfig(self.g.temperature, self.g.top_k, self.g.top_p)
            self.gen = OfflineGenerator(
                model, sampling=s, eos_ids=self.eos_ids, page_size=self.g.page_size,
                max_seqs=self.rows, token_budget=max(512, self.rows),
            )  # fmt: skip
        return nnx.split(model)[1]

    # ------------------------------------------------------------------ batches
    def batch_for(self, state) -> dict:
        """This host's batch for the next optimizer step: a new rollout every mu steps."""
        done = self.order.st.offset
        if self.batch is None or done % self.g.updates_per_rollout == 0:
            self.batch = self._rollout(state, done // self.g.updates_per_rollout)
        self.order.st.offset += 1
        return self.batch

    def _rollout(self, state, k: int) -> dict:
        g, tcfg = self.g, self.tcfg
        t0 = time.perf_counter()
        ids = self.order.take(self.per_rollout)
        prompts = [self.prompts[i] for i in ids for _ in range(g.group_size)]
        engine_params = self._engine_params(state.params)
        self.gen.set_params(engine_params)
        out = self.gen.generate(
            prompts, g.max_new_tokens, seed=rollout_seed(tcfg.seed, k, jax.process_index()),
            max_len=tcfg.seq_len + 1,
        )  # fmt: skip
        t_gen = time.perf_counter() - t0
        rewards = np.zeros(len(prompts))
        for j, completion in enumerate(out.tokens):
            rec = self.records[ids[j // g.group_size]]
            text = completion_text(self.tok, completion, self.eos_ids)
            rewards[j] = self.reward(text, rec.record, rec.source)
        adv = group_advantages(rewards, g.group_size, g.std_normalize)
        flat = pack_rollout(prompts, out.tokens, out.logprobs, tcfg.seq_len, self.tok.pad_id)
        flat["advantages"] = np.repeat(adv.astype(np.float32)[:, None], tcfg.seq_len, axis=1)
        m = tcfg.micro_batches
        batch = {k_: v.reshape(m, -1, tcfg.seq_len) for k_, v in flat.items()}
        batch["ref_logp"] = np.zeros_like(batch["old_logp"])
        t1 = time.perf_counter()
        if self.ref_fn is not None:
            batch["ref_logp"] = self._reference(state.params, batch)
        lengths = np.asarray([len(c) for c in out.tokens], np.float64)
        groups = rewards.reshape(-1, g.group_size)
        self.metrics = {
            "grpo/reward_mean": float(rewards.mean()),
            "grpo/reward_std": float(rewards.std()),
            "grpo/reward_group_std": float(groups.std(axis=1).mean()),
            "grpo/solved_groups": float(np.mean(groups.min(axis=1) == groups.max(axis=1))),
            "grpo/completion_len": float(lengths.mean()),
            "grpo/prefix_cached": self.gen.cached_tokens / max(sum(map(len, prompts)), 1),
            "grpo/truncated": float(np.mean([r == "length" for r in out.finish_reasons])),
            "grpo/rollout_tokens_per_s": float(lengths.sum() / max(t_gen, 1e-9)),
            "grpo/rollout_s": t_gen,
            "grpo/reference_s": time.perf_counter() - t1,
            "grpo/rollout_compile_s": out.compile_seconds,
        }
        self.last_rewards = rewards
        return batch

    def _reference(self, params, batch: dict) -> np.ndarray:
        step = self.step
        glob = to_global(batch, step.batch_sharding, self.tcfg.batch_size)
        ref = self.ref_fn(
            self.ref_params if self.ref_params is not None else params, glob, step.frozen
        )
        return np.asarray(ref)  # one process (make_grpo_source): the whole batch is local


def make_grpo_source(tcfg, mcfg, run_dir: Path, log=print):
    """(tokenizer, RolloutSource) of a GRPO run: the prompts read and validated (file:line),
    the tokenizer set up as for every run, the reward built (a bad user reward fails here)."""
    if tcfg.data is None:
        raise ConfigError("objective 'grpo' needs train key 'data': a prompt JSONL file")
    pi, pc = jax.process_index(), jax.process_count()
    if pc > 1:  # every process would drive the engine's SPMD programs with its own steps
        raise ConfigError(
            f"objective 'grpo' runs in one process for now ({pc} here): multi-host rollouts "
            f"need the engine's broadcast mode (docs/rl.md)"
        )
    if tcfg.batch_size % pc or (tcfg.batch_size // pc) % tcfg.grpo.group_size:
        raise ConfigError(
            f"batch_size {tcfg.batch_size} over {pc} hosts: each host's rows must be a "
            f"multiple of grpo.group_size {tcfg.grpo.group_size}"
        )
    if (tcfg.batch_size // pc) % tcfg.micro_batches:
        raise ConfigError(f"batch_size {tcfg.batch_size} / {pc} hosts / micro_batches must divide")
    reward = Reward(tcfg.grpo)
    t0 = time.time()
    records = read_prompts(tcfg.data, reward.fields, tcfg.grpo.chat, pi, pc)
    docs = [r.text if r.text is not None else r.messages[-1]["content"] for r in records]
    tok = setup_tokenizer(tcfg, mcfg, run_dir, docs, "text", log)
    max_prompt = tcfg.seq_len + 1 - tcfg.grpo.max_new_tokens
    if max_prompt < 1:
        raise ConfigError(
            f"train key 'seq_len' ({tcfg.seq_len}) leaves no room for a prompt beside "
            f"grpo.max_new_tokens ({tcfg.grpo.max_new_tokens})"
        )
    prompts = encode_prompts(tok, records, max_prompt)
    log(
        f"[data] {len(records)} prompts on this host ({sum(map(len, prompts)):,} tokens; "
        f"{type(tok).__name__}, {tok.vocab_size} ids; reward {tcfg.grpo.reward}; "
        f"{time.time() - t0:.1f}s)"
    )
    return tok, RolloutSource(tcfg, tok, prompts, records, reward, log)
