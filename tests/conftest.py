"""Shared fixtures: the real embedded model (loaded once) and a scripted fake source."""

from __future__ import annotations

from typing import Iterator, Sequence

import pytest

from livepp.events import TokenRecord


class FakeSource:
    """A scripted token source: yields records for the given logprobs and
    counts how many the consumer pulled, to prove a stop ends production."""

    def __init__(self, logprobs: Sequence[float], *, finish_reason: str = "length") -> None:
        self.logprobs = list(logprobs)
        self.finish_reason = finish_reason
        self.produced = 0
        self.closed = False

    def __iter__(self) -> Iterator[TokenRecord]:
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
