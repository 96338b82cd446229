"""The Hunyuan tokenizer's special tokens and pre-tokenisation pattern (SPEC section 4):
the one place their strings and ids are spelled."""

from __future__ import annotations

import unicodedata

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
DEFAULT_EOS_IDS = [SPECIAL_TOKENS[EOS], SPECIAL_TOKENS["<|extra_5|>"]]  # [127960, 127967]
DEFAULT_PAD_ID = SPECIAL_TOKENS[PAD]  # 127961


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)
