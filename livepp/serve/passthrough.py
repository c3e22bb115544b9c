"""A gateway request the upstream engine answers by itself (scoring: echo,
prompt_logprobs, token-id prompts): the body goes upstream as the client
sent it (livepp's own keys aside) and the answer comes back as the engine
gave it, its status and error body included, streamed or not."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any, AsyncIterator, Callable

from starlette.responses import Response, StreamingResponse

from livepp.serve.openai_schema import OpenAIError

__all__ = ["forward"]


def _open(engine: Any, path: str, payload: dict[str, Any]) -> Any:
    headers = {"Content-Type": "application/json"}
    if engine.api_key:
        headers["Authorization"] = f"Bearer {engine.api_key}"
    request = urllib.request.Request(engine.base_url + path, data=json.dumps(payload).encode(), headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=engine.timeout)
    except urllib.error.HTTPError as exc:  # the engine's own refusal: passed on as it is
        return exc
    except (urllib.error.URLError, OSError) as exc:
        raise OpenAIError(502, f"the upstream engine at {engine.base_url} cannot be reached: {getattr(exc, 'reason', exc)}",
                          type="upstream_error", code="upstream_error") from None


async def forward(engine: Any, path: str, payload: dict[str, Any], *, stream: bool, on_end: Callable[[], None]) -> Response:
    upstream = await asyncio.to_thread(_open, engine, path, payload)
    status = getattr(upstream, "status", None) or upstream.code
    media = upstream.headers.get("Content-Type", "application/json")
    if not stream or status != 200:
        try:
            data = await asyncio.to_thread(upstream.read)
        finally:
            upstream.close()
            on_end()
        return Response(data, status_code=status, media_type=media)

    async def relay() -> AsyncIterator[bytes]:
        try:
            while chunk := await asyncio.to_thread(upstream.read1, 65536):
                yield chunk
        finally:
            upstream.close()  # the client left, or the answer is over: the upstream request ends too
            on_end()

    return StreamingResponse(relay(), status_code=status, media_type=media)
