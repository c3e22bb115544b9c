"""Shared fixtures: the real embedded model (loaded once) and a scripted fake source."""

from __future__ import annotations

import os
import sys
from typing import Iterator, Sequence

import pytest

from livepp.core.events import TokenRecord

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


class FakeSource:
    """A scripted token stream: yields records for the given logprobs and
    counts how many the consumer pulled, to prove a stop ends production."""

    def __init__(self, logprobs: Sequence[float], *, finish_reason: str = "length") -> None:
        self.logprobs = list(logprobs)
        self.finish_reason = finish_reason
        self.prompt_token_ids: tuple[int, ...] = ()
        self.tokens_after_stop = None
        self.engine_finish_reason = None
        self.produced = 0
        self.closed = False
        self._gen = self._records()

    def __iter__(self) -> "FakeSource":
        return self

    def __next__(self) -> TokenRecord:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        self.closed = True

    def abort(self) -> None:
        pass

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
                    finish_reason=self.finish_reason if last else None,
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
