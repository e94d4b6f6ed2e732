"""Knative Eventing's validating webhook, for the objects the example deploys (knative/eventing ``knative-v1.22.2``).

The CRD schemas (``tests/data/knative-eventing-v1.22.2/``) leave much open
(``delivery`` is ``x-kubernetes-preserve-unknown-fields`` so that the
experimental fields can pass); the webhook is what refuses a bad value.
Rules, with the file each comes from:

* ``pkg/apis/duck/v1/delivery_types.go`` (``DeliverySpec.Validate``): ``retry`` >= 0; ``timeout`` an ISO 8601
  period above zero, allowed only while the flag ``delivery-timeout`` is enabled (it is by default:
  ``config/core/configmaps/features.yaml``); ``backoffPolicy`` ``linear`` or ``exponential``;
  ``backoffDelay`` an ISO 8601 period; ``retryAfterMax`` only with the alpha flag ``delivery-retryafter``
  (disabled by default); ``format`` ``json`` or ``binary``; the dead-letter sink a valid Destination.
* ``pkg/apis/eventing/v1/trigger_validation.go``: a ``broker`` (or ``brokerRef``, not both); filter attribute
  names ``^[a-z][a-z0-9]*$``; the subscriber a valid Destination; the delivery as above.
* ``pkg/apis/sources/v1/ping_validation.go``: a cron ``schedule`` (no ``@every``), ``data`` that is JSON when
  ``contentType`` is ``application/json``, a sink.
* ``pkg/apis/sources/v1/sinkbinding_validation.go``: a subject (and its namespace, if given, the binding's),
  a sink.
* ``knative.dev/pkg`` ``apis/duck/v1/destination.go``: a Destination has a ``ref`` (kind, name, apiVersion) or
  an absolute ``uri``; with a ref, ``uri`` may be a relative path. CloudEvent overrides: extension names are
  lowercase alphanumeric (``apis/duck/v1/source_types.go``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from broker_sim import iso8601_seconds

DEFAULT_FEATURES = {"delivery-timeout": "enabled", "delivery-retryafter": "disabled"}
ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9]*$")
EXTENSION_NAME = re.compile(r"^[a-z0-9]+$")
_CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def destination(dest: Mapping[str, Any] | None, path: str) -> list[str]:
    if not dest:
        return [f"{path}: missing field(s)"]
    errs = []
    ref, uri = dest.get("ref"), dest.get("uri")
    absolute = uri is not None and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]", uri) is not None
    if ref is None and uri is None:
        errs.append(f"{path}: expected at least one, got none: ref, uri")
    elif ref is not None and uri is not None and absolute:
        errs.append(f"{path}: Absolute URI is not allowed when Ref or [apiVersion, kind, name] is present")
    elif ref is None and not absolute:
        errs.append(f"{path}.uri: invalid value: Relative URI is not allowed when Ref and [apiVersion, kind, "
                    "name] is absent")
    elif ref is not None:
        for key in ("kind", "name", "apiVersion"):
            if not ref.get(key):
                errs.append(f"{path}.ref.{key}: missing field(s)")
    return errs


def delivery(spec: Mapping[str, Any] | None, path: str, features: Mapping[str, str]) -> list[str]:
    if spec is None:
        return []
    errs = []
    if "deadLetterSink" in spec:
        errs += destination(spec["deadLetterSink"], f"{path}.deadLetterSink")
    if int(spec.get("retry", 0)) < 0:
        errs.append(f"{path}.retry: invalid value: {spec['retry']}")
    if "timeout" in spec:
        if features.get("delivery-timeout") != "enabled":
            errs.append(f"{path}.timeout: must not set the field(s)")
        else:
            try:
                if iso8601_seconds(spec["timeout"]) <= 0:
                    raise ValueError
            except ValueError:
                errs.append(f"{path}.timeout: invalid value: {spec['timeout']}")
    if spec.get("backoffPolicy") not in (None, "linear", "exponential"):
        errs.append(f"{path}.backoffPolicy: invalid value: {spec['backoffPolicy']}")
    if "backoffDelay" in spec:
        try:
            iso8601_seconds(spec["backoffDelay"])
        except ValueError:
            errs.append(f"{path}.backoffDelay: invalid value: {spec['backoffDelay']}")
    if spec.get("format") not in (None, "json", "binary"):
        errs.append(f"{path}.format: invalid value: {spec['format']}")
    if "retryAfterMax" in spec:
        if features.get("delivery-retryafter") != "enabled":
            errs.append(f"{path}.retryAfterMax: must not set the field(s)")
        else:
            try:
                iso8601_seconds(spec["retryAfterMax"])
            except ValueError:
                errs.append(f"{path}.retryAfterMax: invalid value: {spec['retryAfterMax']}")
    return errs


def _ce_overrides(spec: Mapping[str, Any], path: str) -> list[str]:
    extensions = (spec.get("ceOverrides") or {}).get("extensions") or {}
    return [f"{path}.ceOverrides.extensions.{name}: invalid key name" for name in extensions
            if not EXTENSION_NAME.match(name)]


def cron_errors(schedule: str) -> list[str]:
    """robfig/cron's standard parser as PingSource builds it (five fields, or a descriptor; no @every)."""
    if "@every" in schedule:
        return ["unsupported descriptor @every"]
    if schedule.startswith("@"):
        return [] if schedule in ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
                                  "@hourly") else [f"unrecognized descriptor: {schedule}"]
    fields = schedule.split()
    if len(fields) not in (5, 6):
        return [f"expected 5 to 6 fields, found {len(fields)}: {schedule}"]
    errs = []
    for text, (lo, hi) in zip(fields[-5:], _CRON_RANGES, strict=True):
        if not _CRON_FIELD.match(text):
            errs.append(f"failed to parse field {text!r}")
            continue
        for part in text.split(","):
            for number in re.findall(r"\d+", part.split("/")[0]):
                if not lo <= int(number) <= hi:
                    errs.append(f"{number} out of range [{lo}, {hi}] in {text!r}")
    return errs


