"""Generate text from a Hunyuan-Large checkpoint on the serving engine (paged KV cache, prompts
prefilled together in ragged steps, continuous batching: the server's programs).

    python infer.py --checkpoint DIR --prompt "The capital of France is"
    python infer.py --checkpoint DIR --chat --system "You are terse." --prompt "Hi!"
    python infer.py --checkpoint DIR --prompts-file prompts.txt --max-new-tokens 64
    python infer.py --checkpoint DIR --prompt "..." --mesh data=1,tensor=8 --cache-dtype int8
    python infer.py --checkpoint DIR --prompt "..." --weights int8

DIR is a Hugging Face checkpoint, a converted one (`python -m hunyuan_jax.cli.convert hf-to-jax`)
or a train.py run directory (its latest checkpoint, its tokenizer/).

Tokens are streamed to the terminal as they are produced (one prompt), or each completion is
printed when it finishes (several prompts); a final line on stderr gives prefill and decode
tokens/s. Sampling defaults come from the checkpoint's generation_config.json (else greedy);
flags override them. Loading is `hunyuan_jax.checkpoints.loading` (checksums verified: the crc32c of every
chunk of a converted checkpoint, the digests of a run's arrays; a Hugging Face checkpoint's
shard headers and sizes), generation `hunyuan_jax.engine.offline` (each prompt one request of
the engine, sampled with its own key from --seed and its index).

Exit status (`hunyuan_jax/errors.py`): 0 success; 2 bad command line or configuration; 3 bad
prompts file; 4 checkpoint missing, truncated, corrupt or unsafe (the message names the file,
tensor or array); 1 a bug (traceback). Expected errors are one line on stderr; `--debug`
shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hunyuan_jax.cli.decode_flags import add_decode_flags, simulate_devices
from hunyuan_jax.cli_help import HelpFormatter
from hunyuan_jax.data.tokenizer import DEFAULT_SYSTEM_PROMPT, load_tokenizer
from hunyuan_jax.errors import (
    CheckpointError,
    DataError,
    UsageError,
    add_debug_flag,
    run_cli,
)
from hunyuan_jax.host_env import reexec_with_hugepage_malloc

# JAX and the package's heavy modules are imported inside the functions, not here: the entry
# point first re-executes itself (`entry`, hunyuan_jax/host_env.py); an import at module level
# would run before it.

PROG = "infer.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    src = p.add_argument_group("prompts")
    src.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    src.add_argument("--prompts-file", help="a text file, one prompt per non-empty line")
    src.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user turn of the Hunyuan chat template",
    )
    src.add_argument(
        "--system",
        default=None,
        help="system prompt for --chat (default: 'You are a helpful assistant.'; '' for none)",
    )
    src.add_argument(
        "--no-bos",
        action="store_true",
        help="without --chat, do not start prompts with <|startoftext|>",
    )
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate")
    gen.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="KV cache length limit in tokens (default: the model's max_position_embeddings)",
    )
    gen.add_argument("--greedy", action="store_true", help="argmax decoding (= --temperature 0)")
    gen.add_argument("--temperature", type=float, default=None, help=">= 0; 0 is greedy")
    gen.add_argument("--top-k", type=int, default=None, help=">= 0; 0 is off")
    gen.add_argument("--top-p", type=float, default=None, help="in (0, 1]; 1 is off")
    gen.add_argument("--repetition-penalty", type=float, default=None, help="> 0; 1 is off")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    run = p.add_argument_group("runtime")
    add_decode_flags(
        p,
        run,
        without_checkpoint="required unless --adapter names a LoRA run that records its base",
    )
    run.add_argument("--no-stream", action="store_true", help="print completions at the end")
    add_debug_flag(p)
    return p


def _sampling_flags(args) -> dict:
    flags = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )
    if args.greedy:
        if args.temperature not in (None, 0.0):
            raise UsageError("--greedy and --temperature > 0 contradict each other")
        flags["temperature"] = 0.0
    return {k: v for k, v in flags.items() if v is not None}


def describe_sampling(s, seed: int) -> str:
    """The sampling settings in one form whatever they are: "greedy" or the temperature with
    the filters and the seed, then the repetition penalty where it is on."""
    text = (
        "greedy"
        if s.greedy
        else f"temperature {s.temperature:g}, top_k {s.top_k}, top_p {s.top_p:g}, seed {seed}"
    )
    if s.repetition_penalty != 1.0:
        text += f", repetition_penalty {s.repetition_penalty:g}"
    return text


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"--prompts-file not found: {path}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"--prompts-file {path}: cannot read: {e}") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def _encode(tokenizer, prompts: list[str], args) -> list[list[int]]:
    out = []
    for text in prompts:
        if args.chat:
            system = DEFAULT_SYSTEM_PROMPT if args.system is None else (args.system or None)
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], system_prompt=system
            )
        else:
            ids = tokenizer.encode(text)
            if not args.no_bos:
                ids = [tokenizer.bos_id] + ids
        out.append(ids)
    return out


class _Printer:
    """Streams text: the one prompt token by token, or each completion when it ends.
    Called as `printer(i, token, done)` for every new token of prompt i and once when it ends."""

    def __init__(self, tokenizer, n: int, eos_ids, out=None):
        self.tok, self.n, self.out = tokenizer, n, out or sys.stdout
        self.eos = set(eos_ids)
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.printed = [""] * n
        self.finished = [False] * n

    def text(self, i: int) -> str:
        return self.tok.decode(
            [t for t in self.ids[i] if t not in self.eos], skip_special_tokens=True
        )

    def __call__(self, i: int, token: int | None, done: bool):
        if token is not None:
            self.ids[i].append(int(token))
            if self.n == 1:
                text = self.text(0)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    self.out.write(text[len(self.printed[0]) :])
                    self.out.flush()
                    self.printed[0] = text
        if done:
            self.finish(i)

    def finish(self, i: int):
        if self.finished[i]:
            return
        self.finished[i] = True
        if self.n == 1:
            text = self.text(0)
            self.out.write(text[len(self.printed[0]) :] + "\n")
        else:
            self.out.write(f"[{i}] {self.text(i)}\n")
        self.out.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    simulate_devices(args.devices)  # before JAX starts (it is imported below, in _main)
    return run_cli(PROG, lambda: _main(args), debug=args.debug, oserror=CheckpointError)


def _main(args) -> int:
    # Cheap checks first: nothing is loaded before the command line is known to be valid.
    from hunyuan_jax.decode.sampling import SamplingConfig

    flags = _sampling_flags(args)
    try:
        SamplingConfig().replace(**flags)  # range errors, before loading anything
    except ValueError as e:
        name = str(e).split()[0]
        raise UsageError("--" + name.replace("_", "-") + str(e)[len(name) :]) from None
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.max_len is not None and args.max_len < 2:
        raise UsageError(f"--max-len must be >= 2, got {args.max_len}")
    if args.prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    prompts = _read_prompts(args)
    if args.checkpoint is None and args.adapter is None:
        raise UsageError("--checkpoint is required (or --adapter with a LoRA run)")

    from hunyuan_jax.decode import from_checkpoint
    from hunyuan_jax.engine.offline import OfflineGenerator
    from sharding.plan import ShardingPlan

    plan = ShardingPlan.single()
    if args.mesh:
        try:
            plan = ShardingPlan.from_flags(args.mesh, args.rules)
        except ValueError as e:
            raise UsageError(f"--mesh {args.mesh!r} / --rules {args.rules!r}: {e}") from None
    tokenizer = None
    if args.tokenizer is not None:
        try:
            load_tokenizer(args.tokenizer)  # a bad --tokenizer is a usage error, said early
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--tokenizer {args.tokenizer}: {e}") from None
        tokenizer = args.tokenizer
    bundle = from_checkpoint.load(
        args.checkpoint,
        dtype=args.dtype,
        weights=args.weights,
        int4_group_size=args.int4_group_size,
        plan=plan,
        tokenizer=tokenizer,
        adapter=args.adapter,
        allow_base_mismatch=args.allow_base_mismatch,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    if bundle.tokenizer is None:
        raise UsageError(
            f"no tokenizer in {bundle.checkpoint.path} (looked for hy.tiktoken and "
            f"*.model there and in tokenizer/); pass --tokenizer"
        )
    sampling = bundle.sampling.replace(**flags)
    ids = _encode(bundle.tokenizer, prompts, args)

    gen = OfflineGenerator(
        bundle.model,
        sampling=sampling,
        eos_ids=bundle.eos_ids,
        cache_dtype=args.cache_dtype,
        vocab_limit=bundle.tokenizer.vocab_size,
        token_budget=args.prefill_chunk,
    )
    limit = args.max_len or bundle.cfg.max_position_embeddings
    try:
        gen.check_prompts(ids, args.max_new_tokens, limit)  # prompt longer than the cache, ...
    except ValueError as e:
        where = (
            "--max-len"
            if args.max_len
            else ("the model's max_position_embeddings; raise it with --max-len")
        )
        raise UsageError(f"{e} (cache limit {limit} from {where})") from None
    longest = max(len(p) for p in ids)
    max_len = min(limit, -(-(longest + args.max_new_tokens) // 64) * 64)

    printer = _Printer(bundle.tokenizer, len(ids), bundle.eos_ids)
    out = gen.generate(
        ids,
        args.max_new_tokens,
        seed=args.seed,
        max_len=max_len,
        stream=None if args.no_stream else printer,
    )
    for i, row in enumerate(out.tokens):
        printer.ids[i] = list(row)
        printer.finish(i)
    print(
        f"prefill: {out.prompt_tokens} tokens in {out.prefill_seconds:.3f} s "
        f"({out.prefill_tokens_per_s:.1f} tokens/s) | decode: {out.new_tokens} new tokens in "
        f"{out.decode_seconds:.3f} s ({out.decode_tokens_per_s:.1f} tokens/s) | "
        f"compile {out.compile_seconds:.1f} s | sampling: {describe_sampling(sampling, args.seed)}",
        file=sys.stderr,
    )
    return 0


def entry() -> int:
    """`hunyuan-infer`, `python -m hunyuan_jax.cli.infer`, `python infer.py`: the start-up re-exec (before any work: glibc reads its
    tunables at start-up), then `main()`."""
    reexec_with_hugepage_malloc()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
