"""OpenAI completions and chat completions on top of the engine.

Plain Python: takes validated requests, returns response models or an
:class:`SSEStream`. Nothing here imports Flask.

A request goes: model name check -> engine can serve? -> tokenize and check
limits (all 4xx happen here, before any queueing) -> admission slot (429 when
full) -> engine use count -> generation -> release. For streams the slot and
the use count are held until the stream ends or the client goes away.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fma_common.errors import ApiError, InternalError, InvalidRequest, ModelNotFound
from fma_common.http import SSE_DONE, sse_error, sse_event
from fma_common.wire import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Limits,
    ModelCard,
    ModelList,
    SamplingParams,
    Usage,
)

from .admission import Admission, Lease
from .engine import Engine
from .generation import ChoiceDelta
from .metrics import WorkerMetrics
from .settings import WorkerSettings

log = logging.getLogger("fma.worker.serving")


class SSEStream:
    """An SSE body that releases its slot exactly once, however it ends.

    gunicorn calls ``close()`` when the client disconnects or the body is
    exhausted; a generator that never started would not run its ``finally``,
    so release is tied to ``close`` as well.
    """

    def __init__(self, chunks: Iterator[bytes], on_close: Callable[[], None]) -> None:
        self._chunks = chunks
        self._on_close = on_close
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._chunks
        finally:
            self.close()  # exhausted: free the slot now, not when the server gets round to it

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._chunks, "close", None)
            if close:
                close()
        finally:
            self._on_close()


@dataclass
class _Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    echo_text: str


def admit(admission: Admission, engine: Engine, metrics: WorkerMetrics, model: str, rows: int, width: int) -> Lease:
    """A place in the worker's one queue, then the engine in use (the model may have gone to sleep while the
    request queued); every endpoint's requests wait here alike, and are counted alike."""
    try:
        lease = admission.acquire(rows, width)
    except ApiError:
        metrics.rejected.labels(model, "queue_full").inc()
        raise
    finally:
        metrics.queued.labels(model).set(admission.waiting)
    try:
        engine.begin_use()
    except BaseException:
        lease.release()
        raise
    metrics.queue_wait.labels(model).observe(lease.waited_s)
    return lease


