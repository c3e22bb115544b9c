"""The OpenAI API's request and response shapes, and livepp's namespaced additions.

:func:`parse_request` turns a ``/v1/chat/completions`` or ``/v1/completions``
body into a :class:`CompletionRequest` (or an :class:`OpenAIError` naming the
bad parameter); :class:`ChoiceBuilder` turns one choice's monitor events into
OpenAI chunks (streaming) or one choice object (not streaming). What livepp
adds sits under ``livepp`` keys, which OpenAI clients carry through untouched:

* request: ``livepp: {"policies": [SPEC, ...], "window": 32, "steps": true|REGEX}``
  (the SDK's ``extra_body``);
* each token's chunk: ``choices[i].livepp`` = that token's statistics
  (``index, token_id, logprob, entropy, varentropy, ppl, window_ppl, mean_nll,
  confidence, group_confidence, surprise_z``), exactly the ``token`` event of
  ``livepp generate --json``;
* a policy or step event: a chunk with an empty delta and ``livepp.event``;
* the last chunk of a choice: ``livepp: {"ppl", "mean_nll", "n_tokens", "reason",
  "policy", "stop_reason"}``: ``reason`` is livepp's end reason, ``policy`` the
  stopping policy's event (or null) and ``stop_reason`` the stopping policy's
  name, else the end reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from livepp.core.events import EndEvent, Event, PolicyEvent, StepEvent, TokenEvent, json_safe, to_json_dict
from livepp.core.params import GenerationParams, LiveppError
from livepp.core.policies import parse_policy
from livepp.core.steps import step_rule
from livepp.engines.protocol import Prompt, chat_messages

__all__ = ["OpenAIError", "CompletionRequest", "parse_request", "ChoiceBuilder", "ContentGate", "finish_reason_of", "usage"]

TOKEN_STATS = ("index", "token_id", "logprob", "entropy", "varentropy", "ppl", "window_ppl", "mean_nll",
               "confidence", "group_confidence", "surprise_z")

# Request fields livepp cannot honour: refused by name rather than ignored.
_REFUSED = {
    "tools": "tools are not supported", "functions": "functions are not supported",
    "tool_choice": "tools are not supported", "function_call": "functions are not supported",
    "audio": "audio is not supported", "prediction": "predicted outputs are not supported",
    "suffix": "suffix is not supported",
}


class OpenAIError(Exception):
    """An error in OpenAI's schema: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


@dataclass
class CompletionRequest:
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

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


