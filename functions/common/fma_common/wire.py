"""OpenAI wire types: completions and chat completions, plus the worker's paths.

The worker validates with them; the requester documents its routes with them (its OpenAPI schemas), so they
live in the shared package a requester image or function carries without anything else of the worker.

Requests validate themselves (types, ranges, unsupported parameters) and turn
into :class:`SamplingParams`, the only thing the engine sees. Limits that
depend on the deployment (``max_tokens`` ceiling, ``n`` ceiling, context
window) are checked in :meth:`CompletionRequest.to_sampling_params` with the
worker's :class:`Limits`, so every bad-input case is a 400 with the field name.

Fields are strict: ``"max_tokens": "5"`` is a type error, not a silent cast.
Unknown fields are ignored (clients such as LangChain send extras), but known
OpenAI parameters we do not implement are rejected when set to a value that
would change the result (``logprobs``, ``suffix``, ``tools`` ...), so nobody
gets a silently different answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fma_common.errors import InvalidRequest, UnsupportedParameter

# ---- paths ---------------------------------------------------------------

PATH_HEALTH = "/health"
PATH_READY = "/ready"
# Knative's readiness probe: the model is loaded, awake or asleep, so the pod can take control calls. A sleeping
# pod must stay ready to Knative (a not-ready pod keeps its PodAutoscaler activating, and a release would then
# leave it for the progress deadline); the requester, not readiness, keeps inference off a sleeping worker.
PATH_LOADED = "/loaded"
PATH_METRICS = "/metrics"
PATH_MODELS = "/v1/models"
PATH_COMPLETIONS = "/v1/completions"
PATH_CHAT = "/v1/chat/completions"
PATH_SLEEP = "/sleep"
PATH_WAKE = "/wake_up"
PATH_IS_SLEEPING = "/is_sleeping"
PATH_CLOUDEVENTS = "/"

MAX_STOP_SEQUENCES = 4  # OpenAI's limit; more is almost always a client bug
_TOKEN_ID = re.compile(r"-?[0-9]{1,12}")


@dataclass(frozen=True)
class Limits:
    """Deployment limits a request is checked against."""

    max_tokens: int
    max_n: int
    context_length: int
    default_completion_tokens: int = 16  # OpenAI's documented default for /v1/completions
    # Used when a request leaves them out: the model's own recommendation
    # (generation_config.json, as vLLM does) unless the deployment overrides it.
    default_temperature: float = 1.0
    default_top_p: float = 1.0


@dataclass(frozen=True)
class SamplingParams:
    """What the engine needs to generate; built only from validated requests."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    # torch.Generator.manual_seed takes [-2**63, 2**64 - 1]; anything else would be a 500.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(items)}")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must not be empty strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            # ASCII digits only: str.isdigit() accepts "²", which int() then refuses.
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids as strings, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {bias}")
        return value

    @model_validator(mode="after")
    def _check_stream_options(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_tokens: int, limits: Limits, vocab_size: int) -> SamplingParams:
        if self.n > limits.max_n:
            raise InvalidRequest(f"n must be <= {limits.max_n} on this worker, got {self.n}", param="n")
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            token = int(key)
            if not 0 <= token < vocab_size:
                raise InvalidRequest(f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})",
                                     param="logit_bias")
            bias[token] = value
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=limits.default_temperature if self.temperature is None else self.temperature,
            top_p=limits.default_top_p if self.top_p is None else self.top_p,
            n=self.n,
            seed=self.seed,
            stop=self.stop_tuple(),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=bias,
        )


