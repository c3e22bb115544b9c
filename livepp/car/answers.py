"""The answer a reply gives, as votes count it (CAR's vote route, DeepConf)."""

from __future__ import annotations

from livepp.car.tasks import last_number

__all__ = ["vote_key"]


def vote_key(text: str) -> str:
    """The answer a reply gives, for voting: its last number, else its normalised text."""
    number = last_number(text)
    return f"{number:g}" if number is not None else " ".join(text.lower().split()).strip(" .!")