def _int(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        bound = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
        raise _bad(f"{name} must be {bound}, got {value!r}", name)
    return value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad(f"{name} must be a number, got {value!r}", name)
    return float(value)


def _messages(value: Any) -> list[dict[str, str]]:
    """Chat messages with text content (a string, or a list of text parts)."""
    if not isinstance(value, list) or not value:
        raise _bad("messages must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or an array of text parts", f"messages[{i}].content")
        role = m.get("role")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    try:
        return chat_messages(out)
    except LiveppError as exc:
        raise _bad(str(exc), "messages") from None


def parse_request(kind: str, raw: bytes, *, models: tuple[str, ...], default_max_tokens: int, max_n: int,
                  max_step_regex: int | None = None) -> CompletionRequest:
    """A request body, checked; ``models`` are the names this server answers to."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    for name, why in _REFUSED.items():
        if body.get(name) not in (None, [], ""):
            raise _bad(f"{name}: {why} by livepp", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0) != 0.0:
            raise _bad(f"{name} is not supported by livepp (leave it 0)", name)
    if body.get("logit_bias"):
        raise _bad("logit_bias is not supported by livepp", "logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("response_format: only {\"type\": \"text\"} is supported", "response_format")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required", "model")
    if model not in models:
        raise OpenAIError(404, f"The model '{model}' does not exist; this server serves {', '.join(repr(m) for m in models[:1])}",
                          param="model", code="model_not_found")

    if kind == "chat":
        prompts: list[Prompt] = [_messages(body.get("messages"))]
        if body.get("logprobs") not in (None, True, False):
            raise _bad("logprobs must be true or false", "logprobs")
        logprobs = bool(body.get("logprobs"))
        top = _int(body, "top_logprobs", 0, 20)
        if top and not logprobs:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        top_logprobs = top or 0
        max_tokens = _int(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens", 1)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise _bad("prompt must be a string or an array of strings (token arrays are not supported)", "prompt")
        if any(not p.strip() for p in prompts):
            raise _bad("prompt must not be empty", "prompt")
        if body.get("echo"):
            raise _bad("echo is not supported by livepp", "echo")
        if body.get("best_of") not in (None, 1):
            raise _bad("best_of is not supported by livepp", "best_of")
        top = _int(body, "logprobs", 0, 20)
        logprobs, top_logprobs = top is not None, top or 0
        max_tokens = _int(body, "max_tokens", 1)
    n = _int(body, "n", 1, max_n) or 1
    if len(prompts) * n > max_n:
        raise _bad(f"at most {max_n} choices per request (prompts x n)", "n")

    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _bad("stop must be a string or an array of strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    extra = body.get("livepp") or {}
    if not isinstance(extra, dict):
        raise _bad("livepp must be an object such as {\"policies\": [\"early-stop:threshold=8\"]}", "livepp")
    unknown = sorted(set(extra) - {"policies", "window", "steps"})
    if unknown:
        raise _bad(f"unknown livepp field(s) {', '.join(unknown)}; known: policies, window, steps", "livepp")
    policies = extra.get("policies") or []
    if not isinstance(policies, list) or not all(isinstance(s, str) for s in policies):
        raise _bad("livepp.policies must be an array of policy specs such as 'early-stop:threshold=8'", "livepp.policies")
    window = _int(extra, "window", 1, 4096) or 32
    try:
        for spec in policies:
            parse_policy(spec)
        steps = step_rule(extra.get("steps"), max_length=max_step_regex)
        params = GenerationParams(
            max_new_tokens=max_tokens or default_max_tokens,
            temperature=_number(body, "temperature", 1.0),
            top_p=_number(body, "top_p", 1.0),
            top_k=_int(body, "top_k", 0) or 0,  # extensions vLLM and llama.cpp accept
            min_p=_number(body, "min_p", 0.0),
            seed=_int(body, "seed", 0),
            stop=tuple(stop or ()),
            top_logprobs=top_logprobs,
            raw=kind == "completions",
        )
    except LiveppError as exc:
        raise _bad(str(exc)) from None
    return CompletionRequest(kind=kind, model=model, prompts=prompts, params=params, n=n, stream=bool(stream),
                             include_usage=bool(options.get("include_usage")), logprobs=logprobs, top_logprobs=top_logprobs,
                             policies=policies, window=window, steps=steps)


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
    return json_safe({name: getattr(event, name) for name in TOKEN_STATS})


class ChoiceBuilder:
    """One choice's events as OpenAI chunks (or, at the end, one choice)."""

    def __init__(self, index: int, request: CompletionRequest) -> None:
        self.index, self.request = index, request
        self.kind = request.kind
        self.gate = ContentGate(request.params.stop)
        self.text = ""
        self.offset = 0
        self.tokens: list[dict[str, Any]] = []  # livepp stats per token
        self.entries: list[dict[str, Any]] = []  # chat logprobs entries
        self.completion_logprobs: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.events: list[dict[str, Any]] = []
        self.stopping_policy: dict[str, Any] | None = None
        self.prompt_tokens = 0
        self.end: EndEvent | None = None

    # ---- streaming pieces: each returns the choice part of one chunk, or None
    def on_event(self, event: Event) -> dict[str, Any] | None:
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

    def _token(self, event: TokenEvent) -> dict[str, Any]:
        text = self.gate.feed(event.text)
        stats = token_stats(event)
        self.tokens.append(stats)
        logprobs = None
        if self.request.logprobs:
            if self.kind == "chat":
                entry = _token_entry(event, self.request.top_logprobs)
                self.entries.append(entry)
                logprobs = {"content": [entry]}
            else:
                top = {}
                for t in event.top_logprobs[: self.request.top_logprobs]:
                    top.setdefault(t.text, t.logprob)
                piece = {"tokens": [event.text], "token_logprobs": [event.logprob], "top_logprobs": [top],
                         "text_offset": [self.offset]}
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
        return json_safe({"ppl": end.ppl, "mean_nll": end.mean_nll, "n_tokens": end.n_tokens, "reason": end.reason,
                          "policy": self.stopping_policy if end.reason == "policy" else None, "stop_reason": stop_reason})

    # ---- the whole choice, for a non-streaming reply
    def choice(self) -> dict[str, Any]:
        livepp = self.summary() | {"tokens": self.tokens, "events": json_safe(self.events)}
        if self.kind == "chat":
            return {"index": self.index, "message": {"role": "assistant", "content": self.text},
                    "logprobs": {"content": self.entries} if self.request.logprobs else None,
                    "finish_reason": finish_reason_of(self.end.reason) if self.end else None, "livepp": livepp}
        return {"index": self.index, "text": self.text,
                "logprobs": self.completion_logprobs if self.request.logprobs else None,
                "finish_reason": finish_reason_of(self.end.reason) if self.end else None, "livepp": livepp}


def usage(choices: list[ChoiceBuilder], n: int) -> dict[str, int]:
    """Prompt tokens count each prompt once (not once per sample)."""
    prompt = sum(c.prompt_tokens for c in choices[::n])
    completion = sum(c.end.n_tokens if c.end else len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def envelope(request: CompletionRequest, request_id: str, created: int, *, chunk: bool) -> dict[str, Any]:
    if request.kind == "chat":
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": request.model, "system_fingerprint": None}


def now() -> int:
    return int(time.time())
