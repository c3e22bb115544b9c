"""The local torch engine: Hugging Face models, the streaming and batched decoders, sampling."""
