"""The serving engine (hunyuan_jax/engine): paged KV cache, prefix caching, batched chunked
prefill and preemption, against the contiguous-cache `Generator` on the hy_tiny reference
checkpoint in float32.

Exactness: greedy tokens must be identical (token for token) to the same prompt decoded alone
by the Generator; the model's logits through the page pool must equal the contiguous cache's
within 1e-4 (float32, another summation order: ~1e-6 relative per logit).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import decode_tiny, make_plan
from flax import nnx

from hunyuan_jax.decode.sampling import SamplingConfig
from hunyuan_jax.engine.core import EngineCore, token_buckets
from hunyuan_jax.engine.offline import OfflineGenerator, request_seed
from hunyuan_jax.engine.requests import GenParams, Request, check_request
from hunyuan_jax.engine.scheduler import Engine
from tests.helpers.contiguous import Generator

MAX_LEN = 64
ATOL = 1e-4
needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.fixture(scope="module")
def model():
    return decode_tiny()


@pytest.fixture(scope="module")
def prompts(reference):
    rng = np.random.default_rng(0)
    p = reference["greedy_prompt"][0].tolist()
    long = rng.integers(3, 1000, size=37).tolist()
    return [p, p[:4][::-1], reference["input_ids"][1, :17].tolist(), long, [5]]


@pytest.fixture(scope="module")
def alone(model, prompts):
    """Each prompt decoded alone by the contiguous-cache Generator (greedy, 12 tokens)."""
    gen = Generator(model, eos_ids=[2], prefill_chunk=8)
    return [gen.generate([p], 12, max_len=MAX_LEN).tokens[0] for p in prompts]


def _run(engine: Engine, prompts, params: list[GenParams] | GenParams, max_steps=2000):
    """Submits every prompt at once and runs the engine on this thread; returns the tokens
    and the events of each request."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    events = [[] for _ in prompts]
    reqs = [Request(p, g, events[i].append) for i, (p, g) in enumerate(zip(prompts, params))]
    for r in reqs:
        engine.submit(r)
    engine.run_until_idle(max_steps)
    assert not engine.running and not engine.waiting, "the engine did not finish in time"
    tokens = [[e.token for e in ev if e.kind == "token"] for ev in events]
    return tokens, events, reqs


def _engine(model, **kw):
    core_kw = {k: kw.pop(k) for k in list(kw) if k in ("max_seqs", "page_size", "num_pages",
                                                      "token_budget", "cache_dtype")}  # fmt: skip
    core = EngineCore(model, max_len=MAX_LEN, **{"max_seqs": 4, **core_kw})
    return Engine(core, eos_ids=[2], log=lambda m: None, **kw)


GREEDY = GenParams(max_tokens=12)


@pytest.fixture(scope="module")
def shared(model):
    """Page size 4 (sequences cross many page boundaries), token budget 16: prompts are chunked
    over several steps that also carry other sequences' decode tokens."""
    return _engine(model, page_size=4, token_budget=16)


def test_token_buckets():
    assert token_buckets(4, 64) == (1, 2, 4, 8, 16, 32, 64)
    assert token_buckets(8, 8) == (1, 2, 4, 8)
    assert token_buckets(30, 96) == (1, 2, 4, 8, 16, 32, 64, 96)


def test_alone_and_under_load_equal_generator(shared, prompts, alone):
    engine = shared
    assert engine.ex.executables == len(engine.ex.buckets) + 1
    for p, want in zip(prompts, alone):  # one at a time
        got, _, _ = _run(engine, [p], GREEDY)
        assert got[0] == want
    got, _, _ = _run(engine, prompts, GREEDY)  # all together (5 requests, 4 rows)
    assert got == alone
    assert sum(engine.steps.values()) > 0 and len(engine.steps) >= 2  # several buckets ran


def test_prefix_hit_same_tokens_and_reported(shared, model):
    engine = shared
    before = engine.pool.stats()
    system = np.random.default_rng(1).integers(3, 1000, size=37).tolist()  # 9 full pages
    first, _, r1 = _run(engine, [system + [7, 8]], GREEDY)
    second, _, r2 = _run(engine, [system + [9, 10, 11]], GREEDY)
    assert r1[0].cached_tokens == 0
    assert r2[0].cached_tokens == 36  # 9 full pages of the shared 37-token start
    gen = Generator(model, eos_ids=[2], prefill_chunk=8)
    assert second[0] == gen.generate([system + [9, 10, 11]], 12, max_len=MAX_LEN).tokens[0]
    again, _, r3 = _run(engine, [system], GREEDY)  # all cached but the last token's page
    assert again[0] == gen.generate([system], 12, max_len=MAX_LEN).tokens[0]
    assert r3[0].cached_tokens == 36
    stats = engine.pool.stats()
    assert stats["hit_tokens"] - before["hit_tokens"] == 72 and 0 < stats["hit_rate"] < 1


