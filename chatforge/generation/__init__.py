"""The one engine (KV cache, batching, sampling, stop strings) and the Bot built on it."""
