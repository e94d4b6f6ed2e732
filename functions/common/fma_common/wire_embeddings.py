"""OpenAI's embeddings wire types (``POST /v1/embeddings``).

``input`` takes the four shapes OpenAI documents: a string, a list of strings,
a list of token ids, or a list of lists of token ids; never empty, at most
2048 inputs (OpenAI's limit). ``encoding_format`` is ``float`` (a list of
numbers) or ``base64`` (the float32 vector's little-endian bytes, base64: what
the official SDK asks for by default and decodes with numpy). ``dimensions``
is honoured where the model has that many dimensions and refused otherwise: the
models served here were not trained to be truncated (OpenAI's own rule:
only models that support it), so a shorter vector would silently be a worse one.
"""

from __future__ import annotations

import base64
import struct
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_INPUTS = 2048  # OpenAI: "must not exceed 2048 dimensions" of the input array

PATH_EMBEDDINGS = "/v1/embeddings"


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: str | list[str] | list[int] | list[list[int]]):
        if isinstance(value, str):
            if not value:
                raise ValueError("input must not be an empty string")
            return value
        if not value:
            raise ValueError("input must not be an empty list")
        if len(value) > MAX_INPUTS and not isinstance(value[0], int):
            raise ValueError(f"at most {MAX_INPUTS} inputs per request, got {len(value)}")
        if isinstance(value[0], str) and any(not s for s in value):  # type: ignore[union-attr]
            raise ValueError("input strings must not be empty")
        if isinstance(value[0], list) and any(not ids for ids in value):  # type: ignore[union-attr]
            raise ValueError("token id lists must not be empty")
        return value

    def texts_or_ids(self) -> tuple[list[str] | None, list[list[int]] | None]:
        """(texts, None) or (None, token id lists), one entry per output vector."""
        value = self.input
        if isinstance(value, str):
            return [value], None
        if isinstance(value[0], str):
            return list(value), None  # type: ignore[arg-type]
        if isinstance(value[0], int):
            return None, [list(value)]  # type: ignore[arg-type]
        return None, [list(ids) for ids in value]  # type: ignore[union-attr]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector
