"""`livepp serve` for applications that embed it: build the service, serve it.

    from livepp.serve.app import LiveppServer, ServerConfig, serve_forever
    server = LiveppServer(engine, ServerConfig(port=0, token="s3cret"))
    asyncio.run(serve_forever(server, ready=print))

The layers, from the bottom: jobs and outboxes (:mod:`~livepp.serve.jobs`,
:mod:`~livepp.serve.outbox`); the service object every handler receives
(:mod:`~livepp.serve.service`); the handlers: the OpenAI API
(:mod:`~livepp.serve.openai_models`, :mod:`~livepp.serve.openai_schema`,
:mod:`~livepp.serve.openai_api`) and the websocket protocol
(:mod:`~livepp.serve.ws_protocol`, pure, and :mod:`~livepp.serve.ws_session`
with its request kinds in :mod:`~livepp.serve.generation`,
:mod:`~livepp.serve.reasoning`, :mod:`~livepp.serve.watching`); the ASGI
application and its access rules (:mod:`~livepp.serve.http_app`,
:mod:`~livepp.serve.access`); uvicorn (:mod:`~livepp.serve.runner`).
"""

from __future__ import annotations

from livepp.serve.runner import Interrupts, serve_forever
from livepp.serve.service import ERROR_CODES, LOOPBACK_HOSTS, ServerConfig, Service

__all__ = ["ServerConfig", "LiveppServer", "Service", "serve_forever", "Interrupts", "ERROR_CODES", "LOOPBACK_HOSTS"]

# The service object under the name applications have used since 0.1.
LiveppServer = Service
