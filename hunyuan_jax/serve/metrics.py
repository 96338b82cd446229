"""The server's Prometheus metrics (prometheus-client, one registry per server), served at
`GET /metrics`:

| metric | type | what |
|---|---|---|
| hunyuan_queue_length | gauge | requests waiting for admission (a row and KV pages) |
| hunyuan_active_slots / hunyuan_slots | gauge | sequences running / rows (--slots, the most in flight) |
| hunyuan_kv_pages_free / hunyuan_kv_pages | gauge | KV pool pages free or evictable / all usable pages |
| hunyuan_prefix_cache_queried_tokens_total / hunyuan_prefix_cache_hit_tokens_total | counter | prompt tokens looked up in the prefix cache / served from it |
| hunyuan_prefix_cache_hit_rate | gauge | hit / queried tokens since start |
| hunyuan_preemptions_total | gauge | sequences preempted because the pool ran out (recomputed later) |
| hunyuan_tokens_per_second | gauge | generated tokens per second over the last 5 s |
| hunyuan_generated_tokens_total / hunyuan_prompt_tokens_total | counter | tokens produced / prompt tokens admitted |
| hunyuan_time_to_first_token_seconds | histogram | submit -> first new token |
| hunyuan_time_per_output_token_seconds | histogram | between consecutive new tokens of a request |
| hunyuan_request_seconds | histogram | submit -> finished |
| hunyuan_requests_total{finish_reason} | counter | finished requests (stop, length, cancelled, error) |
| hunyuan_rejected_total{reason} | counter | refused at the door (queue_full, too_long, bad_request, unknown_model, too_large, unauthorized) |
| hunyuan_executables | gauge | compiled programs (fixed at start-up) |
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)


class Metrics:
    """The metric objects; the engine and the HTTP layer update them (all thread-safe)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_length = Gauge("hunyuan_queue_length", "Requests waiting for a slot", registry=r)
        self.active_slots = Gauge("hunyuan_active_slots", "Slots holding a request", registry=r)
        self.slots = Gauge("hunyuan_slots", "Decode slots", registry=r)
        self.tokens_per_second = Gauge(
            "hunyuan_tokens_per_second", "Generated tokens per second (last 5 s)", registry=r
        )
        self.executables = Gauge("hunyuan_executables", "Compiled programs", registry=r)
        self.generated = Counter(
            "hunyuan_generated_tokens", "Generated tokens (EOS included)", registry=r
        )
        self.prompt_tokens = Counter("hunyuan_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.ttft = Histogram(
            "hunyuan_time_to_first_token_seconds",
            "Time from submission to the first new token",
            buckets=_LATENCY,
            registry=r,
        )
        self.per_token = Histogram(
            "hunyuan_time_per_output_token_seconds",
            "Time between consecutive new tokens of a request",
            buckets=_TOKEN,
            registry=r,
        )
        self.request_seconds = Histogram(
            "hunyuan_request_seconds", "Submission to finish", buckets=_LATENCY, registry=r
        )
        self.requests = Counter(
            "hunyuan_requests", "Finished requests", ["finish_reason"], registry=r
        )
        self.prefix_queried = Counter(
            "hunyuan_prefix_cache_queried_tokens", "Prompt tokens looked up", registry=r
        )
        self.prefix_hits = Counter(
            "hunyuan_prefix_cache_hit_tokens", "Prompt tokens served from cache", registry=r
        )
        self.prefix_hit_rate = Gauge(
            "hunyuan_prefix_cache_hit_rate", "Prefix cache hit tokens / queried", registry=r
        )
        self.pages_free = Gauge("hunyuan_kv_pages_free", "Free or evictable pages", registry=r)
        self.pages = Gauge("hunyuan_kv_pages", "Usable KV cache pages", registry=r)
        self.preemptions = Gauge("hunyuan_preemptions_total", "Preempted sequences", registry=r)
        self.rejected = Counter(
            "hunyuan_rejected", "Requests refused before queueing", ["reason"], registry=r
        )

    def bind(self, engine) -> None:
        """Gauges read from the engine at scrape time."""
        self.queue_length.set_function(lambda: engine.queue_length)
        self.active_slots.set_function(lambda: engine.active_slots)
        self.tokens_per_second.set_function(engine.tokens_per_second)
        self.prefix_hit_rate.set_function(lambda: engine.pool.stats()["hit_rate"])
        self.pages_free.set_function(engine.pool.available)
        self.preemptions.set_function(lambda: engine.preemptions)
        self.pages.set(engine.ex.num_pages - 1)
        self.slots.set(engine.ex.slots)
        self.executables.set(engine.ex.executables)

    def render(self) -> bytes:
        return generate_latest(self.registry)
