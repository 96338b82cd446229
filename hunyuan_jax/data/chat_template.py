"""Chat rendering: Hugging Face's jinja chat templates (``render_chat_template``, rendered
exactly as ``apply_chat_template`` does) and the hand port of the Hunyuan-Large Instruct layout
(``render_chat``) for tokenizers without a template; reading a ``tokenizer_config.json``'s template
and special-token map; encoding a chat with its message content as plain text
(``encode_chat_plain``: special-token text a client writes never becomes a control token)."""

from __future__ import annotations

import datetime
import functools
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from hunyuan_jax.data.special_tokens import EOS, EXTRA_0, EXTRA_4, STARTOFTEXT
from hunyuan_jax.errors import ConfigError, DataError

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
    # jinja2 is not a dependency: only a checkpoint's own chat template needs it.
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


def read_tokenizer_config(path: Path) -> tuple[str | None, dict[str, object]]:
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
        import jinja2  # not a dependency (see _jinja_env)

        try:
            compile_chat_template(template)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"{path}: chat_template line {e.lineno}: {e.message}") from e
    tokens = {k: _token_content(cfg[k]) for k in _SPECIAL_TOKEN_KEYS if cfg.get(k) is not None}
    return template, tokens


# --------------------------------------------------------------------------- interface


# --------------------------------------------------------------------------- plain content


def split_special(text: str, specials: Iterable[str]) -> list[str]:
    """``text`` cut right after the first character of every occurrence of a special-token
    string, so that no piece holds one whole (the pieces join back to ``text``)."""
    found = [s for s in specials if s and s in text]
    if not found:
        return [text]
    cuts = set()
    for s in found:
        i = text.find(s)
        while i >= 0:
            cuts.add(i + 1)
            i = text.find(s, i + 1)
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def encode_chat_plain(tok, messages, add_generation_prompt, system_prompt, rendered: str):
    """Ids of the chat ``rendered`` (``tok.render_chat(messages, ...)``) with every message
    content that holds special-token text encoded as plain text (``tok.encode_text``) and the
    rest, the template's own markers, as ``tok.encode`` does. Without such content: exactly
    ``tok.encode(rendered)``.

    Each such content is replaced by a unique marker, the chat rendered again and cut at the
    markers; the contents must come back verbatim (``ValueError`` for a template that rewrites
    them, e.g. strips or escapes them: their plain encoding would then be a guess)."""
    specials = tuple(s for s in tok.special_tokens if s)
    nonce = secrets.token_hex(8)
    originals: dict[str, str] = {}

    def mark(content):
        if not isinstance(content, str) or not any(s in content for s in specials):
            return content
        key = f"\ue000{nonce}.{len(originals)}\ue001"
        originals[key] = content
        return key

    msgs = [
        {**m, "content": mark(m["content"])} if isinstance(m, Mapping) and "content" in m else m
        for m in messages
    ]
    system = mark(system_prompt)
    if not originals:
        return tok.encode(rendered)
    marked = tok.render_chat(msgs, add_generation_prompt, system)
    parts = re.split(f"(\ue000{nonce}\\.\\d+\ue001)", marked)
    if "".join(originals.get(p, p) for p in parts) != rendered:
        raise ValueError(
            "the chat template does not pass message content through verbatim, so content "
            "holding special-token text cannot be encoded as plain text; remove that text"
        )
    ids: list[int] = []
    for p in parts:
        if p in originals:
            ids += tok.encode_text(originals[p])
        elif p:
            ids += tok.encode(p)
    return ids
