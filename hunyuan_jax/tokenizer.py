"""Text <-> token ids for hunyuan_jax.

This module owns tokenisation: the common ``Tokenizer`` interface, the original
Hunyuan tiktoken BPE (``HunyuanTokenizer``, SPEC section 4), a SentencePiece
tokenizer that can be trained on a small corpus (``SentencePieceTokenizer``),
chat rendering, and ``load_tokenizer`` which picks the right one for a directory or file.

Chat: a tokenizer whose ``tokenizer_config.json`` has a ``chat_template`` renders conversations
with it exactly as Hugging Face's ``apply_chat_template`` does (``render_chat_template``); one
without (e.g. the SentencePiece model the smoke run trains) uses ``render_chat``, a hand port of
the Hunyuan-Large Instruct template.
"""

from __future__ import annotations

import abc
import base64
import functools
import json
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from hunyuan_jax.errors import CheckpointError, ConfigError, DataError

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

# --------------------------------------------------------------------------- constants

PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|"""
    r"""[^\r\n\p{L}\p{N}]?\p{L}+|"""
    r"""\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|"""
    r"""\s+(?!\S)|"""
    r"""\s+"""
)

ENDOFTEXT = "<|endoftext|>"
STARTOFTEXT = "<|startoftext|>"
BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
EXTRA_0 = "<|extra_0|>"  # ends a user turn (the assistant cue)
EXTRA_4 = "<|extra_4|>"  # ends the system turn

SPECIAL_START_ID = 127957
_SPECIAL_NAMES: tuple[str, ...] = (ENDOFTEXT, STARTOFTEXT, BOS, EOS, PAD) + tuple(
    f"<|extra_{i}|>" for i in range(204)
)
#: Hunyuan special tokens -> ids (127957 .. 128165).
SPECIAL_TOKENS: dict[str, int] = {
    name: SPECIAL_START_ID + i for i, name in enumerate(_SPECIAL_NAMES)
}

#: Pieces a tokenizer must have for the Hunyuan chat layout / document wrapping.
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (STARTOFTEXT, ENDOFTEXT, EOS, PAD, EXTRA_0, EXTRA_4)

#: SPEC 4 names this default; the reference chat template does NOT insert it, so
#: ``apply_chat_template`` only uses it when asked (``system_prompt=...``).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# SPEC 4 generation defaults (used when no generation_config.json is found).
_DEFAULT_EOS_IDS = [SPECIAL_TOKENS[EOS], SPECIAL_TOKENS["<|extra_5|>"]]  # [127960, 127967]
_DEFAULT_PAD_ID = SPECIAL_TOKENS[PAD]  # 127961


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# --------------------------------------------------------------------------- chat layout


def render_chat(messages: Sequence[Mapping[str, str]], system_prompt: str | None = None) -> str:
    """Render ``messages`` in the Hunyuan-Large Instruct chat layout, without jinja.

    The fallback for tokenizers that have no ``chat_template`` (a tokenizer that has one renders
    with ``render_chat_template``).  A line-for-line port of the jinja ``chat_template`` in the
    released tokenizer_config.json:

    * message 0: empty content -> emits nothing and marks "no head";
      a system message -> ``<|startoftext|>{sys}<|extra_4|>``.
    * user: at index 1 after a head -> ``{text}<|extra_0|>``; at index 1 without a head
      -> ``<|startoftext|><|startoftext|>{text}<|extra_0|>`` (template quirk, kept);
      otherwise ``<|startoftext|>{text}<|extra_0|>``.
    * assistant: ``{text}<|eos|>``.  Any other message is emitted raw.

    One difference: a first message with empty content.  Here it renders as above; Hugging Face
    renders the template in an immutable sandbox, where the template's ``context.update(...)``
    is refused, so ``apply_chat_template`` raises (jinja2 ``SecurityError``) for it.

    The template has no generation suffix: a prompt already ends with the user
    turn's ``<|extra_0|>``.  ``system_prompt`` (e.g. ``DEFAULT_SYSTEM_PROMPT``) is
    prepended as a system message when given and the conversation has none first.
    """
    msgs = list(messages)
    if system_prompt is not None and (not msgs or msgs[0].get("role") != "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    has_head = True
    out: list[str] = []
    for i, message in enumerate(msgs):
        try:
            role, content = message["role"], message["content"]
        except (KeyError, TypeError) as e:
            raise DataError(
                f"chat message {i} must be a mapping with 'role' and 'content', got {message!r}"
            ) from e
        if not isinstance(content, str):
            raise DataError(f"chat message {i}: content must be str, got {type(content).__name__}")
        if i == 0:
            if content == "":
                has_head = False
            elif role == "system":
                content = STARTOFTEXT + content + EXTRA_4
        if role == "user":
            if i == 1 and not has_head:
                content = STARTOFTEXT + content
            if i == 1 and has_head:
                content = content + EXTRA_0
            else:
                content = STARTOFTEXT + content + EXTRA_0
        elif role == "assistant":
            content = content + EOS
        out.append(content)
    return "".join(out)


# --------------------------------------------------------------------------- jinja chat template


def _jinja_env():
    """The jinja environment Hugging Face renders chat templates in (transformers
    ``chat_template_utils._compile_jinja_template``): immutable sandbox, ``trim_blocks`` and
    ``lstrip_blocks``, the ``loopcontrols`` extension and a ``{% generation %}`` block tag
    (rendered as its body), ``tojson`` without HTML escaping, and the globals
    ``raise_exception`` and ``strftime_now``."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        # HF's AssistantTracker outside ``return_assistant_tokens_mask``: the body, unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


