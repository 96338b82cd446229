"""Continuous batching: requests, the bounded queue, slots and the engine loop that drives the
compiled programs of `engine.Executor` from a background thread.

    engine = Engine(executor, eos_ids=[2], max_queue=64)
    engine.start()
    engine.submit(Request(prompt_ids, GenParams(max_tokens=32), sink=events.put))
    ...
    engine.cancel(request)       # e.g. the client went away: its slot is freed at once

Each loop iteration (one "plan"): admit waiting requests into free slots (FIFO), free the slots
of cancelled requests, run up to `prefill_budget` prefill chunks (oldest request first) and then
one decode step for every slot that is decoding; a request whose prompt is long is thus
prefilled chunk by chunk between decode steps, and the other slots keep producing tokens (the
budget trades their per-token latency against how fast free slots are refilled). A
request finishes on an EOS id ('stop'), at max_tokens ('length') or when cancelled; its slot is
free for the next iteration. Results go to each request's `sink(Event)`, called on the engine
thread (the HTTP layer forwards them to its event loop).

Failures: a request whose settings the programs cannot take (e.g. a top_k past int32; the HTTP
layer refuses those first) or whose prefill fails with the device state intact finishes with
'error' alone; the others go on. When the engine cannot go on (a program failed after taking
its donated state, or `MAX_CONSECUTIVE_FAILURES` calls failed in a row) every request finishes
with 'error', `error` is set (/health answers 503, submissions raise `EngineStopped`) and
`on_fatal(message)` is called: the server then exits non-zero so that a supervisor restarts it.

Multi-host (`broadcast=True`, jax.process_count() > 1): process 0 runs this loop and serves
HTTP; every iteration it broadcasts the plan (fixed-shape arrays: which slot, which tokens,
per-slot sampling parameters; `multihost_utils.broadcast_one_to_all`) and every other process
runs `Engine.follow()`, executing the same calls on its devices, until a stop plan. When idle,
process 0 broadcasts an empty plan every `heartbeat_s` so the others never wait on a
collective for long.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
import traceback
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from hunyuan_jax.serve.engine import DecodeWork, Executor, PrefillWork, key_data

MAX_CONSECUTIVE_FAILURES = 3  # program calls failing in a row before the engine gives up


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests already."""


class EngineStopped(Exception):
    """The engine is shutting down (or has failed) and takes no requests."""


@dataclasses.dataclass
class GenParams:
    """One request's generation settings (validated by the caller)."""

    max_tokens: int = 16  # 0 = score the prompt only (echo + logprobs)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    top_logprobs: int = 0  # alternatives wanted per generated token
    prompt_logprobs: bool = False  # log-probabilities of the prompt tokens (echo)
    ignore_eos: bool = False  # keep going after an EOS id (benchmarks, tests)


@dataclasses.dataclass
class Event:
    """kind 'token': one new token (token, logprob, top = [(id, logprob)]); 'prompt': the
    prompt's log-probabilities (prompt_logprobs: per position, None for the first); 'done':
    finished (finish_reason 'stop' | 'length' | 'cancelled' | 'error', error message)."""

    kind: str
    token: int = -1
    logprob: float = 0.0
    top: list | None = None
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    error: str | None = None
    eos: bool = False  # a 'token' that is an EOS id (no text)


class Request:
    """A prompt (token ids), its settings and where its events go."""

    _ids = iter(range(1 << 62))

    def __init__(self, prompt: list[int], params: GenParams, sink: Callable[[Event], None]):
        self.id = next(Request._ids)
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.sink = sink
        self.cancelled = threading.Event()
        self.finished = False
        self.t_submit = time.perf_counter()
        self.t_last: float | None = None
        self.generated = 0
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.key = key_data(seed)
        self.prompt_lps: list = [None]


@dataclasses.dataclass
class _Slot:
    req: Request
    prefilled: int = 0  # prompt tokens in the cache
    last: int = 0  # token fed to the next decode step
    decoding: bool = False


