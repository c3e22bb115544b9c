"""Engines turn a prompt into token streams: the protocol, the local torch engine, the remote OpenAI-compatible engine."""
