"""One OpenMP thread pool at a time: torch's forward passes on a thread of
their own (the continuous batch's scheduler) run as fast as on the main one.

torch's CPU kernels parallelise with OpenMP; with GNU OpenMP (libgomp, what
torch's Linux wheels link) every thread that has run a parallel region keeps
a pool of worker threads. Once the threads of all pools outnumber the CPUs,
libgomp's workers stop spinning between parallel regions and sleep (it
"throttles"), and a forward pass of hundreds of short regions pays a wake-up
for each: here, SmolLM2's forward pass of 30 tokens took 49 ms on a second
thread against 38 ms on the main thread that had loaded the model, and
38 ms again once the main thread's pool was freed
(``omp_pause_resource_all(omp_pause_hard)``, OpenMP 5.0, which frees the
calling thread's pool; it comes back if that thread runs a parallel region
again).
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["release_openmp_pool"]

_OMP_PAUSE_HARD = 2


def _libgomp() -> ctypes.CDLL | None:
    """torch's libgomp if this process has loaded it (never loads another)."""
    import torch  # noqa: F401 - loads torch's libgomp

    noload = getattr(os, "RTLD_NOLOAD", None)
    if noload is None:  # no way to ask for a library without loading it
        return None
    try:
        return ctypes.CDLL("libgomp.so.1", mode=noload | os.RTLD_NOW)
    except OSError:
        return None


def release_openmp_pool() -> bool:
    """Free the calling thread's OpenMP worker threads; whether it could
    (False without libgomp, e.g. macOS, or a libgomp before OpenMP 5.0)."""
    lib = _libgomp()
    pause = getattr(lib, "omp_pause_resource_all", None) if lib is not None else None
    if pause is None:
        return False
    pause.argtypes = [ctypes.c_int]
    pause.restype = ctypes.c_int
    return pause(_OMP_PAUSE_HARD) == 0
