"""Test and benchmark scaffolding kept out of the production modules: synthetic Hugging Face
checkpoints (`synthetic`), peak-RSS measurement of child processes (`rss`) and running the
converter as a real process to SIGKILL it from outside (`process`). Imported as
`tests.helpers.*` (pytest puts the repository root on sys.path (`pythonpath` in pyproject.toml); the
benches run as `python -m bench.NAME` from it)."""
