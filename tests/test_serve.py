"""The server (`python -m hunyuan_jax.cli.serve`) against clients nobody here wrote: the official
`openai` client, lm-evaluation-harness (`local-completions`) and plain HTTP for bad input.

One server for the module: the embedded default model in float32, 4 requests in flight, 128
tokens per request, engine steps of 16 tokens, pages of 16 tokens, uvicorn in a thread on 127.0.0.1 with an ephemeral port. All
traffic stays on the loopback address and every wait is bounded in count and time.

Exactness: greedy results must equal the same prompt decoded alone by the `Generator` (same
weights, cache length and chunk), token for token (compared through the text and the token
count). lm-eval's log-likelihoods must equal our own full-sequence scoring
(log-softmax of `model(tokens)` summed over the continuation) within 1e-4 absolute: both are
float32, but the server's come from chunked prefill with a KV cache (other summation order),
about 1e-6 relative per logit over a few tokens.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

DATA = Path(__file__).parent / "data"
MAX_LEN, SLOTS, CHUNK = 128, 4, 16
LL_TOLERANCE = 1e-4


class _Server:
    def __init__(self, state):
        import uvicorn

        from hunyuan_jax.serve.api import create_app

        self.state = state
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(state), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self):
        self.state.engine.start()
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start in 30 s"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.state.engine.shutdown()
        self.sock.close()


@pytest.fixture(scope="module")
def server():
    from hunyuan_jax.cli.serve import build_state

    t0 = time.time()
    state = build_state(
        dtype="float32", slots=SLOTS, max_len=MAX_LEN, prefill_chunk=CHUNK, max_queue=64
    )
    assert (
        state.engine.ex.executables == len(state.engine.ex.programs) == 6
    )  # 1, 2, 4, 8, 16, score
    print(f"server built in {time.time() - t0:.1f}s")
    with _Server(state) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def generator(server):
    from tests.helpers.contiguous import Generator

    ex = server.state.engine.ex
    model = _model(server)
    return Generator(model, eos_ids=sorted(server.state.engine.eos), prefill_chunk=CHUNK,
                     vocab_limit=ex.vocab_limit)  # fmt: skip


def _model(server):
    from flax import nnx

    ex = server.state.engine.ex
    return nnx.merge(ex.graphdef, ex.params)


def _expected(server, generator, prompt, max_tokens):
    """(text, number of new tokens) of `prompt` decoded alone by the Generator."""
    out = generator.generate([prompt], max_tokens, max_len=MAX_LEN).tokens[0]
    eos = server.state.engine.eos
    text = server.state.tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True)
    return text, len(out)


def _get(server, path):
    import httpx

    return httpx.get(server.url + path, timeout=10)


def _post(server, path, body=None, content=None):
    import httpx

    return httpx.post(server.url + path, json=body, content=content, timeout=60,
                      headers={"content-type": "application/json"})  # fmt: skip


def _metric(server, name: str) -> float:
    total = 0.0
    for line in _get(server, "/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_idle(server, seconds=15.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        h = _get(server, "/health").json()
        if h["active_slots"] == 0 and h["queue_length"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"server not idle after {seconds}s: {h}")


# ----------------------------------------------------------------------------- openai client
def test_models_health_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["hunyuan-jax-default"]
    assert _get(server, "/health").json()["status"] == "ok"
    text = _get(server, "/metrics").text
    for name in ("hunyuan_queue_length", "hunyuan_active_slots", "hunyuan_tokens_per_second",
                 "hunyuan_time_to_first_token_seconds_bucket",
                 "hunyuan_time_per_output_token_seconds_bucket"):  # fmt: skip
        assert name in text
    assert "hunyuan_executables 6.0" in text


def test_openai_completions(server, client, generator):
    tok = server.state.tokenizer
    prompt = "def main("
    want, n = _expected(server, generator, tok.encode(prompt), 20)
    r = client.completions.create(model="hunyuan-jax-default", prompt=prompt, max_tokens=20,
                                  temperature=0)  # fmt: skip
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == n
    assert r.choices[0].finish_reason in ("stop", "length")
    stream = client.completions.create(model="hunyuan-jax-default", prompt=prompt,
                                       max_tokens=20, temperature=0, stream=True)  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # token ids as the prompt, a batch of two prompts
    ids = tok.encode("import os\nimport")
    r2 = client.completions.create(model="hunyuan-jax-default", prompt=[ids, tok.encode(prompt)],
                                   max_tokens=20, temperature=0)  # fmt: skip
    assert [c.index for c in r2.choices] == [0, 1]
    assert r2.choices[0].text == _expected(server, generator, ids, 20)[0]
    assert r2.choices[1].text == want


def test_openai_chat(server, client, generator):
    tok = server.state.tokenizer
    msgs = [{"role": "user", "content": "Write a function."}]
    want, n = _expected(server, generator, tok.apply_chat_template(msgs), 16)
    r = client.chat.completions.create(model="hunyuan-jax-default", messages=msgs,
                                       max_tokens=16, temperature=0)  # fmt: skip
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.completion_tokens == n
    stream = client.chat.completions.create(
        model="hunyuan-jax-default", messages=msgs, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[-1].usage.completion_tokens == n
    lps = [e for c in chunks if c.choices and c.choices[0].logprobs
           for e in c.choices[0].logprobs.content]  # fmt: skip
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in lps)


def test_sampling_seed_and_stop(server, client):
    kw = dict(model="hunyuan-jax-default", prompt="class ", max_tokens=24, temperature=0.9,
              top_k=50, top_p=0.95, repetition_penalty=1.2)  # fmt: skip
    a = client.completions.create(seed=7, **{k: v for k, v in kw.items() if k not in
                                  ("top_k", "repetition_penalty")},
                                  extra_body={"top_k": 50, "repetition_penalty": 1.2})  # fmt: skip
    b = client.completions.create(seed=7, **{k: v for k, v in kw.items() if k not in
                                  ("top_k", "repetition_penalty")},
                                  extra_body={"top_k": 50, "repetition_penalty": 1.2})  # fmt: skip
    assert a.choices[0].text == b.choices[0].text  # same seed, same tokens
    # a stop string taken from a greedy output ends the text just before it
    full = client.completions.create(model="hunyuan-jax-default", prompt="def ", max_tokens=40,
                                     temperature=0, extra_body={"ignore_eos": True}).choices[0]  # fmt: skip
    assert len(full.text) > 12, full.text
    stop = full.text[8:11]
    cut = client.completions.create(model="hunyuan-jax-default", prompt="def ", max_tokens=40,
                                    temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]  # fmt: skip
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    _wait_idle(server)


# ----------------------------------------------------------------------------- load
def test_load_64_requests_4_slots(server, generator):
    import httpx

    rng = np.random.default_rng(0)
    vocab = server.state.tokenizer.vocab_size
    lens = rng.integers(1, 90, size=64)
    prompts = [rng.integers(16, vocab, size=int(n)).tolist() for n in lens]
    max_tokens = [int(m) for m in rng.integers(1, min(32, MAX_LEN - 90), size=64)]

    async def one(c, i):
        body = {"model": "hunyuan-jax-default", "prompt": prompts[i],
                "max_tokens": max_tokens[i], "temperature": 0}  # fmt: skip
        r = await c.post("/v1/completions", json=body)
        return i, r.status_code, r.json()

    async def all_at_once():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            return await asyncio.wait_for(
                asyncio.gather(*(one(c, i) for i in range(64))), timeout=240
            )

    done_before = _metric(server, "hunyuan_requests_total")
    t0 = time.time()
    results = asyncio.run(all_at_once())
    wall = time.time() - t0
    assert sorted(i for i, _, _ in results) == list(range(64))
    assert all(code == 200 for _, code, _ in results), [r for r in results if r[1] != 200][:2]
    ids = {body["id"] for _, _, body in results}
    assert len(ids) == 64  # none duplicated
    assert _metric(server, "hunyuan_requests_total") - done_before == 64  # none lost
    bad = []
    for i, _, body in results:
        want, n = _expected(server, generator, prompts[i], max_tokens[i])
        got = body["choices"][0]["text"], body["usage"]["completion_tokens"]
        if got != (want, n):
            bad.append((i, got, (want, n)))
    assert not bad, bad[:3]
    print(f"64 requests through {SLOTS} slots in {wall:.1f}s")
    _wait_idle(server)


def test_prefix_cache_hit_same_text_and_usage(server, client, generator):
    """A prompt that starts with another's 70 tokens reuses its 4 full pages: usage reports
    64 cached tokens (OpenAI's prompt_tokens_details.cached_tokens), the hit counter grows by
    64, and the text equals the prompt decoded alone."""
    rng = np.random.default_rng(7)
    vocab = server.state.tokenizer.vocab_size
    shared = rng.integers(16, vocab, size=70).tolist()
    first = client.completions.create(model="hunyuan-jax-default", prompt=shared, max_tokens=4,
                                      temperature=0)  # fmt: skip
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    hits = _metric(server, "hunyuan_prefix_cache_hit_tokens_total")
    prompt = shared + [20, 21, 22]
    second = client.completions.create(model="hunyuan-jax-default", prompt=prompt,
                                       max_tokens=8, temperature=0)  # fmt: skip
    assert second.usage.prompt_tokens_details.cached_tokens == 64
    assert _metric(server, "hunyuan_prefix_cache_hit_tokens_total") - hits == 64
    assert 0 < _metric(server, "hunyuan_prefix_cache_hit_rate") <= 1
    want, n = _expected(server, generator, prompt, 8)
    assert (second.choices[0].text, second.usage.completion_tokens) == (want, n)
    _wait_idle(server)


# ----------------------------------------------------------------------------- bad input
def _error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["type"]
    return err["message"]


def test_bad_input_and_limits(server):
    ok = {"model": "hunyuan-jax-default", "prompt": "x = ", "max_tokens": 3}
    _error(_post(server, "/v1/completions", content=b'{"model": "hunyuan-jax-default", "pro'), 400)
    _error(_post(server, "/v1/completions", {**ok, "temperature": -1}), 400)
    _error(_post(server, "/v1/completions", {**ok, "max_tokens": "many"}), 400)
    _error(_post(server, "/v1/completions", {"model": "hunyuan-jax-default"}), 400)
    _error(_post(server, "/v1/chat/completions", {"model": "hunyuan-jax-default",
                                                  "messages": []}), 400)  # fmt: skip
    msg = _error(_post(server, "/v1/completions", {**ok, "model": "gpt-4"}), 404)
    assert "gpt-4" in msg
    long = {**ok, "prompt": list(range(20, 120)), "max_tokens": 40}
    msg = _error(_post(server, "/v1/completions", long), 400)
    assert all(str(n) in msg for n in (MAX_LEN, 100, 40, 140)), msg
    _error(_post(server, "/v1/completions", {**ok, "prompt": [5, 10**6]}), 400)
    # a full queue: 429 (deterministically with no room, then under real concurrency)
    engine = server.state.engine
    engine.max_queue = 0
    try:
        # with every slot busy, the next request must wait: no room -> 429
        assert _error(_post(server, "/v1/completions", ok), 429)
    finally:
        engine.max_queue = 64
    engine.max_queue = 2
    try:
        codes = asyncio.run(_burst(server, 16))
    finally:
        engine.max_queue = 64
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    _wait_idle(server)
    r = _post(server, "/v1/completions", ok)  # still serving
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


async def _burst(server, n):
    import httpx

    body = {"model": "hunyuan-jax-default", "prompt": "import ", "max_tokens": 30,
            "ignore_eos": True}  # fmt: skip
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        rs = await asyncio.wait_for(
            asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(n))), 120
        )
    return [r.status_code for r in rs]


# ----------------------------------------------------------------------------- cancellation
def test_disconnect_cancels_and_frees_slot(server):
    import httpx

    _wait_idle(server)
    cancelled = _metric(server, 'hunyuan_requests_total{finish_reason="cancelled"}')
    generated = _metric(server, "hunyuan_generated_tokens_total")
    body = {"model": "hunyuan-jax-default", "prompt": "def f(", "max_tokens": MAX_LEN - 8,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]  # a few events, then hang up
    assert any(line.startswith("data: ") for line in got)
    h = _wait_idle(server, 10)
    assert h["active_slots"] == 0
    assert _metric(server, 'hunyuan_requests_total{finish_reason="cancelled"}') == cancelled + 1
    assert _metric(server, "hunyuan_generated_tokens_total") - generated < MAX_LEN - 8
    # a non-streaming client that gives up (read timeout) cancels too
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.05)
    _wait_idle(server, 10)
    assert _metric(server, 'hunyuan_requests_total{finish_reason="cancelled"}') == cancelled + 2


# ----------------------------------------------------------------------------- scoring
@functools.cache
def _scorer():
    import jax

    return jax.jit(lambda m, x: m(x)[0])


def _score(model, tokens):
    return _scorer()(model, tokens)


def _own_loglikelihood(server, context: str, continuation: str) -> float:
    """The model's own score of `continuation` after `context`, tokenised as lm-eval does
    (whole string encoded, the context's tokens split off)."""

    tok = server.state.tokenizer
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = len(tok.encode(context))
    padded = np.zeros((1, MAX_LEN), np.int32)  # one shape, one compile (causal: the padding
    padded[0, : len(whole)] = whole  # after the text does not change its logits)
    logits = np.asarray(_score(_model(server), padded))[0]
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    return float(sum(lp[i - 1, whole[i]] for i in range(ctx, len(whole))))


def test_echo_logprobs_equal_own_scoring(server):
    tok = server.state.tokenizer
    ids = tok.encode("for i in range(10):\n    print(i)")
    body = {"model": "hunyuan-jax-default", "prompt": ids, "max_tokens": 0, "echo": True,
            "logprobs": 2}  # fmt: skip
    lp = _post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
    text = tok.decode(ids)
    head = tok.decode(ids[:1])
    own = _own_loglikelihood(server, head, text[len(head) :])
    assert abs(sum(lp["token_logprobs"][1:]) - own) < LL_TOLERANCE


def test_lm_eval_local_completions(server, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    yaml_text = (DATA / "serve_mc" / "serve_mc.yaml").read_text()
    (task_dir / "serve_mc.yaml").write_text(
        yaml_text.replace("DATA_FILE", str(DATA / "serve_mc" / "serve_mc.jsonl"))
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": "hunyuan-jax-default",
            "base_url": server.url + "/v1/completions",
            "tokenizer_backend": "remote",
            "num_concurrent": 1,
            "max_retries": 1,
            "max_length": MAX_LEN,
        },
        tasks=["serve_mc"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        cache_requests=False,
    )
    samples = results["samples"]["serve_mc"]
    rows = [json.loads(line) for line in (DATA / "serve_mc" / "serve_mc.jsonl").open()]
    assert len(samples) == len(rows)
    worst = 0.0
    for s in samples:
        row = rows[s["doc_id"]]
        for choice, resp in zip(row["choices"], s["resps"]):
            ll = resp[0][0]
            own = _own_loglikelihood(server, row["question"] + "\nAnswer:", " " + choice)
            worst = max(worst, abs(ll - own))
    print(
        f"lm-eval vs own scoring: {sum(len(r['choices']) for r in rows)} log-likelihoods, "
        f"max |diff| {worst:.2e}; acc {results['results']['serve_mc']['acc,none']:.3f}"
    )
    assert worst < LL_TOLERANCE


# ----------------------------------------------------------------------------- per-row sampling
def test_sample_rows_per_row_parameters():
    """`sampling.sample_rows` with one row per setting: greedy rows are the argmax of the
    penalised logits; sampled rows only draw from the set `processed_logits` keeps (the
    single-configuration reference) and a row's draw depends on its key only."""
    import jax
    import jax.numpy as jnp

    from hunyuan_jax.decode.sampling import SamplingConfig, sample_rows

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 64)) * 3, jnp.float32)
    seen = jnp.asarray(rng.random((4, 64)) < 0.2)
    cfgs = [
        SamplingConfig(0.0, 0, 1.0, 1.3),
        SamplingConfig(0.7, 5, 1.0, 1.0),
        SamplingConfig(1.0, 0, 0.5, 1.2),
        SamplingConfig(0.9, 8, 0.8, 1.1),
    ]
    arr = lambda f, dt: jnp.asarray([f(c) for c in cfgs], dt)
    args = (arr(lambda c: c.temperature, jnp.float32), arr(lambda c: c.top_k, jnp.int32),
            arr(lambda c: c.top_p, jnp.float32), arr(lambda c: c.repetition_penalty, jnp.float32))  # fmt: skip

    @jax.jit
    def draws(seed):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(4))
        return sample_rows(logits, keys, *args, seen)

    toks = np.stack([np.asarray(draws(s)) for s in range(64)])  # [draws, rows]
    for b, cfg in enumerate(cfgs):
        allowed = np.asarray(_processed_logits(logits[b : b + 1], cfg, seen[b : b + 1]))[0]
        if cfg.greedy:
            assert set(toks[:, b]) == {int(np.argmax(allowed))}
        else:
            keep = set(np.flatnonzero(allowed > -1e30).tolist())
            assert set(toks[:, b].tolist()) <= keep and len(set(toks[:, b])) > 1, (b, keep)
    # a row's tokens do not depend on the other rows' settings
    other = sample_rows(logits, jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(
        jnp.arange(4)), args[0].at[0].set(2.0), *args[1:], seen)  # fmt: skip
    assert np.array_equal(np.asarray(other)[1:], toks[3, 1:])


