"""The websocket protocol of ``livepp serve``, as pure code: messages in,
typed requests or a :class:`ClientError` out, and the per-connection state
(which request ids run). No sockets, threads or event loop here (the
shape of websockets' own sans-I/O core); :mod:`livepp.serve.ws_session`
moves the bytes and runs the requests.

  → {"type":"generate","id":str,"prompt":str,"params":{...},"policies":[SPEC,...],"steps":bool|REGEX}
  → {"type":"route","id":str,"question":str,"params":{"early","long_max_tokens","short_max_tokens"}}
  → {"type":"think","id":str,"question":str,"params":{"traces","warmup","eta","group","mode",...}}
  → {"type":"watch","id":str,"prompt":str|null,"chat":bool,"text":str,"policies":[...],"steps":...}
  → {"type":"score","id":str,"text":str | "prompt":str,"target":str,"chat":bool,
     "max_length":int,"stride":int,"convention":"hf"|"lm-eval","prefix_token":"bos"|"eos"|int}
  → {"type":"text","id":str,"text":str} / {"type":"text","id":str,"done":true}
  → {"type":"cancel","id":str}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from livepp.core.params import DEFAULT_MAX_NEW_TOKENS, GenerationParams, LiveppError
from livepp.core.policies import parse_policy
from livepp.core.steps import step_rule
from livepp.serve.checks import surrogate_path
from livepp.serve.jobs import ClientError

__all__ = ["KINDS", "Message", "SessionHandle", "GenerateRequest", "RouteRequest", "ThinkRequest", "WatchRequest", "Limits", "ConnectionState",
           "ScoreRequest", "parse_score", "parse_message", "parse_generate", "parse_route", "parse_think", "parse_watch", "parse_text", "MAX_TRACES"]

KINDS = ("generate", "route", "think", "watch", "score", "text", "cancel")
MAX_TRACES = 64


@dataclass(frozen=True)
class Limits:
    """The limits a request is checked against (from the server's config)."""

    max_message_bytes: int = 64 * 1024
    max_new_tokens_cap: int = 1024
    max_stop_length: int = 200
    max_policies: int = 8
    max_requests_per_connection: int = 4
    default_policies: tuple[str, ...] = ()


@dataclass(frozen=True)
class Message:
    kind: str
    id: str | None
    data: dict[str, Any]


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    params: GenerationParams
    policies: list[str]
    steps: str | None


@dataclass(frozen=True)
class RouteRequest:
    question: str
    early: bool
    short_max_tokens: int
    long_max_tokens: int


@dataclass(frozen=True)
class ThinkRequest:
    question: str
    params: GenerationParams
    traces: int
    warmup: int
    eta: float
    group: int
    mode: str
    consensus: float | None


@dataclass(frozen=True)
class WatchRequest:
    prompt: str | None
    chat: bool
    text: str
    policies: list[str]
    steps: str | None


class SessionHandle(Protocol):
    """What a request kind's starter asks of the connection it arrived on
    (:class:`livepp.serve.ws_session.Session`)."""

    service: Any
    limits: Limits
    state: "ConnectionState"
    texts: dict[str, Any]

    def start(self, message: Message, fn: Callable[..., None], *args: Any, end_is_final: bool = True, text: Any = None) -> None: ...


@dataclass(frozen=True)
class ScoreRequest:
    text: str | None
    prompt: str | None
    target: str | None
    chat: bool
    max_length: int | None
    stride: int | None
    convention: str
    prefix_token: str | int | None


def parse_score(data: dict[str, Any], limits: Limits) -> ScoreRequest:
    text, prompt, target = data.get("text"), data.get("prompt"), data.get("target")
    if (text is None) == (prompt is None and target is None) or (prompt is None) != (target is None):
        raise _bad("score needs text, or prompt and target")
    if any(v is not None and (not isinstance(v, str) or not v.strip()) for v in (text, prompt, target)):
        raise _bad("text, prompt and target must be non-empty strings")
    chat, convention, prefix = data.get("chat", False), data.get("convention", "hf"), data.get("prefix_token")
    max_length, stride = data.get("max_length"), data.get("stride")
    if not isinstance(chat, bool) or convention not in ("hf", "lm-eval"):
        raise _bad("chat must be true or false and convention hf or lm-eval")
    for name, value, low in (("max_length", max_length, 2), ("stride", stride, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise _bad(f"{name} must be an integer >= {low}")
    if stride is not None and max_length is None:
        raise _bad("stride needs max_length")
    if convention == "lm-eval" and (prompt is not None or stride is not None):
        raise _bad("convention lm-eval scores whole texts in its own windows: no prompt/target, no stride")
    if prefix is not None and (convention != "lm-eval" or not (prefix in ("bos", "eos") or (isinstance(prefix, int) and not isinstance(prefix, bool)))):
        raise _bad("prefix_token (bos, eos or a token id) goes with convention lm-eval")
    if len(text or "") + len(prompt or "") + len(target or "") > limits.max_message_bytes:
        raise ClientError("message_too_large", f"messages are limited to {limits.max_message_bytes} bytes")
    return ScoreRequest(text, prompt, target, chat, max_length, stride, convention, prefix)


def parse_message(message: str | bytes, limits: Limits) -> Message:
    """One client message: size, JSON, an object, its type and id, and no
    lone surrogate in any string of it."""
    if isinstance(message, bytes):
        raise ClientError("bad_message", "send JSON text messages, not binary")
    if len(message) > limits.max_message_bytes or len(message.encode("utf-8")) > limits.max_message_bytes:
        raise ClientError("message_too_large", f"messages are limited to {limits.max_message_bytes} bytes")
    try:
        data = json.loads(message)
    except json.JSONDecodeError as exc:
        raise ClientError("bad_json", f"malformed JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise ClientError("bad_json", "JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ClientError("bad_json", f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ClientError("bad_message", "a message must be a JSON object")
    bad = surrogate_path(data)
    request_id = data.get("id")
    request_id = request_id if isinstance(request_id, str) and bad != "id" else None
    if bad is not None:
        raise ClientError("bad_params", f"{bad} holds a lone UTF-16 surrogate, which is not text", request_id)
    kind = data.get("type")
    if kind not in KINDS:
        raise ClientError("unknown_type", f"unknown message type {kind!r}; use {', '.join(KINDS[:-1])} or {KINDS[-1]}", request_id)
    return Message(kind, request_id, data)


class ConnectionState:
    """The request ids running on one connection."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.running: set[str] = set()

    def open(self, message: Message) -> str:
        """Admit a new request of this connection; its id."""
        request_id = message.id
        if not request_id:
            raise ClientError("bad_message", f"{message.kind} needs a non-empty string id")
        if request_id in self.running:
            raise ClientError("duplicate_id", f"request {request_id!r} is still running", request_id)
        if len(self.running) >= self.limits.max_requests_per_connection:
            raise ClientError("too_many_requests", f"at most {self.limits.max_requests_per_connection} concurrent requests per connection",
                              request_id)
        self.running.add(request_id)
        return request_id

    def close(self, request_id: str) -> None:
        self.running.discard(request_id)

    def target(self, message: Message, what: str = "running request") -> str:
        """The running request a text or cancel message names."""
        if message.id is None or message.id not in self.running:
            raise ClientError("unknown_id", f"no {what} with id {message.id!r}", message.id)
        return message.id


def _bad(message: str) -> ClientError:
    return ClientError("bad_params", message)


def _policies(data: dict[str, Any], limits: Limits) -> list[str]:
    specs = data.get("policies") or []
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise _bad("policies must be a list of policy specs such as 'early-stop:threshold=8'")
    try:
        for spec in specs:
            parse_policy(spec)
    except LiveppError as exc:
        raise _bad(str(exc)) from None
    return specs


def _steps(data: dict[str, Any], limits: Limits) -> str | None:
    try:
        return step_rule(data.get("steps"), max_length=limits.max_stop_length)
    except LiveppError as exc:
        raise _bad(str(exc)) from None


def parse_generate(data: dict[str, Any], limits: Limits) -> GenerateRequest:
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _bad("prompt must be a non-empty string")
    raw_params = data.get("params") or {}
    if isinstance(raw_params, dict) and "max_new_tokens" not in raw_params:
        # An unstated length defaults within this server's cap.
        raw_params = raw_params | {"max_new_tokens": min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens_cap)}
    try:
        params = GenerationParams.from_dict(raw_params)
    except (LiveppError, TypeError) as exc:
        raise _bad(str(exc)) from None
    return GenerateRequest(prompt, params, _policies(data, limits), _steps(data, limits))


def _options(opts: Any, known: dict[str, tuple[type, ...]], what: str) -> dict[str, Any]:
    opts = {} if opts is None else opts
    if not isinstance(opts, dict):
        raise _bad(f"{what} params must be an object")
    for k, v in opts.items():
        types = known.get(k)
        if types is None:
            raise _bad(f"{what} params: unknown {k!r}; known: {', '.join(known)}")
        if v is None and type(None) in types:
            continue
        if isinstance(v, bool) != (bool in types) or not isinstance(v, types):
            names = "/".join(t.__name__ for t in types if t is not type(None))
            raise _bad(f"{what} params: {k} must be {names}, got {v!r}")
    return opts


def _question(data: dict[str, Any]) -> str:
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _bad("question must be a non-empty string")
    return question


def parse_route(data: dict[str, Any], limits: Limits) -> RouteRequest:
    question = _question(data)
    opts = _options(data.get("params"), {"early": (bool,), "long_max_tokens": (int,), "short_max_tokens": (int,)}, "route")
    cap = limits.max_new_tokens_cap
    if not all(1 <= opts.get(k, 1) <= cap for k in ("long_max_tokens", "short_max_tokens")):
        raise _bad(f"token limits must be between 1 and {cap}")
    return RouteRequest(question, opts.get("early", False), opts.get("short_max_tokens", min(24, cap)),
                        opts.get("long_max_tokens", min(256, cap)))


_THINK_PARAMS = {"traces": (int,), "warmup": (int,), "eta": (int, float), "group": (int,), "mode": (str,), "max_new_tokens": (int,),
                 "temperature": (int, float), "top_p": (int, float), "seed": (int,), "consensus": (int, float, type(None))}


def parse_think(data: dict[str, Any], limits: Limits) -> ThinkRequest:
    question = _question(data)
    cap = limits.max_new_tokens_cap
    opts = {"traces": 8, "warmup": 3, "eta": 90.0, "group": 16, "mode": "online", "max_new_tokens": min(256, cap),
            "temperature": 0.7, "top_p": 0.95, "seed": 0, "consensus": None} | _options(data.get("params"), _THINK_PARAMS, "think")
    if not 1 <= opts["traces"] <= MAX_TRACES:
        raise _bad(f"traces must be between 1 and {MAX_TRACES}")
    if opts["max_new_tokens"] > cap:
        raise _bad(f"max_new_tokens is above this server's cap of {cap}")
    try:
        params = GenerationParams(max_new_tokens=opts["max_new_tokens"], temperature=float(opts["temperature"]),
                                  top_p=float(opts["top_p"]), seed=opts["seed"])
    except (LiveppError, OverflowError) as exc:
        raise _bad(str(exc)) from None
    if params.greedy:
        raise _bad("DeepConf samples its traces: give a temperature > 0")
    return ThinkRequest(question, params, opts["traces"], opts["warmup"], float(opts["eta"]), opts["group"], opts["mode"],
                        opts["consensus"])


def parse_watch(data: dict[str, Any], limits: Limits) -> WatchRequest:
    prompt, chat, text = data.get("prompt"), data.get("chat", False), data.get("text", "")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise _bad("prompt must be a non-empty string or null")
    if not isinstance(chat, bool) or not isinstance(text, str):
        raise _bad("chat must be true or false and text a string")
    specs = _policies(data, limits)
    if len(specs) > limits.max_policies:
        raise _bad(f"policies must be a list of at most {limits.max_policies} policy specs")
    return WatchRequest(prompt, chat, text, specs, _steps(data, limits))


def parse_text(data: dict[str, Any]) -> tuple[str | None, bool]:
    """A watch request's next text, and whether it is complete."""
    text, done = data.get("text"), data.get("done", False)
    if (text is not None and not isinstance(text, str)) or not isinstance(done, bool):
        raise _bad("text must be a string and done true or false")
    return text, done
