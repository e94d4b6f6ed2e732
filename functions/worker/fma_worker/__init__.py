"""fma_worker: an OpenAI-compatible inference server for one model."""
