"""The engine: requests, scheduling, KV-cache blocks, running the model, outputs."""
