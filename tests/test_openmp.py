"""The thread that loaded the model gives up its OpenMP workers when a
continuous batch takes the forward passes to its own thread."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

linux_two_cores = pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                                     reason="counts threads in /proc on 2+ cores")


@linux_two_cores
def test_release_frees_the_calling_threads_openmp_workers():
    code = textwrap.dedent("""
        import os, torch
        from livepp.engines.torch.openmp import release_openmp_pool
        torch.set_num_threads(2)
        count = lambda: len(os.listdir("/proc/self/task"))
        before = count()
        torch.randn(1500, 1500) @ torch.randn(1500, 1500)  # a parallel region: this thread's pool
        with_pool = count()
        released = release_openmp_pool()
        print(before, with_pool, count(), released)
        torch.randn(1500, 1500) @ torch.randn(1500, 1500)  # and it comes back when needed
        print(count())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout.split()
    before, with_pool, after, released, again = int(out[0]), int(out[1]), int(out[2]), out[3], int(out[4])
    if released != "True":
        pytest.skip("this torch's OpenMP is not GNU libgomp with omp_pause_resource_all")
    assert with_pool == before + 1 and after == before and again == before + 1


@pytest.mark.parametrize("kind", ["torch", "llama.cpp"])
def test_making_a_batch_backend_releases_the_pool_of_the_thread_that_makes_it(decoder, monkeypatch, kind):
    import threading

    from livepp.engines import scheduler
    from livepp.engines.torch.engine import TorchEngine

    if kind == "llama.cpp":
        pytest.importorskip("llama_cpp", reason="install the test extras: pip install -e '.[test]'")
        from livepp.engines.llamacpp import LlamaCppEngine

        engine = LlamaCppEngine(max_rows=2)
    else:
        engine = TorchEngine(decoder)
    calls = []
    monkeypatch.setattr(scheduler, "release_openmp_pool", lambda: calls.append(threading.current_thread()) or True)
    backend = scheduler.backend_for(engine)
    assert backend.kind == kind and calls == [threading.current_thread()]
    if kind == "llama.cpp":
        backend.close()
        engine.close()
