"""A token source that streams from an OpenAI-compatible endpoint.

Works with ``/v1/chat/completions`` and ``/v1/completions`` of vLLM, SGLang,
TGI, llama.cpp's server and hosted APIs, asking for ``logprobs`` and
``top_logprobs``. What livepp reports from such a stream:

* ``logprob``, ``top_logprobs``: as the engine returns them. Engines report
  log-probs of their own (usually raw) distribution; livepp does not change them.
* ``token_id``: -1 (these APIs send token strings, not ids).
* ``entropy``: None. The stream carries only the top-k, and an entropy from
  them is a bound, not the value; livepp never presents an estimate as exact.
* ``confidence``: DeepConf's −mean of the top-k logprobs over the k the
  engine returned (at most 20).
* ``text``: decoded from the tokens' ``bytes`` when the engine sends them, with
  an incremental UTF-8 decoder, so a character split over tokens comes out whole.

Quirks handled: chunks that carry several tokens, chunks without logprobs
(role-only first deltas, the final usage chunk, empty deltas), ``[DONE]``.
Closing the stream (a policy stopped it) shuts the socket down, whoever holds
it (with HTTP/1.0 or ``Connection: close`` the response owns it), so the
engine aborts the request at once; ``tokens_after_stop`` counts tokens that
had already arrived but were not consumed when a policy or a cancel stopped
the stream (None otherwise). :meth:`OpenAIStream.abort` does the same from
another thread and wakes a read that is waiting for the next token.

A stream that breaks off (the connection closes before ``[DONE]`` and before
any finish reason, a truncated chunked body, a garbled status line) raises
:class:`RemoteError`, so the run ends with reason ``error`` and keeps the
tokens that arrived. Engine finish reasons are mapped onto livepp's contract
(``stop``, ``tool_calls``, ``function_call`` → ``eos``; ``length`` →
``length``; anything else, e.g. ``abort`` or ``content_filter`` → ``error``)
and the engine's own word is kept in ``engine_finish_reason``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import http.client
import json
import socket
from collections import deque
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit

from livepp.core.events import TokenRecord
from livepp.engines.openai_chunks import ChunkParser, map_finish_reason
from livepp.core.params import GenerationParams, LiveppError
from livepp.core.stream import SequentialBatch
from livepp.engines.protocol import Prompt, chat_messages, check_prompt

__all__ = ["OpenAIStream", "OpenAIEngine", "RemoteError", "source_from_options", "probe_vocab_size", "map_finish_reason", "upstream_error"]


class RemoteError(LiveppError):
    """The remote engine failed: unreachable, an HTTP error, a broken stream."""

    def __init__(self, message: str, *, status: int | None = None, upstream: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        # The engine's own OpenAI-shaped error ({"message", "type", ...}) when it sent one.
        self.upstream = upstream


class OpenAIEngine:
    """An OpenAI-compatible endpoint plus a model name, as an engine:
    :meth:`open` starts one streaming request. Requests are independent
    (not ``serial``); a batch runs its rows one request after another."""

    serial = False
    kind = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api: str = "chat",
        api_key: str | None = None,
        timeout: float = 60.0,
        vocab_size: int | None = None,
    ) -> None:
        url = urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise LiveppError(f"--remote must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        if api not in ("chat", "completions"):
            raise LiveppError(f"api must be 'chat' or 'completions', got {api!r}")
        self.url = url
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = model
        self.api = api
        self.api_key = api_key
        self.timeout = timeout
        # The engine's vocabulary size, for the entropy's upper bound (None: no upper bound).
        self.vocab_size = vocab_size

    def request_body(self, prompt: Prompt, params: GenerationParams) -> dict[str, Any]:
        k = min(max(params.top_logprobs, params.confidence_k), 20)
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.top_k:
            body["top_k"] = params.top_k  # an extension most open engines accept
        if params.min_p:
            body["min_p"] = params.min_p
        if self.api == "chat":
            body["messages"] = chat_messages(prompt)
            body["logprobs"] = True
            body["top_logprobs"] = k
        else:
            if not isinstance(prompt, str):
                raise LiveppError("the completions API takes text, not chat messages (use --api chat)")
            body["prompt"] = prompt
            body["logprobs"] = max(k, 1)
        return body

    def with_api(self, api: str) -> "OpenAIEngine":
        """The same endpoint and model through the other API (chat or completions)."""
        if api not in ("chat", "completions"):
            raise LiveppError(f"api must be 'chat' or 'completions', got {api!r}")
        other = copy.copy(self)
        other.api = api
        return other

    def open(self, prompt: Prompt, params: GenerationParams) -> "OpenAIStream":
        """One streaming request; it connects when first read."""
        check_prompt(prompt)
        return OpenAIStream(self, self.request_body(prompt, params), top_k=params.top_logprobs)

    def open_text(self, prompt: Prompt, params: GenerationParams) -> "OpenAIStream":
        """One streaming request for text only (no logprobs asked): its
        records carry the text deltas as they arrive, with no statistics
        (``logprob`` NaN), for a proxy model to score."""
        check_prompt(prompt)
        body = self.request_body(prompt, params)
        for key in ("logprobs", "top_logprobs"):
            body.pop(key, None)
        return OpenAIStream(self, body, top_k=0, text_only=True)

    def open_batch(self, prompts: Sequence[Prompt], params: Sequence[GenerationParams]) -> SequentialBatch:
        if len(prompts) != len(params):
            raise LiveppError(f"open_batch needs one params per prompt, got {len(prompts)} prompts and {len(params)} params")
        for prompt in prompts:
            check_prompt(prompt)
        return SequentialBatch([functools.partial(self.open, pr, p) for pr, p in zip(prompts, params)])


def source_from_options(
    url: str, model: str | None, *, api: str = "chat", api_key_env: str | None = None, timeout: float = 60.0
) -> OpenAIEngine:
    """An OpenAIEngine from command-line options (``--remote``, ``--remote-model``,
    ``--api-key-env``), with the errors a user can act on."""
    if not model:
        raise LiveppError("--remote needs --remote-model NAME")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise LiveppError(f"--api-key-env: environment variable {api_key_env} is not set")
    return OpenAIEngine(url, model, api=api, api_key=api_key, timeout=timeout)


def probe_vocab_size(engine: OpenAIEngine) -> int | None:
    """The engine's vocabulary size from its ``/tokenizer_info`` (livepp
    serve's, and engines that say it), or None; never an error."""
    url = engine.base_url[: -len("/v1")] if engine.base_url.endswith("/v1") else engine.base_url
    conn_cls = http.client.HTTPSConnection if engine.url.scheme == "https" else http.client.HTTPConnection
    try:
        conn = conn_cls(engine.url.hostname, engine.url.port, timeout=min(engine.timeout, 5.0))
        headers = {"Authorization": f"Bearer {engine.api_key}"} if engine.api_key else {}
        conn.request("GET", urlsplit(url).path + "/tokenizer_info", headers=headers)
        response = conn.getresponse()
        data = json.loads(response.read()) if response.status == 200 else {}
        conn.close()
    except (OSError, ValueError, http.client.HTTPException):
        return None
    size = data.get("vocab_size") if isinstance(data, dict) else None
    return size if isinstance(size, int) and size > 1 else None


