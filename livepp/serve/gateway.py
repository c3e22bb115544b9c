"""The monitoring gateway's upstream side (``serve --remote``): every /v1
request's streams read in the event loop, with one pooled, keep-alive HTTP
client (aiohttp) for the upstream engine, not a thread and a new connection
per request.

Each choice is one upstream streaming request; its chunks are parsed
(orjson, :class:`~livepp.engines.openai_chunks.ChunkParser`) and pushed
through a monitor :class:`~livepp.core.monitor.Session` (tracker, policies,
the page's live list, ``/metrics``) as they arrive, in the loop, so a token
costs one parse, one tracker update and one re-encoding. A policy stop, a
cancel, a client gone or a shutdown closes that upstream connection at once
(the engine aborts the request); the others go on.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import orjson

from livepp.core.events import TokenRecord
from livepp.core.params import GenerationParams
from livepp.engines.openai_chunks import ChunkParser
from livepp.engines.remote import OpenAIEngine, RemoteError, upstream_error

__all__ = ["Upstream", "UpstreamStream"]


class Upstream:
    """One aiohttp client session per event loop, its connections kept alive."""

    def __init__(self, *, max_connections: int) -> None:
        self.max_connections = max_connections
        self._session: Any = None

    def session(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=30, enable_cleanup_closed=True),
                timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def open(self, engine: OpenAIEngine, prompt: Any, params: GenerationParams, *, top_k: int) -> "UpstreamStream":
        return UpstreamStream(self, engine, engine.request_body(prompt, params), top_k=top_k)


class UpstreamStream:
    """One upstream streaming request, as an async iterator of token records."""

    prompt_token_ids: tuple[int, ...] = ()  # these APIs send no prompt ids

    def __init__(self, upstream: Upstream, engine: OpenAIEngine, body: dict[str, Any], *, top_k: int) -> None:
        self.upstream, self.engine, self.body = upstream, engine, body
        self.parser = ChunkParser(engine.api, top_k=top_k, vocab_size=engine.vocab_size)
        self.finish_reason: str | None = None
        self.engine_finish_reason: str | None = None
        self.tokens_after_stop: int | None = None
        self._response: Any = None
        self._closed = False
        self._done = False  # no more records
        self._drained = False  # [DONE] read

    def abort(self) -> None:
        """Close the upstream connection now (from the event loop): the engine aborts the request."""
        self._closed = True
        if self._response is not None:
            self._response.close()

    async def _open(self) -> Any:
        import aiohttp

        engine = self.engine
        url = f"{engine.base_url}/{'chat/completions' if engine.api == 'chat' else 'completions'}"
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if engine.api_key:
            headers["Authorization"] = f"Bearer {engine.api_key}"
        where = f"{engine.base_url} ({engine.api})"
        try:
            response = await self.upstream.session().post(url, data=orjson.dumps(self.body), headers=headers,
                                                           timeout=aiohttp.ClientTimeout(sock_connect=engine.timeout, sock_read=engine.timeout))
        except asyncio.TimeoutError:
            raise RemoteError(f"timed out after {engine.timeout:g} s connecting to {where}") from None
        except aiohttp.ClientError as exc:
            raise RemoteError(f"cannot connect to {where}: {exc}") from None
        if response.status >= 400:
            detail = (await response.content.read(2000)).decode("utf-8", "replace").strip()
            response.close()
            raise RemoteError(f"HTTP {response.status} from {where}: {detail or response.reason}", status=response.status,
                              upstream=upstream_error(detail))
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "text/event-stream":
            response.close()
            raise RemoteError(f"{where} answered HTTP {response.status} with {kind or 'no content type'}, not a text/event-stream; "
                              "is this an OpenAI-compatible streaming endpoint?")
        return response

    async def next_records(self) -> list[TokenRecord] | None:
        """The records of the next chunk that has any; None at the stream's
        end. A failure is a :class:`RemoteError` (the connection is closed)."""
        import aiohttp

        where = self.engine.base_url
        if self._response is None:
            self._response = await self._open()
        if self._closed or self._done:
            return None
        try:
            while True:
                line = await self._response.content.readline()
                if not line:  # the end of the body
                    self._done = True
                    if self.finish_reason is None and not self._closed:
                        raise RemoteError(f"the stream from {where} ended after {self.parser.received} tokens without [DONE] or a finish reason")
                    return None
                if not line.startswith(b"data:"):
                    continue  # SSE comments, event names and blank separators
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self._done = self._drained = True
                    return None
                try:
                    chunk = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    raise RemoteError(f"malformed chunk from {where}: {payload[:200]!r}") from None
                if isinstance(chunk, dict) and "error" in chunk:
                    raise RemoteError(f"error from {where}: {chunk['error']}")
                try:
                    records = self.parser.records(chunk)
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    raise RemoteError(f"malformed chunk from {where} ({exc}): {payload[:200]!r}") from None
                self.finish_reason, self.engine_finish_reason = self.parser.finish_reason, self.parser.engine_finish_reason
                if records:
                    return records
                if self.finish_reason is not None:
                    self._done = True
                    return None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if self._closed:
                return None
            self.abort()
            raise RemoteError(f"the stream from {where} broke off after {self.parser.received} tokens ({type(exc).__name__}: {exc})") from None
        except BaseException:
            self.abort()
            raise

    async def finish(self) -> None:
        """A stream that ended: what follows its last token ([DONE], a usage
        chunk) is read so the connection goes back to the pool."""
        response = self._response
        if response is None or self._closed:
            return
        try:
            while not self._drained:
                line = await asyncio.wait_for(response.content.readline(), 5)
                if not line or line.strip() == b"data: [DONE]":
                    break
            response.release()
        except (Exception, asyncio.CancelledError):
            response.close()
            raise

    def close(self) -> None:
        """Stopped by its consumer (a policy) before the end: the connection goes, the engine stops."""
        if self.finish_reason is None:
            self.tokens_after_stop = 0
        self.abort()


async def monitored(stream: UpstreamStream, session: Any, stop_reason: Callable[[], str | None]) -> None:
    """Push ``stream``'s records through a monitor ``session`` to its end,
    a policy stop or the job's stop (``stop_reason()``); the session's end
    event is always emitted."""
    reason = "length"
    ended = False
    try:
        while not ended and (records := await stream.next_records()) is not None:
            for record in records:
                if session.push(record):
                    reason, ended = "policy", True
                    break
                if record.finish_reason is not None:
                    reason, ended = record.finish_reason, True
                    break
        if not ended:
            reason = stream.finish_reason or reason
        reason = stop_reason() or reason
        if reason == "policy":
            stream.close()
        else:
            await stream.finish()
    except asyncio.CancelledError:
        reason = stop_reason() or "cancelled"
        stream.abort()
        raise
    except BaseException:
        reason = stop_reason() or "error"
        stream.abort()
        raise
    finally:
        session.end(reason, tokens_after_stop=stream.tokens_after_stop, engine_finish_reason=stream.engine_finish_reason)
