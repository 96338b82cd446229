"""Continuous batching over the page pool: admission by free pages, prefix reuse, one ragged
step per iteration mixing decode tokens and prompt chunks of several requests under a token
budget, preemption when the pool runs out, and the loop that drives `core.EngineCore` from a
background thread.

    engine = Engine(core, eos_ids=[2], max_queue=64)
    engine.start()
    engine.submit(Request(prompt_ids, GenParams(max_tokens=32), sink=events.put))
    engine.cancel(request)       # e.g. the client went away: its pages are freed at once

A sequence is its tokens (prompt, then each sampled token) and how many of them are in the
cache (`computed`); each step feeds it the next ones, and when a step reaches the end of what
it has, its next token is sampled. So a prompt chunk and a decode token are the same thing.

Each iteration: admit waiting requests (FIFO) while a row is free and the pool has pages for
the whole prompt, reusing the longest cached prefix of full pages (`pages.PagePool`; not for a
request that wants prompt log-probabilities or a repetition penalty, which need every prompt
token fed); then build one step: first one token for every decoding sequence (a new page when
it crosses a page boundary), then prompt chunks, oldest request first, filling the token budget
(a long prompt never stalls decoding; short prompts start together). When a decoding sequence
needs a page and none is free, the youngest running sequence is preempted: its pages are
released (their full pages stay cached) and it goes back to the head of the queue with the
tokens it produced; readmitted, it recomputes its cache and continues (same tokens: sampling is
keyed by the token count). Finished or preempted sequences register their written full pages
in the prefix cache. A request that shares a full page with a running sequence that has not
computed it yet waits (`pages.shares_pending_page`), then takes it from the prefix cache:
requests arriving together with one system prompt compute it once, not once each.

A request finishes on an EOS id ('stop'), at max_tokens ('length') or when cancelled. Events
go to each request's `sink(Event)` on the engine thread.

Failures: a request whose settings cannot go into the programs finishes with 'error' alone; a
step that fails with the device state intact fails the requests it carried and the others go
on; when the engine cannot go on (a program failed after taking its donated state, or
`MAX_CONSECUTIVE_FAILURES` calls in a row) every request finishes with 'error', `error` is set
and `on_fatal(message)` is called (the server exits non-zero so a supervisor restarts it).

Multi-host (`broadcast=True`): process 0 runs this loop; every iteration it broadcasts the step
(`StepWork.pack()` padded to the largest program's size, plus flags) and every other process
runs `Engine.follow()`, executing the same program on its devices, until a stop plan; when idle
it broadcasts an empty plan every `heartbeat_s`.
"""

from __future__ import annotations

import collections
import math
import threading
import time
import traceback
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from hunyuan_jax.engine.core import EngineCore
from hunyuan_jax.engine.pages import PagePool, shares_pending_page
from hunyuan_jax.engine.requests import (
    EngineStopped,
    Event,
    InFlight,
    QueueFull,
    Request,
    check_request,
    settings_problem,
)
from hunyuan_jax.engine.step import StepWork

MAX_CONSECUTIVE_FAILURES = 3  # program calls failing in a row before the engine gives up


