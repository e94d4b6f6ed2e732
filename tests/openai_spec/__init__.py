"""OpenAI's published API document, the parts our OpenAI surface answers to (see vendor.py)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMAS = Path(__file__).with_name("schemas.json")


@cache
def document() -> dict[str, Any]:
    return json.loads(SCHEMAS.read_text())


def validator(name: str, patch: dict[str, Any] | None = None) -> Draft202012Validator:
    """A validator for component ``name``; ``patch`` replaces whole components (where the document contradicts
    OpenAI's own API, each patch says so where it is made)."""
    defs = {**document()["$defs"], **(patch or {})}
    return Draft202012Validator({"$defs": defs, "$ref": f"#/$defs/{name}"})


def violations(name: str, instance: Any, patch: dict[str, Any] | None = None) -> list[str]:
    return [f"{name} at /{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}"
            for e in validator(name, patch).iter_errors(instance)]


def request_properties(name: str) -> tuple[dict[str, Any], set[str]]:
    """A request schema's top-level properties (``allOf`` and references followed) and its required ones."""
    defs = document()["$defs"]
    props: dict[str, Any] = {}
    required: set[str] = set()

    def walk(schema: dict[str, Any]) -> None:
        if "$ref" in schema:
            walk(defs[schema["$ref"].rsplit("/", 1)[1]])
        for part in schema.get("allOf", []):
            walk(part)
        props.update(schema.get("properties", {}))
        required.update(schema.get("required", []))

    walk(defs[name])
    return props, required