def errors(obj: Mapping[str, Any], features: Mapping[str, str] | None = None) -> list[str]:
    """What the webhook would refuse in ``obj`` (empty: admitted)."""
    features = {**DEFAULT_FEATURES, **(features or {})}
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    errs: list[str] = []
    if kind == "Broker":
        errs += delivery(spec.get("delivery"), "spec.delivery", features)
    elif kind == "Trigger":
        if not spec.get("broker") and not spec.get("brokerRef"):
            errs.append("spec.broker: missing field(s)")
        if spec.get("broker") and spec.get("brokerRef"):
            errs.append("spec: expected exactly one, got both: broker, brokerRef")
        for name in ((spec.get("filter") or {}).get("attributes") or {}):
            if not ATTRIBUTE_NAME.match(name):
                errs.append(f"spec.filter.attributes.{name}: invalid key name")
        errs += destination(spec.get("subscriber"), "spec.subscriber")
        errs += delivery(spec.get("delivery"), "spec.delivery", features)
    elif kind == "PingSource":
        errs += [f"spec.schedule: invalid value: {e}" for e in cron_errors(spec.get("schedule", "* * * * *"))]
        if spec.get("data") and spec.get("dataBase64"):
            errs.append("spec: expected exactly one, got both: data, dataBase64")
        if spec.get("contentType") == "application/json" and spec.get("data"):
            try:
                if not isinstance(json.loads(spec["data"]), dict):
                    raise ValueError
            except ValueError:
                errs.append("spec.data: invalid value: not a JSON object")
        errs += destination(spec.get("sink"), "spec.sink")
        errs += _ce_overrides(spec, "spec")
    elif kind == "SinkBinding":
        subject = spec.get("subject") or {}
        if not subject.get("apiVersion") or not subject.get("kind") or not (subject.get("name") or
                                                                             subject.get("selector")):
            errs.append("spec.subject: missing field(s)")
        ns = subject.get("namespace")
        if ns and ns != (obj.get("metadata") or {}).get("namespace"):
            errs.append(f"spec.subject.namespace: invalid value: {ns}")
        errs += destination(spec.get("sink"), "spec.sink")
        errs += _ce_overrides(spec, "spec")
    return errs
