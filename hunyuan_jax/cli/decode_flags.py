"""The command-line flags infer.py and the server share, one definition and one default each:
which checkpoint (its tokenizer, a LoRA run's adapters beside it), how it is held (dtypes, the
matmul weights' form, the KV cache's dtype), where it runs (mesh, rules, simulated CPU
devices) and the prefill chunk. Each command's own flags stay in its own file.

    p = argparse.ArgumentParser(...)
    add_decode_flags(p, without_checkpoint="default: the embedded model")
    ...
    simulate_devices(args.devices)   # before JAX starts
"""

from __future__ import annotations

import argparse
import os

from hunyuan_jax.model.policy import INT4_GROUP_SIZE, WEIGHTS

PREFILL_CHUNK = 512  # prompt tokens per prefill call


def add_decode_flags(
    parser: argparse.ArgumentParser, runtime=None, *, without_checkpoint: str
) -> None:
    """Adds the shared flags: the checkpoint's to `parser`, the runtime ones (dtypes, weights,
    cache, mesh, rules, devices, prefill chunk) to `runtime` (an argument group; default
    `parser`). `without_checkpoint`: what the command does without --checkpoint."""
    runtime = parser if runtime is None else runtime
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint directory: Hugging Face layout (config.json + safetensors / .bin "
        "shards), the output of `python -m hunyuan_jax.cli.convert hf-to-jax`, or a train.py "
        f"run directory ({without_checkpoint})",
    )
    parser.add_argument(
        "--adapter",
        default=None,
        help="a LoRA run directory (train.py with train.lora): its adapters are applied beside "
        "the --checkpoint weights, unmerged (default base: the one the run records)",
    )
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="apply --adapter to a base other than the one it was trained on (its digest in "
        "lora_base.json is then not checked)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer file or directory (default: the one in the "
        "checkpoint directory: hy.tiktoken or a SentencePiece *.model)",
    )
    runtime.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="parameter and compute dtype (auto: the checkpoint's torch_dtype)",
    )
    runtime.add_argument(
        "--weights",
        default="auto",
        choices=WEIGHTS,
        help="how the matmul weights are held: auto (as the checkpoint stores them), bf16, "
        "int8 (per output channel), fp8 (e4m3), int4 (per group of --int4-group-size along "
        "the contraction) or int4-experts (routed experts int4, the others int8); a float "
        "checkpoint is quantized on load (`python -m hunyuan_jax.cli.convert hf-to-jax "
        "--quantize` does it once, on disk)",
    )
    runtime.add_argument(
        "--int4-group-size",
        type=int,
        default=INT4_GROUP_SIZE,
        help="int4 values per scale along the contraction, a target: each weight takes the "
        "largest group <= it that leaves whole groups on every shard of its contraction up to "
        "16 (a stored int4 checkpoint keeps its own)",
    )
    runtime.add_argument(
        "--cache-dtype",
        default="auto",
        choices=("auto", "bfloat16", "float32", "int8"),
        help="KV cache dtype (auto: the compute dtype; int8: per-token, per-head scales)",
    )
    runtime.add_argument(
        "--mesh",
        default=None,
        help='device mesh, e.g. "data=2,tensor=4" '
        "(axes data, fsdp, expert, tensor; one size may be -1)",
    )
    runtime.add_argument("--rules", default="serve_ep_tp", help="sharding rules preset for --mesh")
    runtime.add_argument(
        "--devices",
        type=int,
        default=None,
        help="simulate this many CPU devices (for --mesh on a CPU host; set before JAX starts)",
    )
    runtime.add_argument(
        "--prefill-chunk",
        type=int,
        default=PREFILL_CHUNK,
        help="prompt tokens per prefill call",
    )


def simulate_devices(devices: int | None) -> None:
    """--devices N: N CPU devices (XLA's host platform), set in the environment before JAX
    starts (JAX reads XLA_FLAGS once, when its backend starts)."""
    if devices:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
