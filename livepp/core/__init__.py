"""The torch-free core: events, parameters, the tracker, policies, the monitor, sinks and traces.

Nothing here imports torch, transformers or anything above the core."""
