"""Validate objects against a vendored CRD's ``openAPIV3Schema``, the way the API server would.

The Kubernetes structural-schema extensions become JSON Schema:
``x-kubernetes-int-or-string`` is an integer or a string,
``x-kubernetes-preserve-unknown-fields`` keeps any field, ``nullable`` allows
``null``. Everywhere else an object accepts only the fields its schema
lists, as ``kubectl apply`` (strict field validation, the default since
Kubernetes 1.27) does: a typo in a manifest is an error, not a silently
pruned field.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DATA = Path(__file__).parent / "data" / "knative-serving-v1.23.0"
EVENTING = Path(__file__).parent / "data" / "knative-eventing-v1.22.2"


def to_json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k not in ("nullable", "format")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@cache
def schema(kind: str, data: Path = DATA) -> dict[str, Any]:
    crd = yaml.safe_load((data / f"{kind}.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    root = to_json_schema(version["schema"]["openAPIV3Schema"])
    # The API server always accepts these at the root, listed in a CRD's schema or not (Eventing's omit them).
    root.setdefault("properties", {})
    root["properties"].setdefault("apiVersion", {"type": "string"})
    root["properties"].setdefault("kind", {"type": "string"})
    root["properties"].setdefault("metadata", {"type": "object"})
    return root


def errors(obj: dict[str, Any], kind: str = "service", data: Path = DATA) -> list[str]:
    """Every schema violation of ``obj``, each as ``path: message``."""
    validator = jsonschema.Draft7Validator(schema(kind, data))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
