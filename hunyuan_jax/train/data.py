"""A training run's tokenizer and data loader: which tokenizer the run uses (copied into
<run>/tokenizer/ so the run directory alone can resume or decode), this host's share of the
documents, and the packed-row loader over them (`data.PackedLoader`); and `check_run`, the
checks of a run's shapes that need neither data nor weights (train.py before it creates the run
directory, the AOT tool before it compiles).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from hunyuan_jax.checkpoints.loading import find_tokenizer
from hunyuan_jax.checkpoints.runs import (
    TOKENIZER_SUMS,
    complete_steps,
    copy_tokenizer_files,
    tokenizer_problem,
)
from hunyuan_jax.data.corpus import (
    PackedLoader,
    check_seq_len,
    embedded_corpus,
    read_documents,
    texts_for_tokenizer,
    tokenize,
)
from hunyuan_jax.data.tokenizer import SentencePieceTokenizer, load_tokenizer
from hunyuan_jax.errors import CheckpointError, ConfigError
from hunyuan_jax.model.config import ModelConfig
from hunyuan_jax.model.state import check_fits
from hunyuan_jax.train.config import TrainConfig


def check_run(mcfg: ModelConfig, policy, tcfg: TrainConfig, plan) -> None:
    """ConfigError (exit 2) for a run that cannot start: seq_len beyond the model's positions
    (without train.allow_long_sequences), a mesh whose axes do not divide the model's
    parameters (`state.check_fits`). `mcfg` is the architecture the run trains: the
    --init-from checkpoint's when there is one."""
    check_seq_len(tcfg.seq_len, mcfg.max_position_embeddings, tcfg.allow_long_sequences)
    check_fits(plan, mcfg, policy)


def run_tokenizer(run_dir: Path, log=print):
    """The tokenizer in <run>/tokenizer/ if its files match their checksums; None if there is
    none yet, or if it is damaged (a kill while it was written) and no checkpoint was trained
    with it: then it is removed, to be written again. Damaged with checkpoints: CheckpointError
    saying what to put back or delete."""
    tok_dir = run_dir / "tokenizer"
    if not tok_dir.is_dir():
        return None
    problem = tokenizer_problem(tok_dir)
    if problem is None:
        return find_tokenizer(tok_dir)
    steps = complete_steps(run_dir)
    if not steps:
        log(f"[data] {problem}; no checkpoint was trained with it: writing it again")
        if jax.process_index() == 0:
            shutil.rmtree(tok_dir)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("run tokenizer removed")
        return None
    refuse = (
        f"{problem}, and checkpoints {steps} of {run_dir} were trained with it: put the "
        f"original tokenizer files back into {tok_dir}, or delete {run_dir} to start over"
    )
    if (tok_dir / TOKENIZER_SUMS).is_file():
        raise CheckpointError(refuse)
    try:  # a run from before the checksums: its files were written whole or not at all
        tok = find_tokenizer(tok_dir)
    except (CheckpointError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{refuse} ({e})") from None
    if tok is None:
        raise CheckpointError(refuse)
    return tok


def setup_tokenizer(
    tcfg: TrainConfig, mcfg: ModelConfig, run_dir: Path, docs, kind: str, log=print
):
    """The run's tokenizer, copied into <run>/tokenizer/ (a resumed run reuses that copy):
    tokenizer="auto": the --init-from checkpoint's tokenizer; a checkpoint without one is a
    ConfigError asking for `--set tokenizer=PATH` (ids from a tokenizer trained here would mean
    nothing to its weights); from scratch, as "sentencepiece": train a SentencePiece model on
    (this host's share of) the corpus; any other value: a tokenizer path (hy.tiktoken
    directory or file, SentencePiece .model). A tokenizer with more ids than the model's
    vocab_size is a ConfigError, before anything is written."""
    tok_dir = run_dir / "tokenizer"
    tok = run_tokenizer(run_dir, log)
    if tok is None and tcfg.tokenizer == "auto" and tcfg.init_from:
        tok = find_tokenizer(Path(tcfg.init_from))
        if tok is None:
            raise ConfigError(
                f"--init-from {tcfg.init_from} has no tokenizer (no hy.tiktoken or *.model "
                f"there or in its tokenizer/) and train key 'tokenizer' is auto: name the "
                f"tokenizer its weights were trained with, --set tokenizer=PATH (a tokenizer "
                f"trained on this run's data would give ids that mean nothing to them)"
            )
    if tok is None and tcfg.tokenizer in ("auto", "sentencepiece"):
        if jax.process_index() == 0:
            vocab = tcfg.tokenizer_vocab_size or mcfg.vocab_size
            SentencePieceTokenizer.train(
                texts_for_tokenizer(docs, kind, tcfg.tokenizer_train_bytes),
                tok_dir / "tokenizer",
                vocab,
                hard_vocab_limit=False,  # small corpora: fewer pieces
            )
        if jax.process_count() > 1:  # the run directory is shared by the hosts
            multihost_utils.sync_global_devices("tokenizer trained")
        tok = SentencePieceTokenizer.load(tok_dir / "tokenizer.model")
    if tok is None:
        try:
            tok = load_tokenizer(tcfg.tokenizer)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"train key 'tokenizer' {tcfg.tokenizer!r}: {e}") from None
    if tok.vocab_size > mcfg.vocab_size:
        raise ConfigError(
            f"tokenizer {type(tok).__name__} has {tok.vocab_size} ids but the model's "
            f"vocab_size is {mcfg.vocab_size}: ids past it have no embedding (name a "
            f"tokenizer of at most {mcfg.vocab_size} ids: --set tokenizer=PATH)"
        )
    copy_tokenizer_files(tok, run_dir)
    return tok


def make_loader(tcfg: TrainConfig, mcfg: ModelConfig, run_dir: Path, log=print):
    """(tokenizer, PackedLoader of this host's rows)."""
    pi, pc = jax.process_index(), jax.process_count()
    if tcfg.batch_size % pc:
        raise ConfigError(f"batch_size {tcfg.batch_size} not divisible by {pc} hosts")
    if tcfg.data is None:
        docs = embedded_corpus(tcfg.corpus_max_bytes)[pi::pc]
        kind = "text"
    else:
        docs, kind = read_documents(tcfg.data, tcfg.data_format, tcfg.text_field, pi, pc)
    t0 = time.time()
    tok = setup_tokenizer(tcfg, mcfg, run_dir, docs, kind, log)
    tokenized = tokenize(tok, docs, kind)
    n_tokens = sum(len(ids) for ids, _ in tokenized)
    log(
        f"[data] {len(tokenized)} {kind} documents, {n_tokens:,} tokens on this host "
        f"({type(tok).__name__}, {tok.vocab_size} ids; {time.time() - t0:.1f}s)"
    )
    loader = PackedLoader(
        tokenized,
        tcfg.batch_size // pc,
        tcfg.seq_len,
        tcfg.micro_batches,
        seed=tcfg.seed,
        shuffle=tcfg.shuffle,
        pack=tcfg.pack,
        pad_id=tok.pad_id,
    )
    return tok, loader