# ----------------------------------------------------------------------------- the CLI
def test_cli_errors_are_one_line(tmp_path):
    """Bad command lines exit with the documented status and one line (no traceback)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    cases = [
        (["--max-len", "100000"], 2, "--max-len"),
        (["--checkpoint", str(tmp_path / "missing")], 4, "not found"),
        (["--api-key", " "], 2, "--api-key is empty"),
        (["--max-body-bytes", "10"], 2, "--max-body-bytes"),
        (["--port", "70000"], 2, "--port"),
    ]
    for args, code, text in cases:
        r = subprocess.run([sys.executable, "-m", "hunyuan_jax.cli.serve", *args], env=env,
                           capture_output=True, text=True, timeout=120, cwd=root)  # fmt: skip
        lines = [line for line in r.stderr.splitlines() if "hunyuan_jax.cli.serve: error" in line]
        assert r.returncode == code and len(lines) == 1 and text in lines[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr


def test_a_failing_request_fails_alone(server, generator):
    """Requests the compiled programs cannot take (top_k past int32, a NaN temperature),
    submitted to the engine directly (past the HTTP layer, which refuses them with 400), fail
    alone with finish_reason 'error' while another client's stream goes on to the same text as
    alone. Then a step the compiled program refuses (device state intact) fails the request
    it carried, and the engine serves the next one; /health stays 200."""
    import queue

    import httpx

    from hunyuan_jax.engine.requests import GenParams, Request

    engine = server.state.engine
    _wait_idle(server)
    tok = server.state.tokenizer
    want, _ = _expected(server, generator, tok.encode("def main("), 40)
    out: dict = {}
    started = threading.Event()

    def stream():
        body = {"model": "hunyuan-jax-default", "prompt": "def main(", "max_tokens": 40,
                "temperature": 0, "stream": True}  # fmt: skip
        text = []
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    ch = json.loads(line[6:])["choices"][0]
                    text.append(ch["text"])
                    out["finish"] = ch["finish_reason"] or out.get("finish")
                    started.set()  # prefilled: the faults below cannot hit it
        out["text"] = "".join(text)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert started.wait(60)
    for params in (GenParams(max_tokens=4, top_k=2**31, temperature=0.5),
                   GenParams(max_tokens=4, temperature=float("nan"))):  # fmt: skip
        events: queue.Queue = queue.Queue()
        engine.submit(Request([5, 6, 7], params, events.put))
        ev = events.get(timeout=60)
        assert ev.kind == "done" and ev.finish_reason == "error", ev
    t.join(60)
    assert out.get("text") == want and out.get("finish") in ("stop", "length"), (out, want)
    # a step that fails with the device state intact (the compiled program refuses its
    # arguments: a packed array of the wrong length): the request it carried fails
    ex, compiled = engine.ex, dict(engine.ex._exe)

    def refusing(fn):
        def call(params, pool, seen, ints, floats, *groups):  # groups: EngineCore.group_arrays
            ex._exe.update(compiled)
            return fn(params, pool, seen, ints[:-1], floats, *groups)

        return call

    ex._exe.update({k: refusing(fn) for k, fn in compiled.items()})
    events = queue.Queue()
    engine.submit(Request([5, 6, 7], GenParams(max_tokens=4), events.put))
    ev = events.get(timeout=60)
    assert ev.kind == "done" and ev.finish_reason == "error" and ex.state_ok(), ev
    assert engine.error is None and _get(server, "/health").status_code == 200
    r = _post(server, "/v1/completions", {"model": "hunyuan-jax-default", "prompt": "x",
                                          "max_tokens": 2})  # fmt: skip
    assert r.status_code == 200


def test_long_prompt_prefills_between_decode_steps(server):
    """While a 100-token prompt is prefilled (steps of --prefill-chunk 16 tokens: the decoding
    request's one token, then 15 prompt tokens), the request that is already decoding keeps
    getting a token every engine step."""
    import queue

    from hunyuan_jax.engine.requests import GenParams, Request

    engine = server.state.engine
    _wait_idle(server)
    events: queue.Queue = queue.Queue()
    a = Request(
        [5, 6, 7], GenParams(max_tokens=100, ignore_eos=True), lambda e: events.put(("a", e))
    )
    b = Request(list(range(20, 120)), GenParams(max_tokens=2), lambda e: events.put(("b", e)))
    engine.submit(a)
    a_tokens, deadline = 0, time.time() + 60
    while a_tokens < 2:
        who, ev = events.get(timeout=max(deadline - time.time(), 0.1))
        a_tokens += ev.kind == "token"
    engine.submit(b)
    at_submit, b_first = a_tokens, None
    while b_first is None:
        who, ev = events.get(timeout=max(deadline - time.time(), 0.1))
        if who == "a":
            a_tokens += ev.kind == "token"
        elif ev.kind == "token":
            b_first = a_tokens
    engine.cancel(a)
    steps = -(-100 // (CHUNK - 1))
    assert b_first - at_submit >= steps - 1, (at_submit, b_first)
    _wait_idle(server)


def _processed_logits(logits, cfg, seen):
    """The single-configuration reference: penalty, temperature, then -inf outside top-k and
    top-p (HF's order)."""
    import jax
    import jax.numpy as jnp

    from hunyuan_jax.decode import sampling

    x = sampling.apply_repetition_penalty(logits.astype(jnp.float32), seen, cfg.repetition_penalty)
    if cfg.greedy:
        return x
    x = x / cfg.temperature
    neg = float(jnp.finfo(jnp.float32).min)
    if cfg.top_k:
        kth = jax.lax.top_k(x, cfg.top_k)[0][..., -1:]
        x = jnp.where(x >= kth, x, neg)
    if cfg.top_p < 1.0:
        x = jnp.where(sampling.top_p_mask(x, cfg.top_p), x, neg)
    return x
