"""Text <-> token ids for hunyuan_jax.

This module owns tokenisation: the common ``Tokenizer`` interface (``tokenizer_base``), the original Hunyuan
tiktoken BPE (``HunyuanTokenizer``, SPEC section 4), a SentencePiece tokenizer that can be trained
on a small corpus (``SentencePieceTokenizer``), and ``load_tokenizer``, which picks the right one
for a directory or file. A tokenizer renders chat with its ``tokenizer_config.json``'s jinja
template when it has one, with the hand port of the Hunyuan-Large layout otherwise (both in
``chat_template``); the special tokens' strings and ids are in ``special_tokens``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm
import tiktoken

from hunyuan_jax.atomic import fsync_dir
from hunyuan_jax.data.chat_template import (
    compile_chat_template,
    read_tokenizer_config,
    render_chat,
    render_chat_template,
)
from hunyuan_jax.data.special_tokens import (
    CHAT_SPECIAL_TOKENS,
    DEFAULT_EOS_IDS,
    DEFAULT_PAD_ID,
    DEFAULT_SYSTEM_PROMPT,
    ENDOFTEXT,
    EOS,
    PAD,
    PAT_STR,
    SPECIAL_START_ID,
    SPECIAL_TOKENS,
    STARTOFTEXT,
    nfc,
)
from hunyuan_jax.data.tokenizer_base import Tokenizer
from hunyuan_jax.errors import CheckpointError

__all__ = [
    "Tokenizer",
    "HunyuanTokenizer",
    "SentencePieceTokenizer",
    "load_tokenizer",
    "render_chat",
    "render_chat_template",
    "compile_chat_template",
    "PAT_STR",
    "SPECIAL_START_ID",
    "SPECIAL_TOKENS",
    "CHAT_SPECIAL_TOKENS",
    "DEFAULT_SYSTEM_PROMPT",
]

# --------------------------------------------------------------------------- Hunyuan tiktoken


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                tok_b64, rank = line.split()
                tok = base64.b64decode(tok_b64, validate=True)
                rank_i = int(rank)
            except ValueError as e:
                raise ValueError(
                    f"{path}:{lineno}: expected 'base64 rank', got {line[:80]!r}"
                ) from e
            if tok in ranks:
                raise ValueError(f"{path}:{lineno}: duplicated token {tok!r}")
            ranks[tok] = rank_i
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


class HunyuanTokenizer(Tokenizer):
    """The original Hunyuan-Large tokenizer: tiktoken BPE over ``hy.tiktoken`` + 209 specials."""

    def __init__(
        self,
        vocab_file: str | Path,
        eos_ids: Sequence[int] | None = None,
        pad_id: int | None = None,
        chat_template: str | None = None,
        special_tokens_map: Mapping[str, object] | None = None,
        chat_template_source: str | None = None,
    ):
        vocab_file = Path(vocab_file)
        if not vocab_file.is_file():
            raise FileNotFoundError(f"tiktoken vocab file not found: {vocab_file}")
        ranks = _load_ranks(vocab_file)
        if len(ranks) != SPECIAL_START_ID:
            raise ValueError(
                f"{vocab_file}: {len(ranks)} ranks, Hunyuan special ids need exactly {SPECIAL_START_ID}"
            )
        self._enc = tiktoken.Encoding(
            "hunyuan",
            pat_str=PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=dict(SPECIAL_TOKENS),
            explicit_n_vocab=len(ranks) + len(SPECIAL_TOKENS),
        )
        self._eos_ids = list(eos_ids) if eos_ids is not None else list(DEFAULT_EOS_IDS)
        self._pad_id = int(pad_id) if pad_id is not None else DEFAULT_PAD_ID
        self.vocab_file = vocab_file
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source
        # The original HYTokenizer's defaults, overridden by tokenizer_config.json's keys.
        self._special_tokens_map = {
            "bos_token": STARTOFTEXT,
            "eos_token": ENDOFTEXT,
            "pad_token": PAD,
        }
        self._special_tokens_map.update(special_tokens_map or {})

    @classmethod
    def from_dir(cls, path: str | Path) -> HunyuanTokenizer:
        """Load ``path/hy.tiktoken`` (or ``path`` itself if it is the file) and, if present
        beside it, ``generation_config.json`` (``eos_token_id`` / ``pad_token_id``) and
        ``tokenizer_config.json`` (``chat_template`` and special-token names)."""
        path = Path(path)
        vocab = path if path.is_file() else path / "hy.tiktoken"
        if not vocab.is_file():
            raise FileNotFoundError(f"Hunyuan tokenizer file not found: {vocab}")
        eos_ids, pad_id = None, None
        gen = vocab.parent / "generation_config.json"
        if gen.is_file():
            cfg = json.loads(gen.read_text())
            eos = cfg.get("eos_token_id")
            if eos is not None:
                eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
            if cfg.get("pad_token_id") is not None:
                pad_id = int(cfg["pad_token_id"])
        template, tokens, source = None, None, None
        tok_cfg = vocab.parent / "tokenizer_config.json"
        if tok_cfg.is_file():
            template, tokens = read_tokenizer_config(tok_cfg)
            source = str(tok_cfg)
        return cls(
            vocab,
            eos_ids=eos_ids,
            pad_id=pad_id,
            chat_template=template,
            special_tokens_map=tokens,
            chat_template_source=source,
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self._enc.encode(nfc(text), allowed_special="all", disallowed_special=())
        if add_special_tokens:
            ids = [SPECIAL_TOKENS[STARTOFTEXT], *ids, SPECIAL_TOKENS[ENDOFTEXT]]
        return ids

    def encode_text(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(nfc(text))  # no special tokens at all

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [t for t in ids if t < SPECIAL_START_ID]
        return self._enc.decode(ids, errors="replace")

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def eos_ids(self) -> list[int]:
        return list(self._eos_ids)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int:
        return SPECIAL_TOKENS[STARTOFTEXT]

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(SPECIAL_TOKENS)

    @property
    def special_tokens_map(self) -> dict[str, object]:
        return dict(self._special_tokens_map)


# --------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model behind the ``Tokenizer`` interface.

    Models made by ``train`` reserve the pieces in ``CHAT_SPECIAL_TOKENS`` as
    user-defined symbols (matched whole in text, ids 1..6 after ``<unk>``), so the
    Hunyuan chat layout and ``add_special_tokens`` work exactly as with
    ``HunyuanTokenizer``.  Other models work for plain encode/decode.
    """

    def __init__(self, processor, path: Path | None = None):
        self._sp = processor
        self.path = path
        n = processor.get_piece_size()
        self._special: dict[str, int] = {}
        for piece in CHAT_SPECIAL_TOKENS:
            i = processor.piece_to_id(piece)
            if 0 <= i < n and processor.id_to_piece(i) == piece and not processor.is_unknown(i):
                self._special[piece] = i

    @classmethod
    def load(cls, path: str | Path) -> SentencePieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model file not found: {path}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (RuntimeError, OSError) as e:  # "unk is not defined" for a 0-byte file
            size = path.stat().st_size
            raise CheckpointError(
                f"{path}: not a readable SentencePiece model ({size} bytes; {e}): the file is "
                f"empty, truncated or corrupt"
            ) from None
        return cls(sp, path)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        out_prefix: str | Path,
        vocab_size: int,
        model_type: str = "bpe",
        **trainer_kwargs,
    ) -> SentencePieceTokenizer:
        """Train on ``texts`` (NFC-normalised, one sentence per item), write
        ``{out_prefix}.model`` / ``.vocab`` and return the loaded tokenizer. The files are
        written into a temporary directory beside them and renamed into place (``.vocab``
        first, ``.model`` last), so a killed training leaves no partial model.

        Byte fallback is on (any text round-trips), whitespace is kept verbatim
        and no dummy prefix is added, so ``decode(encode(x)) == NFC(x)``.
        ``vocab_size`` must exceed 256 byte pieces + 7 reserved pieces + the
        corpus's distinct characters.  Extra keyword arguments go to the trainer.
        """
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
        out_prefix = Path(out_prefix)
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out_prefix.name}.", dir=out_prefix.parent))
        kwargs = dict(
            sentence_iterator=(nfc(t) for t in texts if t),
            model_prefix=str(work / out_prefix.name),
            vocab_size=int(vocab_size),
            model_type=model_type,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            user_defined_symbols=list(CHAT_SPECIAL_TOKENS),
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
        kwargs.update(trainer_kwargs)
        try:
            spm.SentencePieceTrainer.train(**kwargs)
            for ext in (".vocab", ".model"):
                tmp = work / (out_prefix.name + ext)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, str(out_prefix) + ext)
            fsync_dir(out_prefix.parent)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return cls.load(Path(str(out_prefix) + ".model"))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(self._sp.encode(nfc(text), out_type=int))
        if add_special_tokens:
            ids = [self.bos_id, *ids, self._require(ENDOFTEXT)]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = self._check_ids(ids)
        if skip_special_tokens:
            special = set(self._special.values())
            ids = [t for t in ids if t not in special]
        return self._sp.decode(ids)

    def _require(self, piece: str) -> int:
        if piece not in self._special:
            raise ValueError(f"SentencePiece model {self.path} has no {piece} piece")
        return self._special[piece]

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_ids(self) -> list[int]:
        ids = [self._special[p] for p in (EOS, ENDOFTEXT) if p in self._special]
        if not ids and self._sp.eos_id() >= 0:
            ids = [self._sp.eos_id()]
        return ids

    @property
    def pad_id(self) -> int:
        if PAD in self._special:
            return self._special[PAD]
        if self._sp.pad_id() >= 0:
            return self._sp.pad_id()
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        if STARTOFTEXT in self._special:
            return self._special[STARTOFTEXT]
        if self._sp.bos_id() >= 0:
            return self._sp.bos_id()
        raise ValueError(f"SentencePiece model {self.path} has no {STARTOFTEXT} or bos piece")

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)


