"""``POST /v1/embeddings`` on a worker whose model is an encoder (``kind: embedding``).

Checks the request against the model (length, token ids, ``dimensions``),
admits it through the worker's one queue (a request counts as its rows, at
most the batch's, and its longest input), and hands its inputs to the engine's
embedding batcher, which shares forward passes between concurrent requests.
"""

from __future__ import annotations

import logging
import time

from fma_common.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from fma_common.wire_embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, encode_vector

from .admission import Admission
from .engine import Engine
from .metrics import WorkerMetrics
from .serving import admit
from .settings import WorkerSettings

log = logging.getLogger("fma.worker.embeddings")


class EmbeddingService:
    def __init__(self, settings: WorkerSettings, engine: Engine, admission: Admission,
                 metrics: WorkerMetrics) -> None:
        self.settings, self.engine, self.admission, self.metrics = settings, engine, admission, metrics

    def embed(self, req: EmbeddingRequest) -> EmbeddingResponse:
        started = time.monotonic()
        if req.model != self.settings.model:
            raise ModelNotFound(f"model {req.model!r} is not served here; this worker serves "
                                f"{self.settings.model!r}", param="model")
        self.engine.check_serving()
        dim = self.engine.embedding_dim
        if req.dimensions is not None and req.dimensions != dim:
            raise InvalidRequest(f"model {self.settings.model} makes {dim}-dimensional embeddings and was not "
                                 f"trained to be shortened; send dimensions: {dim} or leave it out",
                                 param="dimensions")
        texts, ids = req.texts_or_ids()
        rows = self.engine.encode_for_embedding(texts) if texts is not None else ids
        assert rows is not None
        limit = self.engine.max_input_tokens
        for i, row in enumerate(rows):
            if texts is None:
                self.engine.check_token_ids(row)
            if len(row) > limit:
                raise ContextLengthExceeded(f"input {i} is {len(row)} tokens; model {self.settings.model} takes at "
                                            f"most {limit} (special tokens included)", param="input")
        lease = admit(self.admission, self.engine, self.metrics, self.settings.model,
                      min(len(rows), self.settings.max_batch), max(map(len, rows)))
        try:
            vectors = self.engine.embed(rows)
        finally:
            self.engine.end_use()
            lease.release()
        tokens = sum(map(len, rows))
        self.metrics.prompt_tokens.labels(self.settings.model).inc(tokens)
        log.info("embeddings model=%s inputs=%d tokens=%d total=%.3fs", self.settings.model, len(rows), tokens,
                 time.monotonic() - started)
        data = [Embedding(index=i, embedding=encode_vector(v, req.encoding_format)) for i, v in enumerate(vectors)]
        return EmbeddingResponse(data=data, model=self.settings.model,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