@functools.lru_cache(maxsize=8)
def compile_chat_template(template: str):
    """The compiled jinja ``Template`` of a chat template (cached).  Raises
    ``jinja2.TemplateSyntaxError`` for a template that does not parse."""
    return _jinja_env().from_string(template)


def render_chat_template(
    template: str,
    messages: Sequence[Mapping],
    add_generation_prompt: bool = False,
    special_tokens_map: Mapping[str, object] | None = None,
    **kwargs,
) -> str:
    """Render ``messages`` with the jinja chat ``template`` as Hugging Face's
    ``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` does.

    The template sees ``messages``, ``tools=None``, ``documents=None``,
    ``add_generation_prompt``, the tokenizer's special-token map (``bos_token``, ``eos_token``,
    ``pad_token``, ``additional_special_tokens`` ...) and ``kwargs`` (which win over the map).
    Messages are passed as given (no validation: the template decides).  Errors raised while
    rendering (``raise_exception``, sandbox refusals, undefined values) are jinja2
    ``TemplateError``s.
    """
    return compile_chat_template(template).render(
        messages=list(messages),
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **{**dict(special_tokens_map or {}), **kwargs},
    )


_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)


def _token_content(value):
    # tokenizer_config.json spells a token as a string or an AddedToken dict {"content": ...}.
    if isinstance(value, Mapping):
        return value.get("content")
    if isinstance(value, list):
        return [_token_content(v) for v in value]
    return value


def _read_tokenizer_config(path: Path) -> tuple[str | None, dict[str, object]]:
    """(chat_template or None, special-token map overrides) of a tokenizer_config.json.

    A template that does not parse is a ``ConfigError`` naming the file.  A list of named
    templates (HF's format for several) yields the one named "default".
    """
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read tokenizer config: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        if "default" not in named:
            raise ConfigError(
                f"{path}: chat_template lists the templates {sorted(map(str, named))} "
                "but none named 'default'"
            )
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{path}: chat_template must be a string, got {type(template).__name__}")
    if template is not None:
        import jinja2

        try:
            compile_chat_template(template)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"{path}: chat_template line {e.lineno}: {e.message}") from e
    tokens = {k: _token_content(cfg[k]) for k in _SPECIAL_TOKEN_KEYS if cfg.get(k) is not None}
    return template, tokens


# --------------------------------------------------------------------------- interface