class OpenAIStream:
    """Iterator of :class:`TokenRecord` over one streaming request."""

    def __init__(self, source: OpenAIEngine, body: dict[str, Any], *, top_k: int, text_only: bool = False) -> None:
        self.source = source
        self.text_only = text_only
        self.body = body
        self.top_k = top_k
        self.tokens_after_stop: int | None = None
        self.finish_reason: str | None = None
        self.engine_finish_reason: str | None = None
        self.prompt_token_ids: tuple[int, ...] = ()  # these APIs send no prompt ids
        self.parser = ChunkParser(source.api, top_k=top_k, text_only=text_only, vocab_size=source.vocab_size)
        self._conn: http.client.HTTPConnection | None = None
        self._response: http.client.HTTPResponse | None = None
        self._sock: socket.socket | None = None
        self._pending: deque[TokenRecord] = deque()
        self._finished = False
        self._aborted = False

    # ---- connection --------------------------------------------------------
    def _open(self) -> None:
        s = self.source
        path = f"{s.url.path}/{'chat/completions' if s.api == 'chat' else 'completions'}"
        conn_cls = http.client.HTTPSConnection if s.url.scheme == "https" else http.client.HTTPConnection
        self._conn = conn_cls(s.url.hostname, s.url.port, timeout=s.timeout)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if s.api_key:
            headers["Authorization"] = f"Bearer {s.api_key}"
        where = f"{s.base_url} ({s.api})"
        try:
            self._conn.connect()
            # Keep the socket itself: with a closing response, http.client
            # hands it to the response and the connection forgets it.
            self._sock = self._conn.sock
            if self._aborted:
                raise RemoteError("aborted")
            self._conn.request("POST", path, body=json.dumps(self.body), headers=headers)
            self._response = self._conn.getresponse()
        except socket.timeout:
            self._fail_closed()
            raise RemoteError(f"timed out after {s.timeout:g} s connecting to {where}") from None
        except http.client.HTTPException as exc:
            self._fail_closed()
            raise RemoteError(f"{where} did not answer with valid HTTP ({type(exc).__name__}: {str(exc).strip()[:200]!r})") from None
        except OSError as exc:
            self._fail_closed()
            raise RemoteError(f"cannot connect to {where}: {exc.strerror or exc}") from None
        status = self._response.status
        if status >= 400:
            detail = self._response.read(2000).decode("utf-8", "replace").strip()
            self._fail_closed()
            raise RemoteError(f"HTTP {status} from {where}: {detail or self._response.reason}", status=status,
                              upstream=upstream_error(detail))
        kind = (self._response.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if kind != "text/event-stream":
            self._fail_closed()
            raise RemoteError(f"{where} answered HTTP {status} with {kind or 'no content type'}, not a text/event-stream; is this an OpenAI-compatible streaming endpoint?")

    def _fail_closed(self) -> None:
        self._finished = True
        self._shut()

    def close(self) -> None:
        """Stop now: shutting the socket down makes the engine abort the request."""
        if not self._finished and self._response is not None:
            # Stopped by the consumer (a policy, a cancel) before the end.
            self.tokens_after_stop = len(self._pending) + self._buffered_tokens()
        self._fail_closed()

    def abort(self) -> None:
        """Stop from another thread: wakes a read blocked on the next token."""
        self._aborted = True
        _shutdown(self._sock)

    def _shut(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            _shutdown(sock)
            sock.close()
        if self._response is not None:
            self._response.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _buffered_tokens(self) -> int:
        # Tokens the socket already delivered but we did not parse: count the
        # complete SSE events sitting in the response's read buffer.
        try:
            fp = self._response.fp if self._response is not None else None
            raw = fp.peek(1 << 16) if fp is not None and hasattr(fp, "peek") else b""
        except (OSError, ValueError):
            return 0
        n = 0
        for line in raw.split(b"\n"):
            if line.startswith(b"data:") and line.strip() != b"data: [DONE]":
                try:
                    n += self.parser.count(json.loads(line[5:]))
                except (ValueError, KeyError, TypeError):
                    pass
        return n

    # ---- iteration ---------------------------------------------------------
    def __iter__(self) -> Iterator[TokenRecord]:
        return self

    def __next__(self) -> TokenRecord:
        while not self._pending:
            if self._finished:
                raise StopIteration
            if self._response is None:
                self._open()
            self._read_event()
        return self._pending.popleft()

    def _read_event(self) -> None:
        assert self._response is not None
        where = self.source.base_url
        try:
            line = self._response.readline()
        except socket.timeout:
            self._fail_closed()
            raise RemoteError(f"timed out after {self.source.timeout:g} s waiting for tokens from {where}") from None
        except (OSError, http.client.HTTPException) as exc:
            if self._aborted:
                line = b""  # our own abort() woke the read
            else:
                self._fail_closed()
                raise RemoteError(f"the stream from {where} broke off after {self.parser.received} tokens ({type(exc).__name__}: {exc})") from None
        if not line:
            self._finished = True
            self._flush_utf8()
            if self._aborted:
                self.tokens_after_stop = len(self._pending)
                raise StopIteration
            if self.finish_reason is None:
                # Closed before [DONE] and before any finish reason: the
                # engine died or the connection dropped. What arrived is kept.
                self._shut()
                raise RemoteError(f"the stream from {where} ended after {self.parser.received} tokens without [DONE] or a finish reason")
            return
        line = line.strip()
        if not line.startswith(b"data:"):
            return  # SSE comments, event names and blank separators
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self._finished = True
            self._flush_utf8()
            return
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            self._fail_closed()
            raise RemoteError(f"malformed chunk from {where}: {payload[:200]!r}") from None
        if isinstance(chunk, dict) and "error" in chunk:
            self._fail_closed()
            raise RemoteError(f"error from {where}: {chunk['error']}")
        try:
            self._pending.extend(self.parser.records(chunk))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self._fail_closed()
            raise RemoteError(f"malformed chunk from {where} ({exc}): {payload[:200]!r}") from None
        self.finish_reason = self.parser.finish_reason
        self.engine_finish_reason = self.parser.engine_finish_reason
        if self.finish_reason is not None:
            # The engine has said its last token; what follows ([DONE], a
            # usage chunk) carries none, so the stream is complete here.
            self._finished = True
            self._flush_utf8()

    def _flush_utf8(self) -> None:
        # Bytes of a character the engine never finished come out as U+FFFD
        # on the last token rather than vanish.
        rest = self.parser.flush()
        if rest and self._pending:
            last = self._pending.pop()
            self._pending.append(dataclasses.replace(last, text=last.text + rest))


def _shutdown(sock: socket.socket | None) -> None:
    """Both directions down: the peer sees the close, a blocked read returns."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


def upstream_error(detail: str) -> dict[str, Any] | None:
    """The ``error`` object of an OpenAI-shaped error body, if it is one."""
    try:
        data = json.loads(detail)
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, str):
        return {"message": error}
    return error if isinstance(error, dict) and isinstance(error.get("message"), str) else None

