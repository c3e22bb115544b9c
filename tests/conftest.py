"""Shared fixtures: the real embedded model (loaded once) and a scripted fake source."""

from __future__ import annotations

import os
import sys
from typing import Iterator, Sequence

import pytest

from livepp.core.events import TokenRecord
from livepp.core.stream import RecordStream

if os.environ.get("LIVEPP_FORBID_TORCH"):
    # For the torch-free checks (test_engine_protocol.py): importing torch or
    # transformers fails in this interpreter.
    import importlib.abc

    class _Forbid(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is forbidden in this run (LIVEPP_FORBID_TORCH)")
            return None

    sys.meta_path.insert(0, _Forbid())


class FakeSource(RecordStream):
    """A scripted token stream: yields records for the given logprobs and
    counts how many the consumer pulled, to prove a stop ends production."""

    def __init__(self, logprobs: Sequence[float], *, finish_reason: str = "length") -> None:
        self.logprobs = list(logprobs)
        self.last_finish_reason = finish_reason
        self.produced = 0
        self.closed = False
        super().__init__(self._records())

    def _records(self) -> Iterator[TokenRecord]:
        try:
            for i, lp in enumerate(self.logprobs):
                self.produced += 1
                last = i == len(self.logprobs) - 1
                yield TokenRecord(
                    token_id=i,
                    text=f"t{i} ",
                    logprob=lp,
                    entropy=1.0,
                    confidence=-lp,
                    finish_reason=self.last_finish_reason if last else None,
                )
        finally:
            self.closed = True


@pytest.fixture
def fake_source():
    return FakeSource


@pytest.fixture(scope="session")
def loaded():
    """The real embedded SmolLM2-135M-Instruct (converted once, then cached)."""
    from livepp import load_model

    return load_model()


@pytest.fixture(scope="session")
def decoder(loaded):
    from livepp import Decoder

    return Decoder(loaded)


@pytest.fixture(scope="session")
def llama_upstream(tmp_path_factory):
    """llama.cpp's own OpenAI-compatible server with the embedded GGUF: (base URL, log file)."""
    pytest.importorskip("llama_cpp.server", reason="install the test extras: pip install -e '.[test]'")
    from llama_server import llama_server

    log = tmp_path_factory.mktemp("llama-upstream") / "server.log"
    with llama_server(log) as url:
        yield url, log
