"""The OpenAI-compatible API's request and response bodies as pydantic models.

FastAPI validates each request against its model and the service's
``/openapi.json`` describes them; a body that breaks a rule gets OpenAI's
error body with ``param`` naming the field (``temperature``,
``messages[0].content``, ``livepp.policies``). Fields livepp cannot honour are
declared so that they are refused by name, never silently ignored. Response
models describe what livepp sends (they are documentation, checked by the
schemathesis test); livepp's additions sit under ``livepp`` keys.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator
from pydantic_core import PydanticCustomError

from livepp.core.params import LiveppError
from livepp.core.policies import parse_policy
from livepp.core.steps import StepSegmenter
from livepp.serve.checks import has_lone_surrogate

__all__ = ["ChatCompletionRequest", "CompletionRequest", "LiveppOptions", "ErrorResponse", "ModelCard", "ModelList",
           "ChatCompletion", "Completion", "TokenizeRequest", "DetokenizeRequest", "MAX_TOP_LOGPROBS"]

MAX_TOP_LOGPROBS = 20


def _text(value: str) -> str:
    if has_lone_surrogate(value):
        raise PydanticCustomError("lone_surrogate", "holds a lone UTF-16 surrogate, which is not text")
    return value


# Every string a client sends: lone surrogates refused where they stand.
Text = Annotated[str, AfterValidator(_text)]


def _policy(spec: str) -> str:
    try:
        parse_policy(spec)
    except LiveppError as exc:
        raise PydanticCustomError("bad_policy", "{why}", {"why": str(exc)}) from None
    return spec


def _step_regex(value: bool | str | None) -> bool | str | None:
    if isinstance(value, str):
        try:
            StepSegmenter(value)
        except LiveppError as exc:
            raise PydanticCustomError("bad_steps", "{why}", {"why": str(exc)}) from None
    return value


def _refused(why: str) -> Any:
    def check(value: Any) -> Any:
        if value not in (None, [], "", {}):
            raise PydanticCustomError("unsupported", "{why} by livepp", {"why": why})
        return value

    return AfterValidator(check)


def _zero(value: float | None) -> float | None:
    if value not in (None, 0):
        raise PydanticCustomError("unsupported", "is not supported by livepp (leave it 0)")
    return value


class _Body(BaseModel):
    # Unknown fields are ignored as OpenAI's own clients expect; NaN and
    # infinity are never numbers here.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class LiveppOptions(BaseModel):
    """What livepp adds to a request (the SDK's ``extra_body={"livepp": {...}}``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    policies: list[Annotated[Text, AfterValidator(_policy)]] = Field(
        default_factory=list, description="Policy specs, e.g. 'early-stop:threshold=8,metric=window_ppl'.")
    window: StrictInt = Field(32, ge=1, le=4096, description="Tokens in the window PPL.")
    steps: Annotated[Union[StrictBool, Text, None], AfterValidator(_step_regex)] = Field(
        None, description="true: cut the reply into reasoning steps; a string: the regex a step ends after.")


class _TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[Text, list[_TextPart], None] = None
    name: Union[Text, None] = None


class _StreamOptions(_Body):
    include_usage: Union[StrictBool, None] = None


class _ResponseFormat(_Body):
    type: Literal["text"]


class _Sampling(_Body):
    """What both endpoints share."""

    model: Text
    temperature: Union[StrictFloat, None] = Field(None, ge=0, description="0 (or below 1e-5) is greedy; default 1.")
    top_p: Union[StrictFloat, None] = Field(None, gt=0, le=1)
    top_k: Union[StrictInt, None] = Field(None, ge=-1, description="An extension (vLLM, llama.cpp); 0 or -1: off.")
    min_p: Union[StrictFloat, None] = Field(None, ge=0, lt=1, description="An extension (vLLM, llama.cpp).")
    seed: Union[StrictInt, None] = Field(None, ge=0, lt=2**63)
    n: Union[StrictInt, None] = Field(None, ge=1)
    stop: Union[Text, list[Text], None] = None
    ignore_eos: Union[StrictBool, None] = Field(None, description="An extension (vLLM): generate past end-of-sequence.")
    stream: Union[StrictBool, None] = None
    stream_options: Union[_StreamOptions, None] = None
    presence_penalty: Annotated[Union[StrictFloat, None], AfterValidator(_zero)] = None
    frequency_penalty: Annotated[Union[StrictFloat, None], AfterValidator(_zero)] = None
    logit_bias: Annotated[Union[dict[str, Any], None], _refused("logit_bias is not supported")] = None
    user: Union[Text, None] = None
    livepp: Union[LiveppOptions, None] = None

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value or []
        if any(not s for s in items):
            raise PydanticCustomError("empty_stop", "stop strings must not be empty")
        return value


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Union[StrictInt, None] = Field(None, ge=1)
    max_completion_tokens: Union[StrictInt, None] = Field(None, ge=1)
    logprobs: Union[StrictBool, None] = None
    top_logprobs: Union[StrictInt, None] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Union[_ResponseFormat, None] = None
    prompt_logprobs: Union[StrictInt, None] = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                                    description="vLLM's: each templated prompt token's logprob and rank, with the top N.")
    tools: Annotated[Any, _refused("tools are not supported")] = None
    tool_choice: Annotated[Any, _refused("tools are not supported")] = None
    functions: Annotated[Any, _refused("functions are not supported")] = None
    function_call: Annotated[Any, _refused("functions are not supported")] = None
    audio: Annotated[Any, _refused("audio is not supported")] = None
    prediction: Annotated[Any, _refused("predicted outputs are not supported")] = None


TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: text (or token ids) continued, or scored
    (``echo`` with ``logprobs``, ``max_tokens`` 0: the prompt's logprobs only)."""

    prompt: Union[Text, Annotated[list[Text], Field(min_length=1)], TokenIds, Annotated[list[TokenIds], Field(min_length=1)]] = Field(
        description="A string, an array of strings, an array of token ids (taken as given: no template, no BOS added), "
                    "or an array of such arrays.")
    max_tokens: Union[StrictInt, None] = Field(None, ge=0, description="0 only with echo or prompt_logprobs: score, generate nothing.")
    logprobs: Union[StrictInt, None] = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                             description="Alternatives per token; each token's own logprob is always there too.")
    echo: Union[StrictBool, None] = Field(None, description="The prompt before the completion, in text and logprobs (first token: null).")
    prompt_logprobs: Union[StrictInt, None] = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                                    description="vLLM's: each prompt token's logprob and rank, with the top N.")
    best_of: Union[StrictInt, None] = Field(None, ge=1, le=1, description="Only 1.")
    suffix: Annotated[Any, _refused("suffix is not supported")] = None


class TokenizeRequest(_Body):
    """``POST /tokenize`` (vLLM's): a prompt or chat messages to token ids."""

    model: Union[Text, None] = None
    prompt: Union[Text, None] = None
    messages: Union[Annotated[list[ChatMessage], Field(min_length=1)], None] = None
    add_special_tokens: StrictBool = Field(True, description="For a prompt: the tokenizer's own special tokens (BOS).")
    add_generation_prompt: StrictBool = Field(True, description="For messages: end with the assistant's turn.")
    return_token_strs: Union[StrictBool, None] = None


class DetokenizeRequest(_Body):
    """``POST /detokenize`` (vLLM's)."""

    model: Union[Text, None] = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


# ---- responses (documentation) ---------------------------------------------------
class _Error(BaseModel):
    message: str
    type: str
    param: Union[str, None]
    code: Union[str, None]


class ErrorResponse(BaseModel):
    error: _Error


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class _Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _TopLogprob(_Open):
    token: str
    logprob: Union[float, None]
    bytes: Union[list[int], None]


class _TokenLogprob(_TopLogprob):
    top_logprobs: list[_TopLogprob]


class _ChatLogprobs(_Open):
    content: Union[list[_TokenLogprob], None]


class _Message(_Open):
    role: Literal["assistant"]
    content: Union[str, None]


class _ChatChoice(_Open):
    index: int
    message: _Message
    logprobs: Union[_ChatLogprobs, None]
    finish_reason: Union[str, None]
    prompt_logprobs: _PromptLogprobs = None
    livepp: dict[str, Any] = Field(description="PPL, mean NLL, tokens, end reason, stopping policy, per-token statistics, events.")


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[_ChatChoice]
    usage: _Usage


class _CompletionLogprobs(_Open):
    tokens: list[str]
    token_logprobs: list[Union[float, None]]
    top_logprobs: list[Union[dict[str, Union[float, None]], None]]
    text_offset: list[int]


class _PromptLogprob(BaseModel):
    logprob: Union[float, None]
    rank: int
    decoded_token: str


_PromptLogprobs = Union[list[Union[dict[str, _PromptLogprob], None]], None]


class _CompletionChoice(_Open):
    index: int
    text: str
    logprobs: Union[_CompletionLogprobs, None]
    finish_reason: Union[str, None]
    prompt_logprobs: _PromptLogprobs = None
    livepp: dict[str, Any]


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[_CompletionChoice]
    usage: _Usage
