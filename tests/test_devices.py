"""--device / --dtype on every command that loads a model, and models loaded
by Hub id from the local cache (never downloaded)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from livepp import Decoder, GenerationParams, LiveppError, load_model
from livepp.cli.main import main
from livepp.engines.torch.models import resolve_device, resolve_dtype

pytestmark = pytest.mark.model


def test_device_and_dtype_resolution():
    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda"
    elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(LiveppError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(LiveppError, match="unknown dtype"):
        resolve_dtype("int4", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(LiveppError, match="no CUDA device"):
            resolve_device("cuda")


def test_bfloat16_weights_still_give_float32_statistics(decoder):
    bf16 = Decoder(load_model(dtype="bfloat16", device="cpu", log=lambda m: None))
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    ids = decoder.encode("What is the capital of France?")
    params = GenerationParams(max_new_tokens=6, ignore_eos=True)
    low = list(bf16.stream(ids, params))
    full = list(decoder.stream(ids, params))
    assert len(low) == 6 and all(math.isfinite(r.logprob) and math.isfinite(r.entropy) for r in low)
    # Entropy is summed over the whole vocabulary in float32: a bfloat16 sum
    # would be off by far more than this.
    assert abs(low[0].entropy - full[0].entropy) < 0.25
    assert low[0].token_id == full[0].token_id


def test_cli_rejects_a_missing_gpu_and_an_uncached_hub_id():
    if not torch.cuda.is_available():
        out = CliRunner().invoke(main, ["generate", "hi", "--device", "cuda", "--max-new-tokens", "2"])
        assert out.exit_code == 2 and "no CUDA device" in out.output
    out = CliRunner().invoke(main, ["score", "-", "--model", "nobody/no-such-model"], input="Hello there.")
    assert out.exit_code == 2 and "not a model in the local Hugging Face cache" in out.output


def test_a_model_in_the_local_hub_cache_loads_by_id(loaded, tmp_path):
    # Lay the converted embedded model out as the Hub cache does.
    snapshot = tmp_path / "hub" / "models--local--smollm2" / "snapshots" / "0123abcd"
    shutil.copytree(Path(loaded.source if Path(loaded.source).is_dir() else _cache_dir_of(loaded)), snapshot)
    (tmp_path / "hub" / "models--local--smollm2" / "refs").mkdir()
    (tmp_path / "hub" / "models--local--smollm2" / "refs" / "main").write_text("0123abcd")
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "livepp.cli.main", "generate", "What is 2+2?", "--model", "local/smollm2",
                          "--max-new-tokens", "4", "--device", "cpu", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert events[0]["model"] == "local/smollm2" and events[-1]["type"] == "end" and events[-1]["n_tokens"] == 4


def _cache_dir_of(loaded):
    from livepp.engines.torch.models import _gguf_cache_key, cache_dir

    gguf = Path(loaded.source)
    return cache_dir() / f"{gguf.stem}-{_gguf_cache_key(gguf)}"
