"""The server on two processes (2 CPU devices each, gloo collectives), started with the real
CLI: process 0 serves HTTP on 127.0.0.1 and broadcasts every engine step's plan, process 1
follows it; the mesh (data=2, expert=2, rules serve_ep_tp) spans both, so every step is a
multi-process computation. Greedy completions of concurrent requests must equal the same
prompts decoded alone by the single-process Generator, and SIGTERM to process 0 must stop
both processes cleanly (the stop plan reaches the follower).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN, CHUNK = 128, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(i: int, http_port: int, coord_port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "HUNYUAN_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        HUNYUAN_COORDINATOR=f"127.0.0.1:{coord_port}",
        HUNYUAN_NUM_PROCESSES="2",
        HUNYUAN_PROCESS_ID=str(i),
    )
    cmd = [
        sys.executable, "-m", "hunyuan_jax.cli.serve", "--devices", "2", "--mesh", "data=2,expert=2",
        "--rules", "serve_ep_tp", "--dtype", "float32", "--slots", "4", "--max-len",
        str(MAX_LEN), "--prefill-chunk", str(CHUNK), "--port", str(http_port),
        "--log-level", "warning",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


@pytest.mark.slow  # two processes loading and compiling: ~1 min on 2 busy cores
def test_two_process_server_matches_generator(tmp_path):
    from hunyuan_jax.cli.serve import DEFAULT_MODEL
    from hunyuan_jax.decode import from_checkpoint
    from tests.helpers.contiguous import Generator

    http_port, coord_port = _free_port(), _free_port()
    logs = [tmp_path / f"serve{i}.log" for i in range(2)]
    procs = [_launch(i, http_port, coord_port, logs[i]) for i in range(2)]
    url = f"http://127.0.0.1:{http_port}"

    def tail():
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs)

    try:
        deadline = time.time() + 300
        while True:
            assert all(p.poll() is None for p in procs), tail()
            assert time.time() < deadline, "server not up in 300 s\n" + tail()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

        bundle = from_checkpoint.load(DEFAULT_MODEL, dtype="float32")
        tok = bundle.tokenizer
        prompts = ["def main(", "import os\nimport", "class Foo", "for i in range(", "x = "]
        gen = Generator(bundle.model, eos_ids=bundle.eos_ids, prefill_chunk=CHUNK,
                        vocab_limit=tok.vocab_size)  # fmt: skip
        eos = set(bundle.eos_ids)
        want = []
        for p in prompts:
            out = gen.generate([tok.encode(p)], 12, max_len=MAX_LEN).tokens[0]
            want.append(tok.decode([t for t in out if t not in eos]))

        async def all_at_once():
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                rs = await asyncio.gather(*(
                    c.post("/v1/completions", json={"model": "hunyuan-jax-default", "prompt": p,
                                                    "max_tokens": 12, "temperature": 0})
                    for p in prompts
                ))  # fmt: skip
            return [r.json()["choices"][0]["text"] for r in rs]

        got = asyncio.run(asyncio.wait_for(all_at_once(), 180))
        assert got == want, tail()
        procs[0].send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(timeout=60) == 0, tail()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
