"""Vendor the schemas our OpenAI surface answers to, from OpenAI's published OpenAPI document.

    python tests/openai_spec/vendor.py PATH/TO/openapi.yaml COMMIT > tests/openai_spec/schemas.json

The document (github.com/openai/openai-openapi, ``openapi.yaml``) says OpenAPI 3.1 but writes nullability the
3.0 way (``nullable: true``, 111 times at f85dbe2), which a JSON Schema validator ignores: a property the
document allows to be null would then fail as a wrong type. :func:`to_json_schema` converts faithfully:

* ``nullable: true`` beside ``type`` adds ``"null"`` to the type (and ``None`` to an ``enum``);
  beside a ``$ref`` or a composition (no ``type``), the schema becomes ``anyOf: [itself, {"type": "null"}]``;
* ``$ref: "#/components/schemas/X"`` becomes ``"#/$defs/X"``;
* OpenAPI's own keywords (``discriminator``, ``x-...``, ``example``, ``deprecated``) and descriptions are
  dropped: a validator does not read them, and they are most of the document's bytes.

Only the closure of the roots' references is kept, so the file holds every schema they use and no other.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

ROOTS = (
    # responses
    "CreateCompletionResponse", "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
    "ListModelsResponse", "Model", "ErrorResponse", "CreateEmbeddingResponse", "Response", "ResponseStreamEvent",
    # requests: their optional properties are the property table's rows
    "CreateCompletionRequest", "CreateChatCompletionRequest", "CreateEmbeddingRequest",
)
DROP = {"description", "discriminator", "example", "examples", "deprecated", "title", "x-oaiMeta",
        "x-oaiTypeLabel", "x-oaiExpandable", "x-stainless-const", "externalDocs", "readOnly", "writeOnly", "xml"}
REF = "#/components/schemas/"


def to_json_schema(node: Any) -> Any:
    """One OpenAPI schema object as JSON Schema (2020-12), recursively."""
    if isinstance(node, list):
        return [to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROP or key.startswith("x-") or key == "nullable":
            continue
        if key == "$ref":
            if not value.startswith(REF):
                raise ValueError(f"a reference outside components/schemas: {value}")
            out[key] = "#/$defs/" + value[len(REF):]
        elif key in ("properties", "patternProperties", "$defs"):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key == "enum" or key == "const" or key == "default" or key == "required":
            out[key] = value
        else:
            out[key] = to_json_schema(value)
    if node.get("nullable") is True:
        if "type" in out:
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = [*types, "null"] if "null" not in types else types
            if "enum" in out and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def references(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(REF):
            found.add(ref[len(REF):])
        for value in node.values():
            found |= references(value)
    elif isinstance(node, list):
        for value in node:
            found |= references(value)
    return found


def closure(schemas: dict[str, Any], roots: tuple[str, ...]) -> list[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += sorted(references(schemas[name]) - seen)
    return sorted(seen)


def main() -> int:
    path, commit = sys.argv[1], sys.argv[2]
    with open(path, encoding="utf-8") as f:
        document = yaml.safe_load(f)
    schemas = document["components"]["schemas"]
    names = closure(schemas, ROOTS)
    out = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "source": {"repository": "https://github.com/openai/openai-openapi", "path": "openapi.yaml",
                   "commit": commit, "openapi": document["openapi"], "info_version": document["info"]["version"],
                   "converted_by": "tests/openai_spec/vendor.py"},
        "roots": list(ROOTS),
        "$defs": {name: to_json_schema(schemas[name]) for name in names},
    }
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