def test_requests_arriving_together_compute_a_shared_prefix_once(shared, model):
    """Four requests with one 37-token start submitted at once (4 rows free): the first
    computes the start's 9 full pages, the other three wait until they are cached and take
    them (36 cached tokens each) instead of computing them again; tokens as computed alone."""
    engine = shared
    system = np.random.default_rng(2).integers(3, 1000, size=37).tolist()
    prompts = [system + [7 + i] * (i + 1) for i in range(4)]
    fed = sum(engine.step_tokens.values())
    got, _, reqs = _run(engine, prompts, GREEDY)
    assert [r.cached_tokens for r in reqs] == [0, 36, 36, 36]
    fed = sum(engine.step_tokens.values()) - fed
    prompt_tokens = sum(len(p) for p in prompts)
    decode = sum(len(g) - 1 for g in got)  # a request's first token comes with its prompt
    assert fed == prompt_tokens - 3 * 36 + decode  # each prompt token once, shared pages once
    gen = Generator(model, eos_ids=[2], prefill_chunk=8)
    assert got == [gen.generate([p], 12, max_len=MAX_LEN).tokens[0] for p in prompts]


def test_pool_runs_out_preempts_without_losing_a_request(model, prompts, alone):
    """14 usable pages of 4 tokens for 4 rows (the longest request, 37 + 12 tokens, needs 13):
    decoding sequences outgrow the pool, the youngest is preempted, recomputed later and
    still gives the tokens it gives alone."""
    engine = _engine(model, page_size=4, num_pages=15, token_budget=16, prefix_caching=False)
    too_long = prompts[3] + [9] * 8  # 45 + 12 tokens: more than the whole pool's 56
    got, events, _ = _run(engine, prompts + [too_long], GREEDY)
    assert engine.preemptions > 0
    assert got[:-1] == alone
    assert all(ev[-1].finish_reason == "length" for ev in events[:-1])
    assert events[-1][-1].finish_reason == "error" and "page pool" in events[-1][-1].error
    assert engine.pool.available() == 14


def test_seeded_sampling_unchanged_by_batch(shared, prompts):
    engine = shared
    sampled = GenParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    alone_s, _, _ = _run(engine, [prompts[0]], sampled)
    mixed = [GREEDY, sampled, GenParams(max_tokens=7, temperature=1.3, seed=7), GREEDY]
    got, _, _ = _run(engine, [prompts[2], prompts[0], prompts[1], prompts[3]], mixed)
    assert got[1] == alone_s[0]


def test_repetition_penalty_matches_generator(shared, model, prompts):

    gen = Generator(model, sampling=SamplingConfig(repetition_penalty=1.3), eos_ids=[2])
    want = [gen.generate([p], 12, max_len=MAX_LEN).tokens[0] for p in prompts[:3]]
    engine = shared
    params = GenParams(max_tokens=12, repetition_penalty=1.3)
    _run(engine, [prompts[0]], GREEDY)  # leaves cached pages a penalty request must not use
    got, _, reqs = _run(engine, prompts[:3], params)
    assert got == want and all(r.cached_tokens == 0 for r in reqs)


def test_prompt_logprobs_equal_full_forward(shared, model, prompts):
    engine = shared
    p = prompts[3]
    _, events, _ = _run(engine, [p], GenParams(max_tokens=0, prompt_logprobs=True))
    lps = next(e.prompt_logprobs for e in events[0] if e.kind == "prompt")
    logits, _, _ = model(np.asarray([p], np.int32))
    ref = jax.nn.log_softmax(np.asarray(logits[0], np.float32), axis=-1)
    want = [float(ref[i, p[i + 1]]) for i in range(len(p) - 1)]
    assert lps[0] is None and len(lps) == len(p)
    np.testing.assert_allclose([lp for lp, _ in lps[1:]], want, atol=ATOL)
    assert events[0][-1].finish_reason == "length"


def test_int8_pool_close_to_float(model):
    """int8 pages (per-token, per-head absmax scales: a relative step of 1/254 per element):
    teacher-forced log-probabilities of a 60-token prompt against the float32 full forward.
    Same bound as the contiguous int8 cache's (tests/test_decode.py): median error < 0.1; the
    tiny random model's top-1 routing flips under small perturbations, hence no tight max."""
    engine = _engine(model, page_size=4, token_budget=16, cache_dtype="int8")
    p = np.random.default_rng(0).integers(3, 1000, size=60).tolist()
    _, events, _ = _run(engine, [p], GenParams(max_tokens=0, prompt_logprobs=True))
    lps = next(e.prompt_logprobs for e in events[0] if e.kind == "prompt")
    logits, _, _ = model(np.asarray([p], np.int32))
    ref = jax.nn.log_softmax(np.asarray(logits[0], np.float32), axis=-1)
    err = np.abs(np.array([lp for lp, _ in lps[1:]]) - [ref[i, p[i + 1]] for i in range(59)])
    assert np.median(err) < 0.1 and err.max() < 1.0, (np.median(err), err.max())


def test_check_request_pool_limit():
    assert "page pool" in check_request([1] * 10, 30, 64, 100, pool_tokens=32)
    assert check_request([1] * 10, 20, 64, 100, pool_tokens=32) is None