class Tokenizer(abc.ABC):
    """Common tokenizer interface used by the rest of hunyuan_jax.

    Encoding applies Unicode NFC; special-token strings that the tokenizer knows
    (e.g. ``<|eos|>``) inside text are encoded as their special ids.
    """

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids; ``add_special_tokens`` wraps as ``<|startoftext|> ... <|endoftext|>``."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text.  Raises ValueError for an id outside ``[0, vocab_size)``."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @property
    @abc.abstractmethod
    def eos_ids(self) -> list[int]:
        """Ids that end generation."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Padding id."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int:
        """Id that starts a document (``<|startoftext|>``)."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Special-token string -> id, for those this tokenizer has."""

    #: The jinja chat template (tokenizer_config.json's ``chat_template``), or None: then chats
    #: are rendered by ``render_chat``.  ``chat_template_source`` names where it came from.
    chat_template: str | None = None
    chat_template_source: str | None = None

    @property
    def special_tokens_map(self) -> dict[str, object]:
        """What Hugging Face's ``special_tokens_map`` holds (``bos_token``, ``eos_token``,
        ``pad_token``, ``additional_special_tokens`` ...): variables a chat template may read."""
        return {}

    def render_chat(
        self,
        messages: Sequence[Mapping],
        add_generation_prompt: bool = True,
        system_prompt: str | None = None,
    ) -> str:
        """The text of ``messages`` in this tokenizer's chat format.

        With a ``chat_template``: rendered as Hugging Face's ``apply_chat_template`` renders it
        (``render_chat_template``); a rendering error is a ``DataError``.  Without one: the
        hand-written Hunyuan layout (module-level ``render_chat``), which needs the chat special
        tokens (``ValueError`` if the tokenizer lacks them) and has no generation suffix.
        ``system_prompt`` (e.g. ``DEFAULT_SYSTEM_PROMPT``) is prepended as a system message when
        given and the conversation does not start with one.
        """
        msgs = list(messages)
        if system_prompt is not None and not (
            msgs and isinstance(msgs[0], Mapping) and msgs[0].get("role") == "system"
        ):
            msgs.insert(0, {"role": "system", "content": system_prompt})
        if self.chat_template is None:
            missing = [
                t for t in (STARTOFTEXT, EXTRA_0, EXTRA_4, EOS) if t not in self.special_tokens
            ]
            if missing:
                raise ValueError(
                    f"{type(self).__name__} has no chat_template and lacks the chat special "
                    f"tokens {missing}; the Hunyuan chat layout cannot be rendered with it"
                )
            return render_chat(msgs)
        import jinja2

        try:
            return render_chat_template(
                self.chat_template, msgs, add_generation_prompt, self.special_tokens_map
            )
        except jinja2.TemplateError as e:
            where = self.chat_template_source or "the tokenizer's chat_template"
            raise DataError(
                f"chat template of {where} cannot render this conversation: {type(e).__name__}: {e}"
            ) from e

    def apply_chat_template(
        self,
        messages: Sequence[Mapping],
        add_generation_prompt: bool = True,
        system_prompt: str | None = None,
    ) -> list[int]:
        """Ids of ``messages`` in this tokenizer's chat format: ``encode(render_chat(...))``,
        i.e. Hugging Face's ``apply_chat_template(messages, tokenize=True)`` (the rendered text
        is encoded without added special tokens).  The Hunyuan template and the fallback layout
        ignore ``add_generation_prompt``: a user turn already ends with the assistant cue
        ``<|extra_0|>``."""
        return self.encode(self.render_chat(messages, add_generation_prompt, system_prompt))

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        n = self.vocab_size
        out = []
        for t in ids:
            t = int(t)
            if not 0 <= t < n:
                raise ValueError(f"token id {t} is out of range for vocab_size {n}")
            out.append(t)
        return out


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
        import tiktoken

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
        self._eos_ids = list(eos_ids) if eos_ids is not None else list(_DEFAULT_EOS_IDS)
        self._pad_id = int(pad_id) if pad_id is not None else _DEFAULT_PAD_ID
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
            template, tokens = _read_tokenizer_config(tok_cfg)
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
        ids = self._enc.encode(_nfc(text), allowed_special="all", disallowed_special=())
        if add_special_tokens:
            ids = [SPECIAL_TOKENS[STARTOFTEXT], *ids, SPECIAL_TOKENS[ENDOFTEXT]]
        return ids

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
        import sentencepiece as spm

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
        import os
        import shutil
        import tempfile

        import sentencepiece as spm

        from hunyuan_jax.atomic import fsync_dir

        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
        out_prefix = Path(out_prefix)
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out_prefix.name}.", dir=out_prefix.parent))
        kwargs = dict(
            sentence_iterator=(_nfc(t) for t in texts if t),
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
        ids = list(self._sp.encode(_nfc(text), out_type=int))
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
