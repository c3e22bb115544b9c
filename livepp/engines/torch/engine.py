"""The local torch engine: a Hugging Face model behind the engine protocol.

``open`` encodes the prompt and returns the streaming decoder's token stream;
``open_batch`` decodes many prompts in one forward pass per step (rows that
share a prompt share its prefill). It is ``serial``: one thread at a time
drives the model.
"""

from __future__ import annotations

import os
from typing import Sequence

from livepp.core.params import GenerationParams
from livepp.engines.protocol import Prompt
from livepp.engines.torch.batch import BatchDecoder, BatchStream, batch_requests
from livepp.engines.torch.decoder import Decoder
from livepp.engines.torch.models import LoadedModel, load_model

__all__ = ["TorchEngine", "torch_engine"]


class TorchEngine:
    serial = True
    kind = "torch"

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.loaded = decoder.loaded
        self.name = decoder.loaded.name

    def encode(self, prompt: Prompt, *, raw: bool = False) -> list[int]:
        return self.decoder.encode(prompt, raw=raw)

    def open(self, prompt: Prompt, params: GenerationParams):  # -> RecordStream
        return self.decoder.stream(self.decoder.encode(prompt, raw=params.raw), params)

    def open_batch(self, prompts: Sequence[Prompt], params: Sequence[GenerationParams]) -> BatchStream:
        requests = batch_requests(self.decoder.encode, prompts, params)
        return BatchDecoder(self.decoder).stream(requests)


def torch_engine(model: "TorchEngine | Decoder | LoadedModel | str | os.PathLike[str] | None", *, device: str = "cpu",
                 dtype: str = "float32") -> TorchEngine:
    """A torch engine from an engine, a decoder, a loaded model, a path (or
    cached Hub id), or None for the embedded default model."""
    if isinstance(model, TorchEngine):
        return model
    if isinstance(model, Decoder):
        return TorchEngine(model)
    if isinstance(model, LoadedModel):
        return TorchEngine(Decoder(model))
    return TorchEngine(Decoder(load_model(model, device=device, dtype=dtype)))
