"""Serve a Hunyuan checkpoint over OpenAI's HTTP API with continuous batching.

    python -m hunyuan_jax.cli.serve                       # the embedded tiny default model
    python -m hunyuan_jax.cli.serve --checkpoint DIR [--mesh data=1,tensor=8 --rules serve_ep_tp]
        [--slots 64] [--max-len N] [--prefill-chunk 512] [--page-size 16] [--kv-cache-tokens N]
        [--no-prefix-caching]
        [--max-queue 64] [--max-body-bytes 4194304] [--api-key KEY] [--api-key-metrics]
        [--host 127.0.0.1] [--port 8000] [--served-model-name NAME] [--dtype auto]
        [--weights auto|bf16|int8|fp8|int4|int4-experts] [--int4-group-size 128]
        [--cache-dtype auto|int8]

DIR: any checkpoint infer.py accepts (Hugging Face, converted, train.py run). Without
--checkpoint the server loads `hunyuan_jax/assets/default_model` (a 0.9M-parameter model
trained on Python's stdlib sources by scripts/make_default_model.py, SentencePiece tokenizer),
so `curl` works at once. Multi-host: run the same command on every host (see
hunyuan_jax.distributed); process 0 serves HTTP and every process runs the engine's steps.
The engine (hunyuan_jax/engine) keeps the KV cache in pages of --page-size tokens (a pool of
--kv-cache-tokens, default 16 x --max-len, or --slots x --max-len if fewer slots), admits
requests by free pages (up to --slots in flight: short requests share what one long one would
take, as vLLM's max_num_seqs and its block pool are separate), reuses cached prompt prefixes, and runs each step as one ragged stream of at most
--prefill-chunk tokens mixing decode tokens and prompt chunks of several requests. The start-up
line lists the compiled programs (a fixed set, whatever the traffic).
With --api-key (or HUNYUAN_API_KEY) every endpoint but /health (and /metrics, unless
--api-key-metrics) needs `Authorization: Bearer KEY`. If the engine fails beyond one request
(its device state is lost), the server fails the requests in flight and exits with status 1,
so that a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from hunyuan_jax.cli.decode_flags import PREFILL_CHUNK, add_decode_flags, simulate_devices
from hunyuan_jax.cli_help import HelpFormatter
from hunyuan_jax.errors import ConfigError, UsageError, add_debug_flag, run_cli
from hunyuan_jax.host_env import reexec_with_hugepage_malloc
from hunyuan_jax.serve.metrics import Metrics

# JAX and the package's heavy modules are imported inside the functions, not here: the entry
# point first re-executes itself (`entry`, hunyuan_jax/host_env.py) and, for --devices, sets
# XLA_FLAGS before JAX starts; an import at module level would run before both.

SLOTS = 64  # requests in flight (engine rows) by default, admitted while pages are free
POOL_SEQUENCES = 16  # the default page pool: this many --max-len sequences (fewer slots: slots)
PROG = "python -m hunyuan_jax.cli.serve"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "default_model"
DEFAULT_NAME = "hunyuan-jax-default"
API_KEY_ENV = "HUNYUAN_API_KEY"


def default_pool_tokens(slots: int, max_len: int) -> int:
    """The page pool without --kv-cache-tokens: min(slots, POOL_SEQUENCES) sequences of
    max_len tokens (the memory 16 slot rows took before paging; more rows share it)."""
    return min(slots, POOL_SEQUENCES) * max_len


def build_parser() -> argparse.ArgumentParser:
    from hunyuan_jax import distributed

    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    add_decode_flags(p, without_checkpoint="default: the embedded model")
    p.add_argument("--served-model-name", default=None, help="the `model` clients must send")
    p.add_argument("--slots", type=int, default=SLOTS, help="most requests in flight (engine rows)")
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="longest request: prompt + max_tokens (default: min(model context, 4096))",
    )
    p.add_argument(
        "--page-size",
        type=int,
        default=16,
        help="tokens per KV cache page (prefix reuse is by whole pages; 16 as vLLM: small "
        "enough to share most of a prompt, large enough for the kernel's page blocks)",
    )
    p.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=None,
        help=f"tokens the KV page pool holds (default: min(--slots, {POOL_SEQUENCES}) x "
        f"--max-len); requests are admitted while pages are free, so short ones share what one "
        f"long one would take",
    )
    p.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not reuse the KV pages of a cached prompt prefix",
    )
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 << 20,
        help="largest request body accepted (413 beyond it)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health and /metrics "
        f"(default: ${API_KEY_ENV} if set, else no key)",
    )
    p.add_argument(
        "--api-key-metrics", action="store_true", help="require the API key on /metrics too"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
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
    int4_group_size=None,
    cache_dtype="auto",
    plan=None,
    slots=SLOTS,
    max_len=None,
    prefill_chunk=PREFILL_CHUNK,
    page_size=16,
    kv_cache_tokens=None,
    prefix_caching=True,
    max_queue=64,
    broadcast=False,
    log=print,
    adapter=None,
    allow_base_mismatch=False,
):
    """Loads the checkpoint and builds the engine's programs and page pool, its scheduler and
    the metrics (the engine is not started). Returns a `api.ServeState`."""
    from hunyuan_jax.decode import from_checkpoint
    from hunyuan_jax.engine.core import EngineCore
    from hunyuan_jax.engine.scheduler import Engine
    from hunyuan_jax.serve.api import ServeState
    from hunyuan_jax.serve.schemas import PENALTY_MAX, PENALTY_MIN, TEMPERATURE_MAX

    path = Path(checkpoint) if checkpoint else None if adapter else DEFAULT_MODEL
    bundle = from_checkpoint.load(
        path,
        dtype=dtype,
        weights=weights,
        int4_group_size=int4_group_size,
        plan=plan,
        tokenizer=tokenizer,
        adapter=adapter,
        allow_base_mismatch=allow_base_mismatch,
        log=log,
    )
    path = bundle.checkpoint.path
    if bundle.tokenizer is None:
        raise UsageError(f"no tokenizer in {path} (hy.tiktoken or *.model); pass --tokenizer")
    limit = bundle.cfg.max_position_embeddings
    max_len = max_len or min(limit, 4096)
    if not 2 <= max_len <= limit:
        raise UsageError(f"--max-len must be in [2, {limit}] (the model's context), got {max_len}")
    if slots < 1 or prefill_chunk < 1 or page_size < 1 or max_queue < 0:
        raise UsageError("--slots, --prefill-chunk and --page-size must be >= 1, --max-queue >= 0")
    if kv_cache_tokens is None:
        kv_cache_tokens = default_pool_tokens(slots, max_len)
    if kv_cache_tokens < max_len:
        raise UsageError(
            f"--kv-cache-tokens {kv_cache_tokens} is less than --max-len {max_len}: a request "
            f"of --max-len tokens could never be served"
        )
    d = bundle.sampling  # generation_config.json: the ranges a request may ask for
    if not (
        d.temperature <= TEMPERATURE_MAX and PENALTY_MIN <= d.repetition_penalty <= PENALTY_MAX
    ):
        raise ConfigError(
            f"{path}: the generation_config.json defaults temperature {d.temperature} / "
            f"repetition_penalty {d.repetition_penalty} are outside what the server samples "
            f"with (temperature <= {TEMPERATURE_MAX:g}, repetition_penalty in "
            f"[{PENALTY_MIN:g}, {PENALTY_MAX:g}])"
        )
    ex = EngineCore(
        bundle.model,
        max_seqs=slots,
        max_len=max_len,
        page_size=page_size,
        num_pages=-(-kv_cache_tokens // page_size) + 1,  # + the scratch page
        token_budget=prefill_chunk,
        cache_dtype=cache_dtype,
        vocab_limit=bundle.tokenizer.vocab_size,
    )
    served = f"{path} + adapter {adapter}" if adapter else str(path)
    log(f"[serve] {served} ({bundle.format}): {ex.describe()}")
    metrics = Metrics()
    engine = Engine(
        ex,
        eos_ids=bundle.eos_ids,
        max_queue=max_queue,
        metrics=metrics,
        broadcast=broadcast,
        prefix_caching=prefix_caching,
        namespace=f"{served}|{bundle.model.policy.weights}",
    )
    metrics.bind(engine)
    name = name or served_name(checkpoint, adapter, path)
    return ServeState(engine, bundle.tokenizer, name, max_len, bundle.sampling, metrics)


def served_name(checkpoint, adapter, base: Path) -> str:
    """The model name clients send, saying what is served: the checkpoint folder's name
    (`hunyuan-jax-default` for the embedded model), with `+ADAPTER` (the LoRA run folder's
    name) when an adapter is served beside it."""
    base = Path(base).resolve()
    name = DEFAULT_NAME if base == DEFAULT_MODEL.resolve() else base.name
    return name if adapter is None else f"{name}+{Path(adapter).resolve().name}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--devices", type=int, default=None)
    devices = pre.parse_known_args(argv)[0].devices
    simulate_devices(devices)  # before JAX starts (build_parser imports hunyuan_jax.distributed)

    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: _main(args), args.debug)


def _main(args) -> int:
    from hunyuan_jax import distributed

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty")
    if args.max_body_bytes < 1024:
        raise UsageError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    distributed.initialize_from_args(args)
    import jax

    from sharding.plan import ShardingPlan

    plan = ShardingPlan.from_flags(args.mesh, args.rules) if args.mesh else ShardingPlan.single()
    multi = jax.process_count() > 1
    state = build_state(
        args.checkpoint,
        adapter=args.adapter,
        allow_base_mismatch=args.allow_base_mismatch,
        tokenizer=args.tokenizer,
        name=args.served_model_name,
        dtype=args.dtype,
        weights=args.weights,
        int4_group_size=args.int4_group_size,
        cache_dtype=args.cache_dtype,
        plan=plan,
        slots=args.slots,
        max_len=args.max_len,
        prefill_chunk=args.prefill_chunk,
        page_size=args.page_size,
        kv_cache_tokens=args.kv_cache_tokens,
        prefix_caching=not args.no_prefix_caching,
        max_queue=args.max_queue,
        broadcast=multi,
        log=print if jax.process_index() == 0 else (lambda m: None),
    )
    engine = state.engine
    if jax.process_index() != 0:  # follow process 0's plans until it stops
        return 0 if engine.follow() else 1
    import uvicorn

    from hunyuan_jax.serve.api import create_app

    app = create_app(state, api_key=api_key, api_key_metrics=args.api_key_metrics,
                     max_body_bytes=args.max_body_bytes)  # fmt: skip
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    )
    failed: list[str] = []

    def on_fatal(message: str) -> None:  # engine thread: stop serving, exit non-zero
        failed.append(message)
        server.config.timeout_graceful_shutdown = 5
        server.should_exit = True

    engine.on_fatal = on_fatal
    # uvicorn re-raises the signal that stopped it once it is done; catch it here so that the
    # engine shuts down (and, multi-host, sends the other processes their stop plan).
    stopped: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _frame: stopped.append(s))
    engine.start()
    auth = "; API key required" if api_key else ""
    print(
        f"[serve] model '{state.model_name}' on http://{args.host}:{args.port}/v1 "
        f"({engine.ex.slots} requests in flight at most, {engine.ex.pool_tokens} KV cache "
        f"tokens, max_len {state.max_len}{auth})",
        flush=True,
    )
    try:
        server.run()
    finally:
        engine.shutdown()
    if failed:
        print(f"[serve] {failed[0]}; exiting with status 1 so that a supervisor restarts the "
              f"server", file=sys.stderr, flush=True)  # fmt: skip
        return 1
    names = ", ".join(signal.Signals(s).name for s in stopped)
    print(f"[serve] stopped{' by ' + names if names else ''}; engine shut down", flush=True)
    return 0


def entry() -> int:
    """`hunyuan-serve`, `python -m hunyuan_jax.cli.serve`: the start-up re-exec (before any work: glibc reads its
    tunables at start-up), then `main()`."""
    reexec_with_hugepage_malloc()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
