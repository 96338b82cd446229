"""The HTTP server: OpenAI-compatible completions / chat completions with continuous batching.

`python -m hunyuan_jax.cli.serve` (`hunyuan_jax/cli/serve.py`); the device programs in `engine.py`, slots and the
loop in `scheduler.py`, the HTTP layer in `api.py` (+ `schemas.py`, `text.py`), Prometheus in `metrics.py`.
"""