class CompletionService:
    def __init__(self, settings: WorkerSettings, engine: Engine, admission: Admission,
                 metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.engine = engine
        self.admission = admission
        self.metrics = metrics

    # ---- helpers ------------------------------------------------------------

    def limits(self) -> Limits:
        return Limits(max_tokens=self.settings.max_tokens, max_n=self.settings.max_n,
                      context_length=self.engine.context_length,
                      default_temperature=self.engine.default_temperature,
                      default_top_p=self.engine.default_top_p)

    def check_model(self, name: str) -> None:
        if name != self.settings.model:
            raise ModelNotFound(f"model {name!r} is not served here; this worker serves {self.settings.model!r}",
                                param="model")

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.settings.model, created=self.engine.created,
                                         max_model_len=self.engine.context_length or None)])

    def _admit(self, rows: int, width: int) -> Lease:
        return admit(self.admission, self.engine, self.metrics, self.settings.model, rows, width)

    def _steps(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[list[ChoiceDelta]]:
        """The engine's steps; however the caller stops (done, error, client gone), the batch is left."""
        stream = self.engine.generate(prompt_ids, params)
        try:
            yield from stream
        finally:
            stream.close()

    def _finish(self, lease: Lease) -> None:
        self.engine.end_use()
        lease.release()

    def _log(self, kind: str, prompt_tokens: int, completion_tokens: int, started: float,
             first_token_at: float | None, prompt_text: str | None = None) -> None:
        total = time.monotonic() - started
        ttft = (first_token_at - started) if first_token_at else None
        rate = completion_tokens / total if total > 0 else 0.0
        extra = f" prompt={prompt_text!r}" if self.settings.log_prompts and prompt_text is not None else ""
        log.info("%s model=%s prompt_tokens=%d completion_tokens=%d ttft=%s total=%.3fs tok/s=%.1f%s",
                 kind, self.settings.model, prompt_tokens, completion_tokens,
                 f"{ttft:.3f}s" if ttft is not None else "-", total, rate, extra)
        self.metrics.prompt_tokens.labels(self.settings.model).inc(prompt_tokens)
        self.metrics.completion_tokens.labels(self.settings.model).inc(completion_tokens)

    # ---- /v1/completions ----------------------------------------------------

    def _prepare_completion(self, req: CompletionRequest) -> list[_Prepared]:
        prompts = req.prompts()
        if len(prompts) > self.settings.max_prompts:
            raise InvalidRequest(f"at most {self.settings.max_prompts} prompts per request, got {len(prompts)}",
                                 param="prompt")
        prepared = []
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = self.engine.encode(prompt)
                echo = prompt
            else:
                self.engine.check_token_ids(prompt)
                ids = list(prompt)
                echo = self.engine.decode(ids) if req.echo else ""
            if not ids:
                raise InvalidRequest("prompt is empty after tokenization; send some text", param="prompt")
            params = req.to_sampling_params(len(ids), self.limits(), self.engine.vocab_size)
            prepared.append(_Prepared(ids, params, echo if req.echo else ""))
        return prepared

    def complete(self, req: CompletionRequest) -> CompletionResponse | SSEStream:
        started = time.monotonic()
        self.check_model(req.model)
        self.engine.check_serving()
        prepared = self._prepare_completion(req)
        # Prompts of one request run one after another: its n rows may grow to the longest of them.
        lease = self._admit(req.n, max(len(p.prompt_ids) + p.params.max_tokens for p in prepared))
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            chunks = self._stream_completion(req, prepared, rid, created, started)
            return SSEStream(chunks, lambda: self._finish(lease))
        try:
            return self._run_completion(req, prepared, rid, created, started)
        finally:
            self._finish(lease)

    def _run_completion(self, req: CompletionRequest, prepared: list[_Prepared], rid: str, created: int,
                        started: float) -> CompletionResponse:
        n = req.n
        choices: list[CompletionChoice] = []
        prompt_total = completion_total = 0
        first_token_at: float | None = None
        for p_index, prep in enumerate(prepared):
            texts = [prep.echo_text] * n
            reasons: list[str | None] = [None] * n
            counts = [0] * n
            for step in self._steps(prep.prompt_ids, prep.params):
                if first_token_at is None:
                    first_token_at = time.monotonic()
                    self.metrics.ttft.labels(self.settings.model).observe(first_token_at - started)
                for d in step:
                    texts[d.index] += d.text
                    reasons[d.index] = d.finish_reason
                    counts[d.index] = d.completion_tokens
            prompt_total += len(prep.prompt_ids)
            completion_total += sum(counts)
            choices += [CompletionChoice(index=p_index * n + i, text=texts[i], finish_reason=reasons[i])  # type: ignore[arg-type]
                        for i in range(n)]
        self._log("completion", prompt_total, completion_total, started, first_token_at,
                  prompt_text=str(req.prompt))
        return CompletionResponse(id=rid, created=created, model=self.settings.model, choices=choices,
                                  usage=Usage(prompt_tokens=prompt_total, completion_tokens=completion_total,
                                              total_tokens=prompt_total + completion_total))

    def _stream_completion(self, req: CompletionRequest, prepared: list[_Prepared], rid: str, created: int,
                           started: float) -> Iterator[bytes]:
        n = req.n
        prompt_total = completion_total = 0
        first_token_at: float | None = None

        def chunk(index: int, text: str, reason: str | None) -> bytes:
            return sse_event({"id": rid, "object": "text_completion", "created": created,
                              "model": self.settings.model,
                              "choices": [{"index": index, "text": text, "logprobs": None,
                                           "finish_reason": reason}]})

        try:
            for p_index, prep in enumerate(prepared):
                counts = [0] * n
                if prep.echo_text:
                    for i in range(n):
                        yield chunk(p_index * n + i, prep.echo_text, None)
                for step in self._steps(prep.prompt_ids, prep.params):
                    if first_token_at is None:
                        first_token_at = time.monotonic()
                        self.metrics.ttft.labels(self.settings.model).observe(first_token_at - started)
                    for d in step:
                        counts[d.index] = d.completion_tokens
                        if d.text or d.finish_reason:
                            yield chunk(p_index * n + d.index, d.text, d.finish_reason)
                prompt_total += len(prep.prompt_ids)
                completion_total += sum(counts)
            if req.include_usage:
                yield sse_event({"id": rid, "object": "text_completion", "created": created,
                                 "model": self.settings.model, "choices": [],
                                 "usage": {"prompt_tokens": prompt_total, "completion_tokens": completion_total,
                                           "total_tokens": prompt_total + completion_total}})
            yield SSE_DONE
        except ApiError as exc:
            yield sse_error(exc)
        except Exception:
            log.exception("completion stream failed")
            yield sse_error(InternalError("generation failed; see the worker log"))
        finally:
            self._log("completion(stream)", prompt_total, completion_total, started, first_token_at,
                      prompt_text=str(req.prompt))

    # ---- /v1/chat/completions ------------------------------------------------

    def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse | SSEStream:
        started = time.monotonic()
        self.check_model(req.model)
        self.engine.check_serving()
        messages = req.chat_messages()
        prompt_ids = self.engine.render_chat(messages)
        params = req.to_sampling_params(len(prompt_ids), self.limits(), self.engine.vocab_size)
        lease = self._admit(params.n, len(prompt_ids) + params.max_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            chunks = self._stream_chat(req, prompt_ids, params, rid, created, started)
            return SSEStream(chunks, lambda: self._finish(lease))
        try:
            n = params.n
            texts = [""] * n
            reasons: list[str | None] = [None] * n
            counts = [0] * n
            first_token_at: float | None = None
            for step in self._steps(prompt_ids, params):
                if first_token_at is None:
                    first_token_at = time.monotonic()
                    self.metrics.ttft.labels(self.settings.model).observe(first_token_at - started)
                for d in step:
                    texts[d.index] += d.text
                    reasons[d.index] = d.finish_reason
                    counts[d.index] = d.completion_tokens
            completion = sum(counts)
            self._log("chat", len(prompt_ids), completion, started, first_token_at,
                      prompt_text=str(messages))
            return ChatCompletionResponse(
                id=rid, created=created, model=self.settings.model,
                choices=[ChatChoice(index=i, message=AssistantMessage(content=texts[i]),
                                    finish_reason=reasons[i])  # type: ignore[arg-type]
                         for i in range(n)],
                usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion,
                            total_tokens=len(prompt_ids) + completion))
        finally:
            self._finish(lease)

    def _stream_chat(self, req: ChatCompletionRequest, prompt_ids: list[int], params: SamplingParams, rid: str,
                     created: int, started: float) -> Iterator[bytes]:
        n = params.n
        counts = [0] * n
        first_token_at: float | None = None

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
            # Deltas omit unset keys ({} on the final chunk), as OpenAI's do.
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.settings.model,
                    "choices": [{"index": c.index, "delta": c.delta.model_dump(exclude_none=True), "logprobs": None,
                                 "finish_reason": c.finish_reason} for c in choices]}
            if usage is not None:
                body["usage"] = usage.model_dump()
            return sse_event(body)

        try:
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                         for i in range(n)])
            for step in self._steps(prompt_ids, params):
                if first_token_at is None:
                    first_token_at = time.monotonic()
                    self.metrics.ttft.labels(self.settings.model).observe(first_token_at - started)
                content, finished = [], []
                for d in step:
                    counts[d.index] = d.completion_tokens
                    if d.text:
                        content.append(ChatChunkChoice(index=d.index, delta=ChatDelta(content=d.text)))
                    if d.finish_reason:
                        finished.append(ChatChunkChoice(index=d.index, delta=ChatDelta(),
                                                        finish_reason=d.finish_reason))  # type: ignore[arg-type]
                # Like OpenAI: text chunks first, then a chunk with an empty delta and the finish_reason.
                if content:
                    yield chunk(content)
                if finished:
                    yield chunk(finished)
            if req.include_usage:
                total = sum(counts)
                yield chunk([], Usage(prompt_tokens=len(prompt_ids), completion_tokens=total,
                                      total_tokens=len(prompt_ids) + total))
            yield SSE_DONE
        except ApiError as exc:
            yield sse_error(exc)
        except Exception:
            log.exception("chat stream failed")
            yield sse_error(InternalError("generation failed; see the worker log"))
        finally:
            self._log("chat(stream)", len(prompt_ids), sum(counts), started, first_token_at,
                      prompt_text=str(req.chat_messages()))
