"""Request bodies of the OpenAI (and vLLM tokenizer) endpoints as pydantic models: types and
ranges are checked here, before anything reaches the engine (a violation is a 400 with OpenAI's
error body naming the field, see `guard.decode_body`); unknown fields are ignored, as vLLM
does, but fields of features this server does not have (`n` > 1, `best_of` > 1, presence /
frequency penalties, `logit_bias`, `suffix`, `min_p`, `min_tokens`, tools, a JSON
`response_format`) are refused when set rather than silently ignored.

Ranges (every float must also be finite: NaN and +-Infinity are refused):

| field | range | note |
|---|---|---|
| temperature | [0, 1e6] | below 1e-5 is greedy (as vLLM) |
| top_p | (0, 1] | |
| top_k | [-1, 2^31 - 1] | -1 or 0 = off; >= the vocabulary = off |
| repetition_penalty | [1e-6, 1e6] | 1 = off; the bounds keep logits finite in float32 |
| seed | [-2^63, 2^64 - 1] | |
| max_tokens | >= 0 (chat: >= 1) | prompt + max_tokens <= --max-len (checked with the prompt) |
| logprobs, top_logprobs | [0, 20] | |
| stop | <= 64 strings of <= 1024 characters | |
| prompt token ids | [0, vocabulary) | checked with the prompt |
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt

from hunyuan_jax.engine.core import TOP_LOGPROBS

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
MAX_STOPS, MAX_STOP_CHARS = 64, 1024
GREEDY_BELOW = 1e-5  # temperatures under this are greedy (vLLM's _SAMPLING_EPS)
TEMPERATURE_MAX = 1e6
PENALTY_MIN, PENALTY_MAX = 1e-6, 1e6  # keep logits * or / the penalty finite in float32


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


_Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


def _only(off):
    """A field of a feature this server does not have: accepted only unset or `off`."""

    def check(value):
        if value is not None and value != off:
            raise ValueError(f"not supported by this server (leave it out or send {off!r})")
        return value

    return AfterValidator(check)


class SamplingFields(_Body):
    model: str
    temperature: float | None = Field(None, ge=0.0, le=TEMPERATURE_MAX)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    repetition_penalty: float | None = Field(None, ge=PENALTY_MIN, le=PENALTY_MAX)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: _Stop | Annotated[list[_Stop], Field(max_length=MAX_STOPS)] | None = None
    ignore_eos: bool = False  # vLLM's extension
    skip_special_tokens: bool = True  # vLLM's extension: special tokens left out of the text
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int | None, _only(1)] = None
    presence_penalty: Annotated[float | None, _only(0.0)] = None
    frequency_penalty: Annotated[float | None, _only(0.0)] = None
    logit_bias: Annotated[dict[str, float] | None, _only({})] = None
    min_p: Annotated[float | None, _only(0.0)] = None
    min_tokens: Annotated[int | None, _only(0)] = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]  # ids: no true, no 1.0
    max_tokens: int | None = Field(16, ge=0, le=INT64_MAX)
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    echo: bool | None = False
    best_of: Annotated[int | None, _only(1)] = None
    suffix: Annotated[str | None, _only("")] = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ResponseFormat(_Body):
    type: Literal["text"]


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    tools: Annotated[list[Any] | None, _only([])] = None
    response_format: ResponseFormat | None = None


class TokenizeRequest(_Body):
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(_Body):
    tokens: list[StrictInt]
