"""Serve a Hunyuan checkpoint over OpenAI's HTTP API with continuous batching.

    python -m hunyuan_jax.serve                       # the embedded tiny default model
    python -m hunyuan_jax.serve --checkpoint DIR [--mesh data=1,tensor=8 --rules serve_ep_tp]
        [--slots 8] [--max-len 4096] [--prefill-chunk 256] [--prefill-budget 2]
        [--max-queue 64]
        [--host 127.0.0.1] [--port 8000] [--served-model-name NAME] [--dtype auto]
        [--weights auto|bf16|int8|fp8] [--cache-dtype auto|int8]

DIR: any checkpoint infer.py accepts (Hugging Face, converted, train.py run). Without
--checkpoint the server loads `hunyuan_jax/assets/default_model` (a 0.9M-parameter model
trained on Python's stdlib sources by scripts/make_default_model.py, SentencePiece tokenizer),
so `curl` works at once. Multi-host: run the same command on every host (see
hunyuan_jax.distributed); process 0 serves HTTP and every process runs the engine's steps.
The start-up line reports the number of compiled programs (2, whatever the traffic).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

PROG = "python -m hunyuan_jax.serve"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "default_model"
DEFAULT_NAME = "hunyuan-jax-default"


def build_parser() -> argparse.ArgumentParser:
    from hunyuan_jax import distributed
    from hunyuan_jax.errors import add_debug_flag

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint dir (default: embedded model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or dir (default: DIR's)")
    p.add_argument(
        "--adapter",
        default=None,
        help="a LoRA run directory served beside --checkpoint, unmerged (default base: the "
        "one the run records)",
    )
    p.add_argument("--served-model-name", default=None, help="the `model` clients must send")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--cache-dtype", default="auto", choices=("auto", "bfloat16", "float32", "int8"))
    p.add_argument(
        "--weights",
        default="auto",
        choices=("auto", "bf16", "int8", "fp8"),
        help="matmul weights as stored (auto), bf16, or int8 / fp8 per output channel "
        "(quantized on load unless the checkpoint stores them so)",
    )
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "data=1,tensor=8"')
    p.add_argument("--rules", default="serve_ep_tp", help="sharding rules preset for --mesh")
    p.add_argument("--slots", type=int, default=4, help="decode slots (concurrent requests)")
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="tokens per slot: prompt + max_tokens (default: min(model context, 4096))",
    )
    p.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens per prefill call")
    p.add_argument(
        "--prefill-budget",
        type=int,
        default=2,
        help="prefill chunks per engine step (refills free slots faster; delays decoding)",
    )
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--devices", type=int, default=None, help="simulate N CPU devices")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    distributed.add_arguments(p)
    add_debug_flag(p)
    return p


def build_state(
    checkpoint=None,
    *,
    tokenizer=None,
    name=None,
    dtype="auto",
    weights="auto",
    cache_dtype="auto",
    plan=None,
    slots=4,
    max_len=None,
    prefill_chunk=64,
    prefill_budget=2,
    max_queue=64,
    broadcast=False,
    log=print,
    adapter=None,
):
    """Loads the checkpoint and builds the executor, the engine and the metrics (the engine
    is not started). Returns a `api.ServeState`."""
    from hunyuan_jax import loading
    from hunyuan_jax.errors import UsageError
    from hunyuan_jax.serve.api import ServeState
    from hunyuan_jax.serve.engine import Executor
    from hunyuan_jax.serve.metrics import Metrics
    from hunyuan_jax.serve.scheduler import Engine

    path = Path(checkpoint) if checkpoint else None if adapter else DEFAULT_MODEL
    bundle = loading.load(
        path, dtype=dtype, weights=weights, plan=plan, tokenizer=tokenizer, adapter=adapter
    )
    path = bundle.checkpoint.path
    if bundle.tokenizer is None:
        raise UsageError(f"no tokenizer in {path} (hy.tiktoken or *.model); pass --tokenizer")
    limit = bundle.cfg.max_position_embeddings
    max_len = max_len or min(limit, 4096)
    if not 2 <= max_len <= limit:
        raise UsageError(f"--max-len must be in [2, {limit}] (the model's context), got {max_len}")
    if slots < 1 or prefill_chunk < 1 or max_queue < 0:
        raise UsageError("--slots and --prefill-chunk must be >= 1, --max-queue >= 0")
    ex = Executor(
        bundle.model,
        slots=slots,
        max_len=max_len,
        prefill_chunk=prefill_chunk,
        cache_dtype=cache_dtype,
        vocab_limit=bundle.tokenizer.vocab_size,
    )
    log(f"[serve] {path} ({bundle.format}): {ex.describe()}")
    metrics = Metrics()
    engine = Engine(
        ex,
        eos_ids=bundle.eos_ids,
        max_queue=max_queue,
        metrics=metrics,
        broadcast=broadcast,
        prefill_budget=prefill_budget,
    )
    metrics.bind(engine)
    name = name or (DEFAULT_NAME if not checkpoint else path.resolve().name)
    return ServeState(engine, bundle.tokenizer, name, max_len, bundle.sampling, metrics)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--devices", type=int, default=None)
    devices = pre.parse_known_args(argv)[0].devices
    if devices:  # before JAX starts
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from hunyuan_jax.errors import run_cli

    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: _main(args), args.debug)


def _main(args) -> int:
    from hunyuan_jax import distributed

    distributed.initialize_from_args(args)
    import jax

    from sharding.plan import ShardingPlan

    plan = ShardingPlan.from_flags(args.mesh, args.rules) if args.mesh else ShardingPlan.single()
    multi = jax.process_count() > 1
    state = build_state(
        args.checkpoint,
        adapter=args.adapter,
        tokenizer=args.tokenizer,
        name=args.served_model_name,
        dtype=args.dtype,
        weights=args.weights,
        cache_dtype=args.cache_dtype,
        plan=plan,
        slots=args.slots,
        max_len=args.max_len,
        prefill_chunk=args.prefill_chunk,
        prefill_budget=args.prefill_budget,
        max_queue=args.max_queue,
        broadcast=multi,
        log=print if jax.process_index() == 0 else (lambda m: None),
    )
    engine = state.engine
    if jax.process_index() != 0:  # follow process 0's plans until it stops
        engine.follow()
        return 0
    import uvicorn

    from hunyuan_jax.serve.api import create_app

    # uvicorn re-raises the signal that stopped it once it is done; catch it here so that the
    # engine shuts down (and, multi-host, sends the other processes their stop plan).
    stopped: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _frame: stopped.append(s))
    engine.start()
    print(
        f"[serve] model '{state.model_name}' on http://{args.host}:{args.port}/v1 "
        f"({engine.ex.slots} slots, max_len {state.max_len})",
        flush=True,
    )
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    names = ", ".join(signal.Signals(s).name for s in stopped)
    print(f"[serve] stopped{' by ' + names if names else ''}; engine shut down", flush=True)
    return 0


if __name__ == "__main__":
    from hunyuan_jax.host_env import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()  # before any work: glibc reads it at start-up
    sys.exit(main())