class Engine:
    """Slots, the waiting queue and the loop (see the module docstring)."""

    def __init__(
        self,
        executor: Executor,
        *,
        eos_ids=(),
        max_queue: int = 64,
        metrics=None,
        broadcast: bool = False,
        heartbeat_s: float = 1.0,
        prefill_budget: int = 2,
        log: Callable[[str], None] = print,
        on_fatal: Callable[[str], None] | None = None,
    ):
        self.ex = executor
        self.eos = {int(e) for e in eos_ids}
        self.max_queue = int(max_queue)
        self.metrics = metrics
        self.broadcast = broadcast
        self.heartbeat_s = heartbeat_s
        self.prefill_budget = max(int(prefill_budget), 1)
        self.log = log
        self.on_fatal = on_fatal
        self._failures = 0  # program calls that failed in a row
        self.slots: list[_Slot | None] = [None] * executor.slots
        self.waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.steps = {"prefill": 0, "decode": 0}
        self._tok_times: collections.deque = collections.deque()

    # ------------------------------------------------------------------ public API
    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def active_slots(self) -> int:
        return sum(s is not None for s in self.slots)

    def tokens_per_second(self, window: float = 5.0) -> float:
        now = time.perf_counter()
        times = [t for t, _ in list(self._tok_times) if now - t <= window]
        n = sum(k for t, k in list(self._tok_times) if now - t <= window)
        return n / window if times else 0.0

    def submit(self, req: Request) -> None:
        with self._wake:
            if self._stop or self.error:
                raise EngineStopped(self.error or "the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self.waiting.append(req)
            self._wake.notify()

    def cancel(self, req: Request) -> None:
        """Cancels a waiting or running request; its slot is freed by the next iteration."""
        req.cancelled.set()
        with self._wake:
            self._wake.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hunyuan-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop (process 0)
    def _run(self) -> None:
        reason, error = "cancelled", None
        try:
            self._loop()
        except Exception as e:  # the engine cannot go on: fatal (see the module docstring)
            self.log(f"[serve] engine failed: {traceback.format_exc()}")
            reason, error = "error", f"{type(e).__name__}: {e}"
            with self._wake:
                self.error = f"the engine failed: {error}"
            if self.broadcast:  # let the other processes exit too (stop code 2: failed)
                try:
                    self._broadcast([], None, 2)
                except Exception:
                    pass
        for i, s in enumerate(self.slots):
            if s is not None:
                self._finish(i, reason, error)
        with self._wake:
            waiting, self.waiting = list(self.waiting), collections.deque()
        for req in waiting:
            self._emit(req, Event("done", finish_reason=reason, error=error))
        if self.error is not None and self.on_fatal is not None:
            self.on_fatal(self.error)

    def _loop(self) -> None:
        last_beat = time.perf_counter()
        while True:
            with self._wake:
                if not self._stop and not self.waiting and not any(self.slots):
                    self._wake.wait(self.heartbeat_s if self.broadcast else 0.5)
                stop = self._stop
                self._admit()
            self._reap()
            prefill = [] if stop else self._prefill_work()
            decode = None if stop else self._decode_work()
            now = time.perf_counter()
            if self.broadcast and (stop or prefill or decode or now - last_beat > self.heartbeat_s):
                self._broadcast(prefill, decode, stop)
                last_beat = now
            if stop:
                return
            for i, w in prefill:
                if self.slots[i] is not None:  # (an earlier chunk of it may have failed)
                    self._call(lambda i=i, w=w: self._do_prefill(i, w), [i])
            if decode is not None:
                self._call(lambda: self._do_decode(decode), np.flatnonzero(decode.active))

    def _call(self, fn, slots) -> None:
        """Runs one program call; if it fails with the device state intact, the requests of
        `slots` finish with 'error' and the loop goes on (unless too many failed in a row)."""
        try:
            fn()
        except Exception as e:
            self._failures += 1
            if not self.ex.state_ok() or self._failures >= MAX_CONSECUTIVE_FAILURES:
                raise
            self.log(f"[serve] a program call failed; its requests fail: {traceback.format_exc()}")
            for i in slots:
                if self.slots[i] is not None:
                    self._finish(int(i), "error", f"{type(e).__name__}: {e}")
        else:
            self._failures = 0

    def _admit(self) -> None:
        for i, s in enumerate(self.slots):
            while s is None and self.waiting:
                req = self.waiting.popleft()
                if req.cancelled.is_set():
                    self._emit(req, Event("done", finish_reason="cancelled"))
                    continue
                problem = _settings_problem(req.params)
                if problem is not None:  # checked once here, not in every step's packing
                    msg = f"the request's settings cannot be run: {problem}"
                    self.log(f"[serve] request {req.id}: {msg}")
                    self._emit(req, Event("done", finish_reason="error", error=msg))
                    continue
                s = self.slots[i] = _Slot(req)

    def _reap(self) -> None:
        with self._wake:  # cancelled requests leave the queue at once (room for others)
            gone = [r for r in self.waiting if r.cancelled.is_set()]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            self._emit(r, Event("done", finish_reason="cancelled"))
        for i, s in enumerate(self.slots):
            if s is not None and s.req.cancelled.is_set():
                self._finish(i, "cancelled")

    def _prefill_work(self) -> list[tuple[int, PrefillWork]]:
        """Up to `prefill_budget` chunks, oldest request first (a long prompt may take them
        all: its chunks are consecutive calls)."""
        todo = [(s.req.id, i) for i, s in enumerate(self.slots) if s and not s.decoding]
        works = []
        c = self.ex.chunk
        for _, i in sorted(todo):
            s = self.slots[i]
            prompt, p = s.req.prompt, s.req.params
            for start in range(s.prefilled, len(prompt), c):
                if len(works) == self.prefill_budget:
                    return works
                toks = np.zeros((c,), np.int32)
                nxt = np.zeros((c,), np.int32)
                piece = prompt[start : start + c]
                toks[: len(piece)] = piece
                after = prompt[start + 1 : start + c + 1]
                nxt[: len(after)] = after
                work = PrefillWork(
                    i, start, toks, nxt, len(prompt), p.temperature, p.top_k, p.top_p,
                    p.repetition_penalty, s.req.key,
                )  # fmt: skip
                works.append((i, work))
        return works

    def _decode_work(self) -> DecodeWork | None:
        live = [i for i, s in enumerate(self.slots) if s is not None and s.decoding]
        if not live:
            return None
        w = self.ex._idle_decode()
        w = DecodeWork(*(np.array(a) for a in dataclasses.astuple(w)))
        for i in live:
            s = self.slots[i]
            p = s.req.params
            w.last[i] = s.last
            w.index[i] = len(s.req.prompt) + s.req.generated - 1
            w.active[i] = True
            w.temperature[i], w.top_k[i], w.top_p[i] = p.temperature, p.top_k, p.top_p
            w.repetition_penalty[i] = p.repetition_penalty
            w.keys[i] = s.req.key
            w.count[i] = s.req.generated
        return w

    def _do_prefill(self, i: int, w: PrefillWork) -> None:
        out = self.ex.prefill(w)
        self.steps["prefill"] += 1
        s = self.slots[i]
        req = s.req
        c = self.ex.chunk
        s.prefilled = min(w.start + c, w.length)
        final = s.prefilled >= w.length
        if req.params.prompt_logprobs:  # positions start..: logprob of the next prompt token
            lp, ids, tlp = jax.device_get(out[2])
            for j in range(min(c, w.length - 1 - w.start)):
                top = list(zip(ids[j].tolist(), tlp[j].tolist()))
                req.prompt_lps.append((float(lp[j]), top))
        if not final:
            return
        if req.params.prompt_logprobs:
            self._emit(req, Event("prompt", prompt_logprobs=req.prompt_lps))
        if req.params.max_tokens == 0:
            self._finish(i, "length")
            return
        (tok, lp), (ids, tlp) = jax.device_get(out[:2])
        s.decoding = True
        self._token(i, int(tok), float(lp), ids, tlp)

    def _do_decode(self, w: DecodeWork) -> None:
        (tok, lp), tops = self.ex.decode(w)
        tok, lp = jax.device_get((tok, lp))
        live = [self.slots[i] for i in np.flatnonzero(w.active)]
        want_top = any(s is not None and s.req.params.top_logprobs for s in live)
        ids, tlp = jax.device_get(tops) if want_top else (np.zeros_like(tok)[:, None],) * 2
        self.steps["decode"] += 1
        for i in np.flatnonzero(w.active):
            if self.slots[i] is not None:
                self._token(int(i), int(tok[i]), float(lp[i]), ids[i], tlp[i])

    def _token(self, i: int, tok: int, lp: float, ids, tlp) -> None:
        s = self.slots[i]
        req = s.req
        now = time.perf_counter()
        if self.metrics is not None:
            if req.t_last is None:
                self.metrics.ttft.observe(now - req.t_submit)
            else:
                self.metrics.per_token.observe(now - req.t_last)
            self.metrics.generated.inc()
        self._tok_times.append((now, 1))
        while self._tok_times and now - self._tok_times[0][0] > 10.0:
            self._tok_times.popleft()
        req.t_last = now
        req.generated += 1
        s.last = tok
        k = req.params.top_logprobs
        top = list(zip(ids[:k].tolist(), tlp[:k].tolist())) if k else None
        eos = tok in self.eos and not req.params.ignore_eos
        self._emit(req, Event("token", token=tok, logprob=lp, top=top, eos=eos))
        if eos:
            self._finish(i, "stop")
        elif req.generated >= req.params.max_tokens:
            self._finish(i, "length")

    def _finish(self, i: int, reason: str, error: str | None = None) -> None:
        req = self.slots[i].req
        self.slots[i] = None
        self._emit(req, Event("done", finish_reason=reason, error=error))
        if self.metrics is not None:
            self.metrics.requests.labels(reason).inc()

    def _emit(self, req: Request, ev: Event) -> None:
        if ev.kind == "done":
            if req.finished:
                return
            req.finished = True
        try:
            req.sink(ev)
        except Exception:  # a sink that fails (its client is gone) must not stop the loop
            self.log(f"[serve] event sink failed: {traceback.format_exc()}")

    # ------------------------------------------------------------------ multi-host
    def _plan_arrays(self, prefill, decode, stop: bool) -> dict:
        ex = self.ex
        flags = np.array([len(prefill or ()), decode is not None, stop], np.int32)
        works = [w for _, w in prefill or ()]
        works += [ex._idle_prefill()] * (self.prefill_budget - len(works))
        p_int, p_float = (np.stack(a) for a in zip(*(w.pack() for w in works)))
        d_int, d_float = (decode if decode is not None else ex._idle_decode()).pack()
        return {"flags": flags, "p_int": p_int, "p_float": p_float, "d_int": d_int,
                "d_float": d_float}  # fmt: skip

    def _broadcast(self, prefill, decode, stop: int) -> dict:
        return multihost_utils.broadcast_one_to_all(self._plan_arrays(prefill, decode, stop))

    def follow(self) -> bool:
        """Processes other than 0: execute the plans process 0 broadcasts, until a stop plan.
        Returns False when process 0's engine failed (the stop plan says so)."""
        while True:
            a = {k: np.asarray(v) for k, v in self._broadcast(None, None, False).items()}
            n_prefill, has_decode, stop = (int(x) for x in a["flags"])
            if stop:
                return stop == 1
            for j in range(n_prefill):
                self.ex.prefill(PrefillWork.unpack(a["p_int"][j], a["p_float"][j]))
            if has_decode:
                self.ex.decode(DecodeWork.unpack(a["d_int"], a["d_float"]))


def _settings_problem(p) -> str | None:
    """Why a request's sampling settings cannot go into the programs' arrays (int32 top_k,
    float32 temperature / top_p / repetition_penalty: finite and in range), or None."""
    try:
        np.array([p.top_k], np.int32)  # numpy refuses an int past int32
        t, tp, r = (float(np.float32(x)) for x in (p.temperature, p.top_p, p.repetition_penalty))
    except (OverflowError, ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    if not (np.isfinite([t, tp, r]).all() and t >= 0 and 0 < tp <= 1 and r > 0):
        return (
            f"temperature {t}, top_p {tp}, repetition_penalty {r} as float32: need finite "
            f"temperature >= 0, 0 < top_p <= 1, repetition_penalty > 0"
        )
    return None