# --------------------------------------------------------------------------- dispatch


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Tokenizer for a directory or file.

    A ``*.tiktoken`` file or a directory holding ``hy.tiktoken`` -> ``HunyuanTokenizer``;
    a ``*.model`` file or a directory holding one (``tokenizer.model`` preferred) ->
    ``SentencePieceTokenizer``.  Otherwise ``FileNotFoundError``.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix == ".tiktoken":
            return HunyuanTokenizer.from_dir(path)
        if path.suffix == ".model":
            return SentencePieceTokenizer.load(path)
        raise FileNotFoundError(
            f"{path} is neither a tiktoken vocab (*.tiktoken) nor a SentencePiece model (*.model)"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer path not found: {path}")
    if (path / "hy.tiktoken").is_file():
        return HunyuanTokenizer.from_dir(path)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer.load(path / "tokenizer.model")
    models = sorted(p for p in path.glob("*.model") if p.is_file())
    if len(models) == 1:
        return SentencePieceTokenizer.load(models[0])
    if len(models) > 1:
        raise ValueError(
            f"several SentencePiece models in {path} ({', '.join(p.name for p in models)}); "
            "pass the file itself or name one tokenizer.model"
        )
    raise FileNotFoundError(
        f"no tokenizer in {path}: looked for hy.tiktoken (Hunyuan tiktoken BPE) "
        "and tokenizer.model / *.model (SentencePiece)"
    )
