"""The OpenAI API's request and response shapes, and livepp's namespaced additions.

:func:`parse_request` turns a validated ``/v1/chat/completions`` or
``/v1/completions`` body (:mod:`livepp.serve.openai_models`) into a
:class:`ParsedRequest` (or an :class:`OpenAIError` naming the bad parameter); :class:`ChoiceBuilder` turns one choice's monitor events into
OpenAI chunks (streaming) or one choice object (not streaming). What livepp
adds sits under ``livepp`` keys, which OpenAI clients carry through untouched:

* request: ``livepp: {"policies": [SPEC, ...], "window": 32, "steps": true|REGEX}``
  (the SDK's ``extra_body``);
* each token's chunk: ``choices[i].livepp`` = that token's statistics
  (``index, token_id, logprob, entropy, varentropy, ppl, window_ppl, mean_nll,
  confidence, group_confidence, surprise_z``, and through a gateway
  ``entropy_bounds`` and ``tail_mass``), exactly the ``token`` event of
  ``livepp generate --json``;
* a policy or step event: a chunk with an empty delta and ``livepp.event``;
* the last chunk of a choice: ``livepp: {"ppl", "mean_nll", "n_tokens", "reason",
  "policy", "stop_reason"}``: ``reason`` is livepp's end reason, ``policy`` the
  stopping policy's event (or null) and ``stop_reason`` the stopping policy's
  name, else the end reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from livepp.core.events import EndEvent, Event, PolicyEvent, StepEvent, TokenEvent, json_safe, to_json_dict
from livepp.core.params import GenerationParams, LiveppError
from livepp.core.steps import step_rule
from livepp.engines.protocol import Prompt, chat_messages
from livepp.serve.openai_models import ChatCompletionRequest, ChatMessage, CompletionRequest, LiveppOptions
from livepp.serve.openai_scoring import ScoredPrompt, echo_logprobs, vllm_prompt_logprobs

__all__ = ["OpenAIError", "ParsedRequest", "parse_request", "ChoiceBuilder", "ContentGate", "finish_reason_of", "usage"]

TOKEN_STATS = ("index", "token_id", "logprob", "entropy", "varentropy", "ppl", "window_ppl", "mean_nll",
               "confidence", "group_confidence", "surprise_z")


class OpenAIError(Exception):
    """An error in OpenAI's schema: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


@dataclass
class ParsedRequest:
    """A /v1 request, checked, as livepp runs it."""

    kind: str  # "chat" or "completions"
    model: str
    prompts: list[Prompt]
    params: GenerationParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False  # whether the client asked for logprobs
    top_logprobs: int = 0
    policies: list[str] = field(default_factory=list)
    window: int = 32
    steps: str | None = None
    echo: bool = False
    prompt_logprobs: int | None = None  # vLLM's
    generate: bool = True  # False: max_tokens 0, the prompt is only scored

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompt's tokens are scored (echo with logprobs, or prompt_logprobs)."""
        return (self.echo and self.logprobs) or self.prompt_logprobs is not None

    @property
    def prompt_top(self) -> int:
        """Alternatives each scored prompt position needs."""
        return max(self.top_logprobs if self.echo and self.logprobs else 0, self.prompt_logprobs or 0)


def chat_prompt(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Chat messages with text content (a string, or a list of text parts)."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    try:
        return chat_messages(out)
    except LiveppError as exc:
        raise _bad(str(exc), "messages") from None


def parse_request(kind: str, body: ChatCompletionRequest | CompletionRequest, *, models: tuple[str, ...], default_max_tokens: int,
                  max_n: int, max_step_regex: int | None = None) -> ParsedRequest:
    """A validated body (see :mod:`livepp.serve.openai_models`) as livepp runs
    it; ``models`` are the names this server answers to."""
    if body.model not in models:
        raise OpenAIError(404, f"The model '{body.model}' does not exist; this server serves {', '.join(repr(m) for m in models[:1])}",
                          param="model", code="model_not_found")
    if isinstance(body, ChatCompletionRequest):
        prompts: list[Prompt] = [chat_prompt(body.messages)]
        logprobs = bool(body.logprobs)
        if body.top_logprobs and not logprobs:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        top_logprobs = body.top_logprobs or 0
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    else:
        prompt = body.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if any(isinstance(p, str) and not p.strip() for p in prompts):
            raise _bad("prompt must not be empty", "prompt")
        logprobs, top_logprobs = body.logprobs is not None, body.logprobs or 0
        max_tokens = body.max_tokens
    echo = bool(getattr(body, "echo", False))
    if max_tokens == 0 and not (echo or body.prompt_logprobs is not None):
        raise _bad("max_tokens 0 generates nothing: give echo or prompt_logprobs to score the prompt", "max_tokens")
    n = body.n or 1
    if n > max_n or len(prompts) * n > max_n:
        raise _bad(f"at most {max_n} choices per request (prompts x n)", "n")
    extra = body.livepp or LiveppOptions()
    try:
        steps = step_rule(extra.steps, max_length=max_step_regex)
    except LiveppError as exc:
        raise _bad(str(exc), "livepp.steps") from None
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        params = GenerationParams(
            max_new_tokens=max_tokens or (1 if max_tokens == 0 else default_max_tokens),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),  # -1 is vLLM's "off"
            min_p=body.min_p or 0.0,
            seed=body.seed,
            stop=tuple(stop),
            ignore_eos=bool(body.ignore_eos),
            top_logprobs=top_logprobs,
            raw=kind == "completions",
        )
    except LiveppError as exc:
        raise _bad(str(exc)) from None
    return ParsedRequest(kind=kind, model=body.model, prompts=prompts, params=params, n=n, stream=bool(body.stream),
                         include_usage=bool(body.stream_options and body.stream_options.include_usage), logprobs=logprobs,
                         top_logprobs=top_logprobs, policies=list(extra.policies), window=extra.window, steps=steps,
                         echo=echo, prompt_logprobs=body.prompt_logprobs, generate=max_tokens != 0)


