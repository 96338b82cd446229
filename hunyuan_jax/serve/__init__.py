"""The HTTP server: OpenAI-compatible completions / chat completions over the serving engine.

`python -m hunyuan_jax.cli.serve` (`hunyuan_jax/cli/serve.py`); the engine (paged KV cache,
prefix caching, continuous batching) is `hunyuan_jax/engine`; here the HTTP layer in `api.py`
(+ `routes.py`, `schemas.py`, `text.py`, `guard.py`), Prometheus in `metrics.py`.
"""
