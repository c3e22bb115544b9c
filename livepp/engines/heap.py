"""The garbage collector once a model is loaded.

Importing torch and transformers and loading a model leave some 300,000 to
400,000 objects that Python's cyclic collector tracks. The first full
collection after that walks all of them (150-200 ms here) and comes whenever
the allocation counts say so: in the middle of a generation, where it stalls
a token (in the service, every stream at once). Measured on the llama.cpp
engine, a batch of 8 rows of 128 tokens right after loading took a 157 ms full
collection; none came in the runs after it.

:func:`settle` takes that collection at load time instead. With ``freeze``
(a process of livepp's own: the service), what exists then also leaves all
later collections (``gc.freeze``), so a full collection walks only what was
made since; a library call never freezes its caller's objects.
"""

from __future__ import annotations

import gc

__all__ = ["settle"]


def settle(*, freeze: bool = False) -> None:
    """A full collection now (after a load); ``freeze``: then move every
    object that survives it out of later collections."""
    gc.collect()
    if freeze:
        gc.freeze()
