"""Ctrl-C or SIGTERM with stalled clients connected: the process is out
within the shutdown grace plus a second or two, on Python 3.11 and on
Python 3.12 (whose ``Server.wait_closed`` waits for every open connection),
and a client that reads gets its last chunk and ``[DONE]``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.sync.client import connect

HERE = Path(__file__).parent
ROOT = HERE.parent
GRACE = 3.0
# The model side (torch and the rest) is not what the service needs to run a scripted engine.
MODEL_SIDE = ("torch", "transformers", "gguf", "accelerate", "safetensors", "matplotlib", "numpy")


def service_deps() -> list[str]:
    """pyproject's dependencies but the model side (livepp itself comes from the checkout through PYTHONPATH)."""
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if re.split(r"[<>=!\[ ;]", d, maxsplit=1)[0].lower() not in MODEL_SIDE]


def python312() -> str | None:
    """pyenv's Python 3.12, if this machine has one."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(root.glob("3.12*/bin/python3.12")) if root.is_dir() else []
    return str(found[-1]) if found else None


@pytest.fixture(scope="session")
def interpreters(tmp_path_factory):
    out = {"3.11+": sys.executable}
    py312 = python312()
    if py312 is not None and sys.version_info[:2] != (3, 12):
        venv = tmp_path_factory.mktemp("py312") / "venv"
        subprocess.run([py312, "-m", "venv", str(venv)], check=True)
        pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *service_deps()], capture_output=True, text=True, timeout=600)
        assert pip.returncode == 0, pip.stderr[-2000:]
        out["3.12"] = str(venv / "bin" / "python")
    return out


def stalled(port: int, request: bytes) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(request)
    return s


def post(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(data) + data)


@pytest.mark.parametrize("version", ["3.11+", "3.12"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_with_stalled_clients_is_prompt(interpreters, version, sig):
    python = interpreters.get(version)
    if python is None:
        pytest.skip(f"no Python {version} here (pyenv provides it on this machine kind)")
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([python, str(HERE / "serve_scripted.py"), str(GRACE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    sockets = []
    try:
        first = proc.stdout.readline()
        if not first.strip():
            proc.wait(10)
            pytest.fail(f"the server did not start on Python {version}: {proc.stderr.read()[-2000:]}")
        port = int(first)
        # Clients that read nothing: streamed and whole answers bigger than socket buffers, a websocket...
        sockets = [stalled(port, post({"model": "scripted", "prompt": "big", "max_tokens": 2000, "stream": i % 2 == 0})) for i in range(4)]
        ws = connect(f"ws://127.0.0.1:{port}/ws", max_size=None)
        ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ws.send(json.dumps({"type": "generate", "id": "w", "prompt": "big", "params": {"max_new_tokens": 2000}}))
        # ...an idle keep-alive connection, a half-sent request, and one client that reads a long stream.
        idle = stalled(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        half = stalled(port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
        sockets += [idle, half]
        reader = socket.create_connection(("127.0.0.1", port), timeout=30)
        reader.sendall(post({"model": "scripted", "prompt": "slow", "max_tokens": 100_000, "stream": True}))
        assert b"200 OK" in reader.recv(65536)
        time.sleep(1.0)
        started = time.perf_counter()
        proc.send_signal(sig)
        rest = b""
        while chunk := reader.recv(1 << 16):
            rest += chunk
        proc.wait(30)
        took = time.perf_counter() - started
    finally:
        for s in sockets:
            s.close()
        if proc.poll() is None:
            proc.kill()
    print(f"Python {version}, {signal.Signals(sig).name}: out in {took:.2f} s")
    assert proc.returncode in (0, -sig, 128 + sig) and "stopped" in proc.stdout.read()
    assert took <= GRACE + 3
    last = [line for line in rest.decode().split("\n") if line.startswith("data: ")][-2:]
    assert last[-1] == "data: [DONE]" and json.loads(last[0][6:])["choices"][0]["finish_reason"] == "abort"
