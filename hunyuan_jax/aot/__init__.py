"""Ahead-of-time compiles for TPU slices you do not have: does the program fit, and how fast
could it be? (`python -m hunyuan_jax.cli.aot --help`; the measured tables are in docs/tpu.md.)

With libtpu installed, `jax.experimental.topologies` describes any TPU slice as compile-only
devices on a CPU host. The sharding plan is built over those devices, the real programs are
lowered for abstract parameters, optimizer state, KV cache and batch, and XLA:TPU compiles
them; the report gives per-chip memory, FLOPs and the MFU implied by a stated step-time model
(or why that model does not apply to the program: `flops.model_limits`).

| module | owns |
|---|---|
| `topology` | the chip table, Cloud TPU names -> topologies, compile-only devices, default meshes |
| `programs` | what is compiled: `TrainStep.lower`, `Generator.lower` (serve: `EngineCore.lower`) |
| `compiler` | compiling, per-chip memory, the out-of-memory verdict, XLA dumps, hoisted casts |
| `flops` | analytic and unrolled FLOP counts, the step-time model |
| `report` | one compile's report as a dict and as text (and the text of `serve`'s) |
| `serve` | `--mode serve`: every program of the serving engine, the page pool sized to the chip |
| `grpo` | `--mode grpo`: the GRPO train step and the rollout engine on the same weights, both at once |

The command line (flags -> configs, plan and job; exit codes through `hunyuan_jax.errors`) is
`hunyuan_jax/cli/aot.py`.
"""