class Engine:
    """Rows, pages, the waiting queue and the loop (see the module docstring)."""

    def __init__(
        self,
        core: EngineCore,
        *,
        eos_ids=(),
        max_queue: int = 64,
        metrics=None,
        broadcast: bool = False,
        heartbeat_s: float = 1.0,
        prefix_caching: bool = True,
        namespace: str = "base",
        log: Callable[[str], None] = print,
        on_fatal: Callable[[str], None] | None = None,
    ):
        self.ex = core
        self.pool = PagePool(core.num_pages, core.page_size)
        self.eos = {int(e) for e in eos_ids}
        self.max_queue, self.metrics, self.log = int(max_queue), metrics, log
        self.broadcast, self.heartbeat_s, self.on_fatal = broadcast, heartbeat_s, on_fatal
        self.prefix_caching, self.namespace = prefix_caching, namespace
        self._failures = 0
        self.free_rows = list(range(core.max_seqs - 1, -1, -1))
        self.running: list[InFlight] = []  # admission order
        self.waiting: collections.deque[Request | InFlight] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        # by bucket: program calls, their wall time (call + results), the real tokens they fed
        self.steps, self.step_seconds, self.step_tokens = [collections.Counter() for _ in range(3)]
        self.preemptions = 0
        self.peak_running = 0  # most sequences in flight at once (benchmarks)
        self._tok_times: collections.deque = collections.deque()

    # ------------------------------------------------------------------ public API
    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def active_slots(self) -> int:
        return len(self.running)

    def tokens_per_second(self, window: float = 5.0) -> float:
        now = time.perf_counter()
        n = sum(k for t, k in list(self._tok_times) if now - t <= window)
        return n / window

    def submit(self, req: Request) -> None:
        with self._wake:
            if self._stop or self.error:
                raise EngineStopped(self.error or "the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self.waiting.append(req)
            self._wake.notify()

    def cancel(self, req: Request) -> None:
        """Cancels a waiting or running request; its pages are freed by the next iteration."""
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

    def run_until_idle(self, max_steps: int | None = None) -> None:
        """Runs the loop on the calling thread until nothing is waiting or running (offline
        use: infer, rollouts); `max_steps` bounds it."""
        n = 0
        while (self.waiting or self.running) and (max_steps is None or n < max_steps):
            self._iteration(stop=False)
            n += 1

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
                    self._broadcast(None, False, 2)
                except Exception:
                    pass
        for seq in list(self.running):
            self._finish(seq, reason, error)
        with self._wake:
            waiting, self.waiting = list(self.waiting), collections.deque()
        for item in waiting:
            req = item.req if isinstance(item, InFlight) else item
            self._emit(req, Event("done", finish_reason=reason, error=error))
        if self.error is not None and self.on_fatal is not None:
            self.on_fatal(self.error)

    def _loop(self) -> None:
        last_beat = time.perf_counter()
        while True:
            with self._wake:
                if not self._stop and not self.waiting and not self.running:
                    self._wake.wait(self.heartbeat_s if self.broadcast else 0.5)
                stop = self._stop
            now = time.perf_counter()
            did = self._iteration(stop, beat=now - last_beat > self.heartbeat_s)
            if did or stop:
                last_beat = now
            if stop:
                return

    def _iteration(self, stop: bool, beat: bool = False) -> bool:
        """Admit, reap, schedule and run one step; returns whether a plan was broadcast."""
        with self._wake:
            self._admit()
        self._reap()
        entries = [] if stop else self._schedule()
        work, score = self._build(entries) if entries else (None, False)
        sent = False
        if self.broadcast and (stop or work is not None or beat):
            self._broadcast(work, score, int(stop))
            sent = True
        if work is not None:
            self._call(lambda: self._do_step(work, score, entries), [s for s, _ in entries])
        return sent

    def _call(self, fn, seqs) -> None:
        """Runs one program call; if it fails with the device state intact, the requests it
        carried finish with 'error' and the loop goes on (unless too many failed in a row)."""
        try:
            fn()
        except Exception as e:
            self._failures += 1
            if not self.ex.state_ok() or self._failures >= MAX_CONSECUTIVE_FAILURES:
                raise
            self.log(f"[serve] a program call failed; its requests fail: {traceback.format_exc()}")
            for seq in seqs:
                if seq in self.running:
                    self._finish(seq, "error", f"{type(e).__name__}: {e}")
        else:
            self._failures = 0

    # ------------------------------------------------------------------ admission
    def _admit(self) -> None:
        while self.free_rows and self.waiting:
            item = self.waiting[0]
            if isinstance(item, Request):
                if item.cancelled.is_set():
                    self.waiting.popleft()
                    self._emit(item, Event("done", finish_reason="cancelled"))
                    continue
                problem = settings_problem(item.params) or check_request(
                    item.prompt, item.params.max_tokens, self.ex.max_len, self.ex.cfg.vocab_size,
                    self.ex.pool_tokens,
                )  # fmt: skip
                if problem is not None:  # checked once here, not in every step's packing
                    self.waiting.popleft()
                    msg = f"the request cannot be run: {problem}"
                    self.log(f"[serve] request {item.id}: {msg}")
                    self._emit(item, Event("done", finish_reason="error", error=msg))
                    continue
            seq = item if isinstance(item, InFlight) else InFlight(item, list(item.prompt))
            computing = [(s.tokens, s.computed) for s in self.running if s.remaining > 1]
            if self._caches(seq) and shares_pending_page(
                seq.tokens, computing, self.pool.page_size
            ):
                return  # the head waits for a page another is computing (FIFO: none overtakes)
            if not self._take_pages(seq, first=isinstance(item, Request)):
                return  # the head waits for pages (FIFO: nobody overtakes it)
            self.waiting.popleft()
            seq.row = self.free_rows.pop()
            seq.fresh = True
            self.running.append(seq)
            self.peak_running = max(self.peak_running, len(self.running))

    def _take_pages(self, seq: InFlight, first: bool) -> bool:
        """Pages for every token the sequence has, its longest cached prefix reused."""
        pages, hit, ps = [], 0, self.pool.page_size
        if self._caches(seq):
            pages, hit = self.pool.match_prefix(seq.tokens, self.namespace, len(seq.tokens) - 1)
        new = self.pool.allocate(math.ceil(len(seq.tokens) / ps) - len(pages))
        if new is None:
            self.pool.release(pages)
            return False
        seq.pages, seq.computed = pages + new, hit
        if first:
            seq.req.cached_tokens = hit
            if self.metrics is not None:
                self.metrics.prefix_queried.inc(len(seq.tokens))
                self.metrics.prefix_hits.inc(hit)
        return True

    def _caches(self, seq: InFlight) -> bool:
        """Whether the sequence reuses cached pages (not when every token must be fed)."""
        p = seq.req.params
        return self.prefix_caching and p.repetition_penalty == 1.0 and not p.prompt_logprobs

    def _reap(self) -> None:
        with self._wake:  # cancelled requests leave the queue at once (room for others)
            gone = [r for r in self.waiting if _req(r).cancelled.is_set()]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            self._emit(_req(r), Event("done", finish_reason="cancelled"))
        for seq in list(self.running):
            if seq.req.cancelled.is_set():
                self._finish(seq, "cancelled")

    # ------------------------------------------------------------------ one step
    def _schedule(self) -> list[tuple[InFlight, int]]:
        """(sequence, tokens fed) of this step: decode tokens first, then prompt chunks."""
        budget = self.ex.token_budget
        entries = []
        for seq in list(self.running):
            if seq in self.running and seq.remaining == 1 and self._page_for(seq):
                entries.append((seq, 1))
                budget -= 1
        for seq in self.running:
            if seq.remaining > 1 and budget > 0:
                n = min(seq.remaining, budget)
                entries.append((seq, n))
                budget -= n
        return entries

    def _page_for(self, seq: InFlight) -> bool:
        """A page for the token the sequence feeds next, preempting the youngest sequence
        while none is free; False when `seq` itself was preempted."""
        while len(seq.pages) * self.pool.page_size <= seq.computed:
            got = self.pool.allocate(1)
            if got is not None:
                seq.pages += got
                continue
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: InFlight) -> None:
        self.preemptions += 1
        self.log(
            f"[serve] page pool full: request {seq.req.id} preempted after "
            f"{seq.req.generated} tokens (recomputed when pages free up)"
        )
        self._release(seq)
        seq.computed, seq.pages = 0, []
        with self._wake:
            self.waiting.appendleft(seq)

    def _release(self, seq: InFlight) -> None:
        self.pool.register(seq.tokens, seq.pages, self.namespace, upto=seq.computed)
        self.pool.release(seq.pages)
        self.running.remove(seq)
        self.free_rows.append(seq.row)

    def _build(self, entries) -> tuple[StepWork, bool]:
        ps = self.pool.page_size
        total = sum(n for _, n in entries)
        score = any(
            s.req.params.prompt_logprobs and s.computed < len(s.req.prompt) for s, _ in entries
        )  # the score program exists for the largest stream only
        w = StepWork.empty(
            self.ex.shape(self.ex.token_budget if score else self.ex.bucket_for(total))
        )
        at = 0
        for i, (seq, n) in enumerate(entries):
            req, p = seq.req, seq.req.params
            pos = np.arange(seq.computed, seq.computed + n)
            span = slice(at, at + n)
            w.tokens[span] = seq.tokens[seq.computed : seq.computed + n]
            w.positions[span] = pos
            w.slots[span] = np.asarray(seq.pages)[pos // ps] * ps + pos % ps
            w.seq_ids[span] = i
            w.valid[span] = 1
            if p.prompt_logprobs and seq.computed < len(req.prompt):
                nxt = pos + 1
                inside = nxt < len(req.prompt)
                w.next_tokens[span] = np.where(inside, np.asarray(req.prompt)[nxt * inside], 0)
            at += n
            w.kv_lens[i] = seq.computed + n
            w.last_index[i] = at - 1
            w.rows[i] = seq.row
            w.sample[i] = seq.computed + n == len(seq.tokens)
            w.reset[i] = seq.fresh
            w.top_k[i], w.count[i] = p.top_k, req.generated
            w.temperature[i], w.top_p[i] = p.temperature, p.top_p
            w.repetition_penalty[i] = p.repetition_penalty
            w.keys[i] = req.key
            w.page_indices[i, : len(seq.pages)] = seq.pages
            w.cu_q_lens[i + 1] = at
        w.cu_q_lens[len(entries) + 1 :] = at
        w.num_seqs[0] = len(entries)
        return w, score

    def _do_step(self, work: StepWork, score: bool, entries) -> None:
        started = time.perf_counter()
        out = self.ex.step(work, score)
        tok, lp = jax.device_get(out[0])
        want_top = any(s.req.params.top_logprobs for s, _ in entries)
        ids, tlp = jax.device_get(out[1]) if want_top else (np.zeros_like(tok)[:, None],) * 2
        prompt = jax.device_get(out[2]) if score else None
        bucket = work.shape.tokens
        self.steps[bucket] += 1
        self.step_seconds[bucket] += time.perf_counter() - started
        self.step_tokens[bucket] += int(work.valid.sum())
        for i, (seq, n) in enumerate(entries):
            req = seq.req
            start = seq.computed
            seq.computed += n
            seq.fresh = False
            if prompt is not None and req.params.prompt_logprobs:
                self._record_prompt(seq, start, n, work.cu_q_lens[i], prompt)
            if not work.sample[i]:
                continue
            if seq.computed == len(req.prompt) and seq.lp_done >= 0:  # the prompt is done
                if req.params.prompt_logprobs:
                    self._emit(req, Event("prompt", prompt_logprobs=req.prompt_lps))
                seq.lp_done = -1
                if req.params.max_tokens == 0:
                    self._finish(seq, "length")
                    continue
            self._token(seq, int(tok[i]), float(lp[i]), ids[i], tlp[i])
        for seq, _ in entries:
            if seq in self.running:
                self.pool.register(seq.tokens, seq.pages, self.namespace, upto=seq.computed)

    def _record_prompt(self, seq: InFlight, start: int, n: int, at: int, prompt) -> None:
        """Log-probabilities of the next prompt token at positions start..start+n-1."""
        lp, ids, tlp = prompt
        last = len(seq.req.prompt) - 1  # the last prompt position has no next prompt token
        for j in range(n):
            pos = start + j
            if pos < last and pos >= seq.lp_done >= 0:
                top = list(zip(ids[at + j].tolist(), tlp[at + j].tolist()))
                seq.req.prompt_lps.append((float(lp[at + j]), top))
                seq.lp_done = pos + 1

    def _token(self, seq: InFlight, tok: int, lp: float, ids, tlp) -> None:
        req = seq.req
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
        seq.tokens.append(tok)
        k = req.params.top_logprobs
        top = list(zip(ids[:k].tolist(), tlp[:k].tolist())) if k else None
        eos = tok in self.eos and not req.params.ignore_eos
        self._emit(req, Event("token", token=tok, logprob=lp, top=top, eos=eos))
        if eos:
            self._finish(seq, "stop")
        elif req.generated >= req.params.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: InFlight, reason: str, error: str | None = None) -> None:
        if seq in self.running:
            self._release(seq)
        self._emit(seq.req, Event("done", finish_reason=reason, error=error))
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
    def _broadcast(self, work: StepWork | None, score: bool, stop: int) -> dict:
        big = self.ex.shape(self.ex.token_budget)
        ints = np.zeros((big.int_size,), np.int32)
        floats = np.zeros((big.float_size,), np.float32)
        tokens = 0
        if work is not None:
            i, f = work.pack()
            ints[: i.size], floats[: f.size], tokens = i, f, work.shape.tokens
        flags = np.array([tokens, score, stop], np.int32)
        return multihost_utils.broadcast_one_to_all(
            {"flags": flags, "ints": ints, "floats": floats}
        )

    def follow(self) -> bool:
        """Processes other than 0: execute the steps process 0 broadcasts, until a stop plan.
        Returns False when process 0's engine failed (the stop plan says so)."""
        while True:
            a = {k: np.asarray(v) for k, v in self._broadcast(None, False, 0).items()}
            tokens, score, stop = (int(x) for x in a["flags"])
            if stop:
                return stop == 1
            if tokens:
                shape = self.ex.shape(tokens)
                self.ex.step_packed(
                    tokens, a["ints"][: shape.int_size], a["floats"][: shape.float_size], score
                )


def _req(item) -> Request:
    return item.req if isinstance(item, InFlight) else item