@needs8
def test_mesh_equals_one_device(prompts, alone):
    """tensor=2 x expert=4: the pool's kv heads over 'tensor', experts over 'expert'."""
    model8 = decode_tiny(make_plan((1, 1, 4, 2), rules="serve_ep_tp"))
    engine = _engine(model8, page_size=4, token_budget=16)
    got, _, _ = _run(engine, prompts, GREEDY)
    assert got == alone


def test_offline_generator_equals_generator_and_is_independent_of_batch(model, prompts, alone):
    gen = OfflineGenerator(model, eos_ids=[2], page_size=4, token_budget=32)
    out = gen.generate(prompts, 12, max_len=MAX_LEN)
    assert out.tokens == alone
    assert out.finish_reasons == ["eos" if t[-1] == 2 else "length" for t in alone]
    assert out.prompt_tokens == sum(len(p) for p in prompts) and out.compile_seconds > 0
    sampled = OfflineGenerator(model, sampling=SamplingConfig(temperature=1.0, top_p=0.9))
    both = sampled.generate(prompts[:2], 8, seed=3).tokens
    assert sampled.generate(prompts[:1], 8, seed=3).tokens[0] == both[0]  # request 0's key
    assert sampled.generate(prompts[:1], 8, seed=4).tokens[0] != both[0]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate([[1], []], 4)


def test_offline_group_prefilled_once_logprobs_and_set_params(model, prompts):
    """RL rollouts' needs: a group's repeated prompt prefilled once (the repeats take its full
    pages from the prefix cache: same tokens as without the cache), each token's log-probability, and
    `set_params` (the programs run on new arrays of the same tree, as a fresh engine on them
    would; another tree is refused; tests/test_grpo.py checks the rollout's log-probs against
    the train step's recomputation on the arrays it updated)."""
    group = [prompts[3]] * 4  # 37 tokens: 9 full pages of 4
    gen = OfflineGenerator(
        model, sampling=SamplingConfig(temperature=1.0), eos_ids=[2], page_size=4,
        token_budget=32,
    )  # fmt: skip
    shared = gen.generate(group, 6, seed=1, max_len=MAX_LEN)
    assert gen.cached_tokens == 3 * 36  # the first computes the 9 pages, the repeats take them
    again = gen.generate(group, 6, seed=1, max_len=MAX_LEN)  # a call's pool starts empty
    assert gen.cached_tokens == 3 * 36 and again.tokens == shared.tokens
    core = next(iter(gen._cores.values()))
    plain = Engine(core, eos_ids=[2], prefix_caching=False, log=lambda m: None)
    params = [GenParams(max_tokens=6, temperature=1.0, seed=request_seed(1, i)) for i in range(4)]
    toks, events, _ = _run(plain, group, params)
    lps = [[e.logprob for e in ev if e.kind == "token"] for ev in events]
    assert shared.tokens == toks  # the same tokens as with every page computed
    assert [len(lp) for lp in shared.logprobs] == [len(t) for t in shared.tokens]
    np.testing.assert_allclose(sum(shared.logprobs, []), sum(lps, []), atol=ATOL)
    assert all(lp <= 0 for lp in sum(shared.logprobs, []))

    _, params = nnx.split(model)
    moved = jax.tree.map(lambda x: x * 1.5, params)
    gen.set_params(moved)  # the same compiled programs, other arrays
    after = gen.generate(group, 6, seed=1, max_len=MAX_LEN)
    assert after.tokens != shared.tokens
    gen.set_params(params)
    assert gen.generate(group, 6, seed=1, max_len=MAX_LEN).tokens == shared.tokens
    with pytest.raises(ValueError, match="parameter tree differs"):
        gen.set_params({"w": jax.numpy.zeros(3)})


def test_group_arrays_equal_stacked_scan(model, prompts):
    """The CPU decode layout (each layer group's weights arrays of their own, a Python loop;
    the default on one CPU device) against the stacked weights under `lax.scan`: the same
    greedy and seeded tokens, log-probabilities equal within ATOL (another program, float32:
    ~1e-6 relative), on the model's weights and after `set_params` (the split follows)."""
    runs = {}
    for arrays in (True, False):
        core = EngineCore(model, max_seqs=4, max_len=MAX_LEN, page_size=4, token_budget=16,
                          group_arrays=arrays)  # fmt: skip
        assert core.group_arrays is arrays
        params = [GREEDY, GenParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=5)] * 2
        out = []
        for moved in (None, jax.tree.map(lambda a: a * 1.5, nnx.split(model)[1])):
            if moved is not None:
                core.set_params(moved)
            engine = Engine(core, eos_ids=[2], log=lambda m: None)
            tokens, events, _ = _run(engine, prompts[:4], params)
            lps = [[e.logprob for e in ev if e.kind == "token"] for ev in events]
            out.append((tokens, lps))
        runs[arrays] = out
    assert EngineCore(model, max_seqs=1, max_len=8, compile=False).group_arrays  # CPU default
    for (tok_a, lp_a), (tok_b, lp_b) in zip(runs[True], runs[False]):
        assert tok_a == tok_b
        for a, b in zip(lp_a, lp_b):
            np.testing.assert_allclose(a, b, atol=ATOL)
    assert runs[True][0][0] != runs[True][1][0]  # the new weights were used
