"""The engine protocol: what turns a prompt into token streams.

An :class:`Engine` opens a :class:`~livepp.core.stream.TokenStream` from a
prompt (text, or chat messages) and generation parameters, and a
:class:`~livepp.core.stream.BatchTokenStream` from many. Routing, DeepConf,
the service, the command line and the Python API all talk to this protocol,
so they run the same on the local torch engine, a remote OpenAI-compatible
endpoint, or a scripted engine in a test.

``kind`` names the engine in every ``start`` event. ``serial`` says whether one thread at a time must drive the engine (a local
model: the service puts every step of it through one runner) or whether
streams are independent (a remote endpoint schedules its own requests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence, Union

from livepp.core.params import GenerationParams, LiveppError
from livepp.core.stream import BatchTokenStream, TokenStream

__all__ = ["Prompt", "Engine", "ScoreSpec", "is_token_ids", "check_prompt", "chat_messages"]

# A prompt is text (a user message for chat models, unless params.raw) or a
# list of chat messages ({"role": ..., "content": ...}).
Prompt = Union[str, Sequence[Mapping[str, str]]]

_ROLES = ("system", "user", "assistant", "developer", "tool")


class Engine(Protocol):
    name: str  # the model's name
    kind: str  # the engine's: "torch", "llama.cpp", "openai", ...
    serial: bool

    def open(self, prompt: Prompt, params: GenerationParams) -> TokenStream: ...

    def open_batch(self, prompts: Sequence[Prompt], params: Sequence[GenerationParams]) -> BatchTokenStream: ...


def check_prompt(prompt: Prompt) -> Prompt:
    """The prompt if it is usable, else a :class:`LiveppError` saying why."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise LiveppError("the prompt is empty")
        return prompt
    chat_messages(prompt)
    return prompt


def chat_messages(prompt: Prompt) -> list[dict[str, str]]:
    """The prompt as chat messages: text becomes one user message."""
    if isinstance(prompt, str):
        check_prompt(prompt)
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise LiveppError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(prompt):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LiveppError(f"message {i} must be an object with string \"role\" and \"content\", got {m!r}")
        if m["role"] not in _ROLES:
            raise LiveppError(f"message {i} has role {m['role']!r}; roles are {', '.join(_ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in out):
        raise LiveppError("the messages are all empty")
    return out


@dataclass(frozen=True)
class ScoreSpec:
    """Score a row's prompt as it is prefilled: positions ``first`` onward,
    each with ``top`` alternatives; then generate (``generate``) or stop."""

    first: int = 1
    top: int = 0
    generate: bool = True
    entropy: bool = True  # each position's entropy (None when off: the OpenAI shapes carry none)
    rank: bool = True  # each position's rank in the vocabulary (0 when off: only vLLM's prompt_logprobs carry it)


def is_token_ids(prompt: Any) -> bool:
    """A prompt given as token ids (scored and decoded as given: no template, no BOS added)."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
