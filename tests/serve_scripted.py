"""`livepp serve` with a scripted engine, as its own process (for the
shutdown tests): prints the port once listening, serves until SIGINT or
SIGTERM. Needs only the service's dependencies (no torch).

    python serve_scripted.py [SHUTDOWN_GRACE]
"""

from __future__ import annotations

import asyncio
import sys

from scripted_engine import ScriptedEngine

from livepp.serve.app import LiveppServer, ServerConfig, serve_forever

BIG = [("x" * 4000, -1.0)] * 2000  # 8 MB per answer: more than socket buffers hold
SLOW = [("tick ", -0.5)] * 100_000  # a long answer, 100 tokens/s


def main() -> None:
    grace = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    # Not serial: each stream runs in its own thread, at its own pace.
    engine = ScriptedEngine({"big": BIG, "slow": SLOW}, default=[("ok", -0.5)], serial=False, delays={"slow": 0.01})
    server = LiveppServer(engine, ServerConfig(port=0, max_new_tokens_cap=100_000, shutdown_grace=grace))
    asyncio.run(serve_forever(server, ready=lambda port: print(port, flush=True)))
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
