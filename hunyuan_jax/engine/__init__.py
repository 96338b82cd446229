"""The serving engine: a paged KV cache pool and prefix cache (pages.py), the compiled step
programs and the scheduler that drives them."""