def resolve_max_tokens(requested: int | None, prompt_tokens: int, limits: Limits, default: int,
                       param: str = "max_tokens") -> int:
    """Check ``max_tokens`` against the limit and the context window.

    Mirrors OpenAI's wording so clients that parse it keep working.
    """
    if requested is not None and requested > limits.max_tokens:
        raise InvalidRequest(
            f"{param} is {requested}, above this worker's limit of {limits.max_tokens}; ask for fewer tokens",
            param=param)
    room = limits.context_length - prompt_tokens
    if room <= 0:
        raise InvalidRequest(
            f"This model's maximum context length is {limits.context_length} tokens. However, your prompt has "
            f"{prompt_tokens} tokens. Please shorten your prompt.", param="prompt", code="context_length_exceeded")
    if requested is None:
        return max(1, min(default, limits.max_tokens, room))
    if requested > room:
        raise InvalidRequest(
            f"This model's maximum context length is {limits.context_length} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the completion). "
            f"Please reduce the prompt or {param}.", param=param, code="context_length_exceeded")
    return requested


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be an empty list")
            if any(isinstance(v, list) and not v for v in value):
                raise ValueError("a token-id prompt must not be empty")
        return value

    @model_validator(mode="after")
    def _check_unsupported(self) -> CompletionRequest:
        if self.logprobs is not None:
            raise UnsupportedParameter("logprobs is not supported by this worker; remove it", param="logprobs")
        if self.suffix:
            raise UnsupportedParameter("suffix (insertion) is not supported by this model; remove it", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedParameter("best_of is not supported; remove it or set it equal to n", param="best_of")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (string or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def to_sampling_params(self, prompt_tokens: int, limits: Limits, vocab_size: int) -> SamplingParams:
        max_tokens = resolve_max_tokens(self.max_tokens, prompt_tokens, limits, limits.default_completion_tokens)
        return self._sampling(max_tokens, limits, vocab_size)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``.

    Every optional property of OpenAI's ``CreateChatCompletionRequest`` is honoured, accepted where it cannot
    change the answer, or refused by name (``tests/test_openai_conformance.py`` holds the table, generated into
    ``docs/openai-conformance.md``): a client that asked for audio, moderation, tools or stored completions
    must not get a plain text answer with no word why.
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # only means something with tools
    functions: list[Any] | None = None  # the deprecated form of tools
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    moderation: Any = None
    web_search_options: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    # Accepted, no effect on the answer: stored-completion tags (nothing is stored), a latency hint (the answer
    # is the model's own either way), and routing and abuse-tracking identifiers.
    metadata: dict[str, str] | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None

    @model_validator(mode="after")
    def _check_unsupported(self) -> ChatCompletionRequest:
        refusals: tuple[tuple[str, bool, str], ...] = (
            ("logprobs", bool(self.logprobs), "logprobs are not supported by this worker; remove logprobs"),
            ("top_logprobs", bool(self.top_logprobs),
             "top_logprobs is not supported by this worker (no logprobs); remove top_logprobs"),
            ("tools", bool(self.tools), "tool calling is not supported by this model; remove tools"),
            ("functions", bool(self.functions),
             "function calling is not supported by this model; remove functions"),
            ("function_call", self.function_call not in (None, "none"),
             "function calling is not supported by this model; remove function_call"),
            ("tool_choice", self.tool_choice not in (None, "none", "auto"),
             "tool_choice is not supported by this model (no tools); remove tool_choice"),
            ("response_format", bool(self.response_format) and self.response_format.get("type", "text") != "text",
             "only response_format {'type': 'text'} is supported; structured outputs are not"),
            ("modalities", any(m != "text" for m in self.modalities or ()),
             "this model answers in text only; ask for modalities ['text']"),
            ("audio", self.audio is not None, "audio output is not supported by this model; remove audio"),
            ("moderation", self.moderation is not None,
             "moderated completions are not supported by this server; remove moderation"),
            ("web_search_options", self.web_search_options is not None,
             "web search is not supported by this server; remove web_search_options"),
            ("reasoning_effort", self.reasoning_effort not in (None, "none"),
             "reasoning_effort is not supported by this model (it does not reason); remove it"),
            ("verbosity", self.verbosity not in (None, "medium"),
             "verbosity is not supported by this model; remove it or send 'medium'"),
            ("service_tier", self.service_tier not in (None, "auto", "default"),
             "this server has one service tier; send 'auto' or 'default', or leave service_tier out"),
            ("store", bool(self.store),
             "stored completions are not supported (nothing is kept after the answer); remove store or send false"),
        )
        for param, refused, why in refusals:
            if refused:
                raise UnsupportedParameter(why, param=param)
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise InvalidRequest("max_tokens and max_completion_tokens disagree; send one of them",
                                 param="max_completion_tokens")
        return self

    def chat_messages(self) -> list[dict[str, str]]:
        # The SmolLM2 template knows system/user/assistant; "developer" is the
        # newer OpenAI name for a system message.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]

    def to_sampling_params(self, prompt_tokens: int, limits: Limits, vocab_size: int) -> SamplingParams:
        requested = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        # A chat answer should be allowed to finish: default to the whole limit.
        max_tokens = resolve_max_tokens(requested, prompt_tokens, limits, limits.max_tokens, param=param)
        return self._sampling(max_tokens, limits, vocab_size)


class ReadyQuery(BaseModel):
    """``GET /ready?wait=S``: hold the answer until the model is ready (or failed), at most S seconds.

    Readiness pushed to the one who waits instead of polled: the answer leaves the moment loading ends. Without
    ``wait`` the probe answers at once, as Kubernetes expects.
    """

    model_config = ConfigDict(extra="ignore")
    wait: float | None = Field(default=None, ge=0, le=30)


class SleepQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    level: Literal[1, 2] = 1


# ---- responses -------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    # No system_fingerprint: OpenAI's schema has it a string, never null, and there is no backend
    # configuration to fingerprint beyond the model; so it is left out, as the schema allows.


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None  # required by OpenAI's schema (null: this model never refuses in a separate field)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fma"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- the routes, for the OpenAPI document (GET /openapi.json; a test keeps them equal to the app's) ----------

PATH_OPENAPI = "/openapi.json"


def routes() -> list[Any]:
    from fma_common.openapi import Route
    from fma_common.wire_embeddings import PATH_EMBEDDINGS, EmbeddingRequest, EmbeddingResponse

    gen = (400, 404, 413, 429, 503)
    return [
        Route("GET", PATH_HEALTH, "liveness: the process answers", answer="json"),
        Route("GET", PATH_READY, "readiness: 200 once the model is loaded; `wait` holds the answer until then",
              query=ReadyQuery, answer="text", errors=(400, 503)),
        Route("GET", PATH_LOADED, "200 once the model is loaded, awake or asleep (Knative's readiness probe: "
              "the pod takes control calls); 503 while loading or failed", answer="text", errors=(503,)),
        Route("GET", PATH_METRICS, "Prometheus metrics", answer="text", errors=()),
        Route("GET", PATH_OPENAPI, "this document", errors=()),
        Route("GET", PATH_MODELS, "the one model served here", answer=ModelList, auth="worker", errors=()),
        Route("POST", PATH_COMPLETIONS, "OpenAI completions", body=CompletionRequest, answer=CompletionResponse,
              streams=True, auth="worker", errors=gen),
        Route("POST", PATH_CHAT, "OpenAI chat completions", body=ChatCompletionRequest,
              answer=ChatCompletionResponse, streams=True, auth="worker", errors=gen),
        Route("POST", PATH_EMBEDDINGS, "OpenAI embeddings (a model of kind embedding)", body=EmbeddingRequest,
              answer=EmbeddingResponse, auth="worker", errors=gen),
        Route("POST", PATH_SLEEP, "vLLM sleep: level 1 keeps the weights in host memory, level 2 drops them",
              query=SleepQuery, auth="worker", errors=(400, 409, 503)),
        Route("POST", PATH_WAKE, "wake, verified by the canary", auth="worker", errors=(503,)),
        Route("GET", PATH_IS_SLEEPING, "vLLM is_sleeping", auth="worker", errors=()),
        Route("POST", PATH_CLOUDEVENTS, "a completion as a CloudEvent; the reply is one", body="cloudevent",
              answer="cloudevent", auth="worker", errors=(400, 415, 429, 503)),
    ]