class ContentGate:
    """A choice's text as the client may see it: it never contains a stop
    string (OpenAI cuts the text before it), so text that could be the start
    of one is held back until the next token says whether it is."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""
        self.cut = False

    def feed(self, text: str) -> str:
        if self.cut:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        hits = [buf.find(s) for s in self.stops if s in buf]
        if hits:
            self.cut, self.held = True, ""
            return buf[: min(hits)]
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        rest, self.held = self.held, ""
        return "" if self.cut else rest


def finish_reason_of(reason: str) -> str:
    """OpenAI's finish reason for livepp's end reason."""
    if reason in ("eos", "stop_string", "policy"):
        return "stop"
    if reason == "length":
        return "length"
    return "abort"  # cancelled, shutdown (vLLM's word for a request ended from outside)


def _token_entry(event: TokenEvent, top: int) -> dict[str, Any]:
    return {"token": event.text, "logprob": event.logprob, "bytes": list(event.text.encode("utf-8")),
            "top_logprobs": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode("utf-8"))}
                             for t in event.top_logprobs[:top]]}


def token_stats(event: TokenEvent) -> dict[str, Any]:
    stats = {name: getattr(event, name) for name in TOKEN_STATS}
    if event.entropy_bounds is not None:  # a gateway's token: the entropy is unknown, bounded
        stats["entropy_bounds"], stats["tail_mass"] = event.entropy_bounds, event.tail_mass
    if event.injected:  # text an inject policy appended
        stats["injected"] = True
    return stats  # written by orjson, which writes NaN and infinity as null


class ChoiceBuilder:
    """One choice's events as OpenAI chunks (or, at the end, one choice)."""

    def __init__(self, index: int, request: ParsedRequest) -> None:
        self.index, self.request = index, request
        self.kind = request.kind
        self.gate = ContentGate(request.params.stop)
        self.text = ""
        self.offset = 0
        # What only a whole (non-streamed) answer carries is kept only for one: a stream's memory stays flat.
        self.keep = not request.stream
        self.n_tokens = 0
        self.tokens: list[dict[str, Any]] = []  # livepp stats per token
        self.entries: list[dict[str, Any]] = []  # chat logprobs entries
        self.completion_logprobs: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.events: list[dict[str, Any]] = []
        self.stopping_policy: dict[str, Any] | None = None
        self.prompt_tokens = 0
        self.end: EndEvent | None = None
        self.prompt: ScoredPrompt | None = None

    # ---- streaming pieces: each returns the choice part of one chunk, or None
    def on_event(self, event: Event | ScoredPrompt) -> dict[str, Any] | None:
        if isinstance(event, ScoredPrompt):
            return self._prompt(event)
        if isinstance(event, TokenEvent):
            return self._token(event)
        if isinstance(event, (PolicyEvent, StepEvent)):
            data = to_json_dict(event)
            if isinstance(event, PolicyEvent) and event.action == "stop":
                self.stopping_policy = data
            self.events.append(data)
            return self._part("", None, {"event": json_safe(data)})
        if isinstance(event, EndEvent):
            self.end = event
            return self._part(self.gate.flush(), None, None, finish=True)
        if getattr(event, "type", None) == "start":
            self.prompt_tokens = len(event.prompt_token_ids)  # type: ignore[union-attr]
        return None

    def _prompt(self, prompt: ScoredPrompt) -> dict[str, Any]:
        """The prompt, scored: echoed first (text and logprobs), and vLLM's prompt_logprobs."""
        self.prompt = prompt
        req = self.request
        logprobs = None
        if req.echo and req.logprobs:
            logprobs = echo_logprobs(prompt, req.top_logprobs)
            if self.keep:
                for key, values in logprobs.items():
                    self.completion_logprobs[key].extend(values)
        self.offset = len(prompt.text) if req.echo else 0
        part = self._part(prompt.text if req.echo else "", logprobs, None)
        if req.prompt_logprobs is not None:
            part["prompt_logprobs"] = vllm_prompt_logprobs(prompt, req.prompt_logprobs)
        return part

    def _token(self, event: TokenEvent) -> dict[str, Any]:
        text = self.gate.feed(event.text)
        stats = token_stats(event)
        self.n_tokens += 1
        if self.keep:
            self.tokens.append(stats)
        logprobs = None
        if self.request.logprobs:
            if self.kind == "chat":
                entry = _token_entry(event, self.request.top_logprobs)
                if self.keep:
                    self.entries.append(entry)
                logprobs = {"content": [entry]}
            else:
                top = {}
                for t in event.top_logprobs[: self.request.top_logprobs]:
                    top.setdefault(t.text, t.logprob)
                # The token itself is always there (OpenAI: up to K + 1 entries).
                own = next((t.text for t in event.top_logprobs if t.token_id == event.token_id), event.text)
                top.setdefault(own, event.logprob)
                piece = {"tokens": [event.text], "token_logprobs": [event.logprob], "top_logprobs": [top],
                         "text_offset": [self.offset]}
                if self.keep:
                    for key, values in piece.items():
                        self.completion_logprobs[key].extend(values)
                logprobs = piece
        self.offset += len(event.text)
        return self._part(text, logprobs, stats)

    def _part(self, text: str, logprobs: Any, extra: dict[str, Any] | None, *, finish: bool = False) -> dict[str, Any]:
        self.text += text
        part: dict[str, Any] = {"index": self.index}
        if self.kind == "chat":
            part["delta"] = {"content": text} if text or not finish else {}
        else:
            part["text"] = text
        part["logprobs"] = logprobs
        part["finish_reason"] = finish_reason_of(self.end.reason) if finish and self.end is not None else None
        part["livepp"] = self.summary() if finish else extra
        return part

    def summary(self) -> dict[str, Any]:
        end = self.end
        assert end is not None
        stop_reason = self.stopping_policy["policy"] if end.reason == "policy" and self.stopping_policy else end.reason
        out = {"ppl": end.ppl, "mean_nll": end.mean_nll, "n_tokens": end.n_tokens, "reason": end.reason,
               "policy": self.stopping_policy if end.reason == "policy" else None, "stop_reason": stop_reason}
        if self.prompt is not None and self.prompt.path:
            out["scoring_path"] = self.prompt.path  # which llama.cpp path scored the prompt
        return json_safe(out)

    # ---- the whole choice, for a non-streaming reply
    def choice(self) -> dict[str, Any]:
        livepp = self.summary() | {"tokens": self.tokens, "events": json_safe(self.events)}
        if self.kind == "chat":
            chat = {"index": self.index, "message": {"role": "assistant", "content": self.text},
                    "logprobs": {"content": self.entries} if self.request.logprobs else None,
                    "finish_reason": finish_reason_of(self.end.reason) if self.end else None, "livepp": livepp}
            if self.request.prompt_logprobs is not None:
                chat["prompt_logprobs"] = vllm_prompt_logprobs(self.prompt, self.request.prompt_logprobs) if self.prompt else None
            return chat
        out = {"index": self.index, "text": self.text,
               "logprobs": self.completion_logprobs if self.request.logprobs else None,
               "finish_reason": finish_reason_of(self.end.reason) if self.end else None, "livepp": livepp}
        if self.request.prompt_logprobs is not None:
            out["prompt_logprobs"] = vllm_prompt_logprobs(self.prompt, self.request.prompt_logprobs) if self.prompt else None
        return out


def usage(choices: list[ChoiceBuilder], n: int) -> dict[str, int]:
    """Prompt tokens count each prompt once (not once per sample)."""
    prompt = sum(c.prompt_tokens for c in choices[::n])
    completion = sum(c.end.n_tokens if c.end else c.n_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def envelope(request: ParsedRequest, request_id: str, created: int, *, chunk: bool) -> dict[str, Any]:
    if request.kind == "chat":
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": request.model, "system_fingerprint": None}


def now() -> int:
    return int(time.time())
