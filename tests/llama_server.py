"""llama.cpp's own OpenAI-compatible server (``llama-cpp-python[server]``, a
test dependency) on a free loopback port, serving the GGUF file of the
embedded default model as "smollm2". Used by the remote-engine and gateway
tests and by ``benchmarks/gateway.py``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from livepp.engines.torch.models import default_model_path

MODEL_ALIAS = "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def llama_server(log: Path, *, n_ctx: int = 2048, threads: int | None = None) -> Iterator[str]:
    """Yields the server's base URL (``http://127.0.0.1:PORT/v1``); its output goes to ``log``."""
    port = free_port()
    args = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path()), "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", str(n_ctx), "--logits_all", "true", "--model_alias", MODEL_ALIAS]
    if threads is not None:
        args += ["--n_threads", str(threads)]
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(url + "/models", timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None:
                        raise RuntimeError(f"llama.cpp server exited: {log.read_text()[-2000:]}") from None
                    if time.time() > deadline:
                        raise RuntimeError("llama.cpp server did not start within 120 s") from None
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
