"""The serving engine: a paged KV cache pool and prefix cache (pages.py), the compiled step
programs and the scheduler that drives them; offline generation over them (offline.py) and
GRPO's rollouts on a train step's own arrays (rollout.py)."""
