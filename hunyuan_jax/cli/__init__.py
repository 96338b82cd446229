"""The command lines: `train`, `infer`, `serve`, `convert`, `aot`, `smoke` (each `python -m
hunyuan_jax.cli.NAME`; the first five also installed as `hunyuan-NAME`). Each entry point
re-executes itself first (`host_env`) and sets up simulated devices before JAX is imported."""
