"""The tokenizer interface every tokenizer of hunyuan_jax implements (`Tokenizer`): encoding
with NFC and special tokens, plain-text encoding of untrusted content, chat rendering, decoding
and id checks. The implementations (tiktoken BPE, SentencePiece) and `load_tokenizer` are in
`data.tokenizer`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence

from hunyuan_jax.data.chat_template import (
    encode_chat_plain,
    render_chat,
    render_chat_template,
    split_special,
)
from hunyuan_jax.data.special_tokens import (
    EOS,
    EXTRA_0,
    EXTRA_4,
    STARTOFTEXT,
)
from hunyuan_jax.errors import DataError

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
        import jinja2  # only a checkpoint's own chat template needs it (not a dependency)

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
        content_as_text: bool = False,
    ) -> list[int]:
        """Ids of ``messages`` in this tokenizer's chat format: ``encode(render_chat(...))``,
        i.e. Hugging Face's ``apply_chat_template(messages, tokenize=True)`` (the rendered text
        is encoded without added special tokens).  The Hunyuan template and the fallback layout
        ignore ``add_generation_prompt``: a user turn already ends with the assistant cue
        ``<|extra_0|>``.  ``content_as_text``: special-token text inside a message's content
        (``<|eos|>``, turn markers) is encoded as plain text, never as control ids; only the
        template's own markers are special (the server: a client cannot forge turns).
        ``ValueError`` when that cannot be done (a template that rewrites such content)."""
        text = self.render_chat(messages, add_generation_prompt, system_prompt)
        if content_as_text:
            return encode_chat_plain(self, messages, add_generation_prompt, system_prompt, text)
        return self.encode(text)

    def encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` as plain text: special-token strings in it become ordinary tokens
        (it is cut right after the first character of each, so none is matched whole)."""
        ids: list[int] = []
        for piece in split_special(text, self.special_tokens):
            ids += self.encode(piece)
        return ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        n = self.vocab_size
        out = []
        for t in ids:
            t = int(t)
            if not 0 <= t < n:
                raise ValueError(f"token id {t} is out of range for vocab_size {n}")
            out.append(t)
        return out
