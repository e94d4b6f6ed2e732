"""knative/eventing: rendered with kustomize, checked against Knative Eventing's CRDs and webhook rules, and
its Triggers evaluated the way the Broker filters events (tests/broker_sim.py) so that replies cannot loop."""

from __future__ import annotations

import json

import pytest
import yaml
from broker_sim import iso8601_seconds, trigger_matches
from crd_schema import EVENTING, errors
from eventing_webhook import cron_errors
from eventing_webhook import errors as webhook_errors
from test_manifests import by_kind, render

from conftest import REPO
from fma_requester import protocol as p
from fma_requester.registry import ModelRegistry

CRD_OF = {"Broker": "broker", "Trigger": "trigger", "SinkBinding": "sinkbindings", "PingSource": "pingsource"}
HANDLED = (p.COMPLETION_REQUESTED, p.WORKER_WARM_REQUESTED, p.WORKER_RELEASE_REQUESTED)
REQUESTER_REF = {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "fma-requester"}


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return render("knative/eventing")


def event(type_: str, **attrs: str) -> dict[str, str]:
    return {"specversion": "1.0", "id": "1", "source": p.EVENT_SOURCE, "type": type_, **attrs}


def requester_triggers(docs: list[dict]) -> list[dict]:
    return [t for t in by_kind(docs, "Trigger") if (t["spec"]["subscriber"].get("ref") or {}) == REQUESTER_REF]


def test_every_object_validates_against_the_eventing_crds_and_webhook(docs: list[dict]):
    kinds = {d["kind"] for d in docs}
    assert {"Broker", "Trigger", "SinkBinding", "PingSource"} <= kinds
    for d in docs:
        if d["kind"] in CRD_OF:
            assert errors(d, CRD_OF[d["kind"]], EVENTING) == [], d["metadata"]["name"]
            assert webhook_errors(d) == [], d["metadata"]["name"]
        assert d["metadata"].get("namespace", "fma-example") == "fma-example"


def test_the_schema_and_webhook_checks_catch_mistakes(docs: list[dict]):
    (trigger, *_) = by_kind(docs, "Trigger")
    typo = json.loads(json.dumps(trigger))
    typo["spec"]["subscribr"] = typo["spec"].pop("subscriber")
    # Eventing's CRDs keep unknown fields under spec (x-kubernetes-preserve-unknown-fields), so the API server
    # takes the typo; the webhook is what refuses the Trigger, for the subscriber it lacks.
    assert errors(typo, "trigger", EVENTING) == [] and "spec.subscriber: missing field(s)" in webhook_errors(typo)
    wrong = json.loads(json.dumps(trigger))
    wrong["spec"]["broker"] = 7
    assert errors(wrong, "trigger", EVENTING), "a listed field of the wrong type is refused by the schema"
    bad = json.loads(json.dumps(trigger))
    bad["spec"]["delivery"]["timeout"] = "10m"
    bad["spec"]["delivery"]["retryAfterMax"] = "PT1M"
    bad["spec"]["filter"]["attributes"]["Type"] = "x"
    found = webhook_errors(bad)
    assert any("timeout" in e for e in found) and any("retryAfterMax" in e for e in found) and \
        any("Type" in e for e in found)
    assert not any("retryAfterMax" in e for e in webhook_errors(bad, {"delivery-retryafter": "enabled"})), \
        "Retry-After needs the alpha flag delivery-retryafter"
    assert cron_errors("@every 5m") and cron_errors("61 * * * *") and not cron_errors("55 7 * * 1-5")


def test_one_exact_trigger_per_handled_type_delivers_to_the_requester(docs: list[dict]):
    triggers = requester_triggers(docs)
    for type_ in HANDLED:
        (t,) = [t for t in triggers if t["spec"].get("filter", {}).get("attributes", {}).get("type") == type_]
        assert t["spec"]["filter"]["attributes"] == {"type": type_}, "exact on type, nothing else"
        assert t["spec"]["broker"] == "fma" and "filters" not in t["spec"]
        assert trigger_matches(t["spec"], event(type_))
        assert not trigger_matches(t["spec"], event(type_ + ".v2")), "exact, not a prefix"
    others = [t for t in triggers if t["spec"]["filter"]["attributes"]["type"] not in HANDLED]
    assert [t["metadata"]["name"] for t in others] == ["fma-prewarm"], "and the scheduled pre-warm"


@pytest.mark.parametrize("type_", sorted(set(p.REPLY_TYPES) | set(p.LIFECYCLE_TYPES)))
def test_no_reply_or_lifecycle_event_reaches_the_requester_again(docs: list[dict], type_: str):
    """Replies go back into the Broker and are matched against every Trigger: none may lead to the requester."""
    for t in requester_triggers(docs):
        assert not trigger_matches(t["spec"], event(type_, subject="smollm2-135m-instruct", requestid="9")), \
            f"{type_} would loop through {t['metadata']['name']}"


def test_lifecycle_events_and_only_they_reach_the_event_log(docs: list[dict]):
    (t,) = by_kind(docs, "Trigger", "fma-lifecycle-log")
    assert t["spec"]["subscriber"]["ref"]["name"] == "fma-event-log"
    for type_ in p.LIFECYCLE_TYPES:
        assert trigger_matches(t["spec"], event(type_))
    for type_ in (*HANDLED, p.COMPLETION_SUCCEEDED, p.COMPLETION_FAILED, p.PING_TYPE):
        assert not trigger_matches(t["spec"], event(type_)), type_


def test_every_trigger_to_the_requester_carries_a_whole_delivery_sized_for_a_cold_start(docs: list[dict]):
    """A Trigger's delivery replaces the Broker's whole (pkg/reconciler/broker/trigger/trigger.go), so each one
    needs its retries and dead-letter sink. Each layer answers strictly before the one that retries it: a model's
    wait for its worker < the requester's deadline for an event (FMA_EVENTS_DEADLINE) < its Revision's
    timeoutSeconds (queue-proxy's cut) < the Trigger's delivery.timeout (the Broker's retry). Before issue 22 the
    Trigger's timeout equalled timeoutSeconds, so a long completion could be cut by the Broker and run again."""
    from fma_common.settings import parse_duration
    (broker,) = by_kind(docs, "Broker", "fma")
    requester = render("knative/overlays/examples/fma-requester")
    (svc,) = by_kind(requester, "Service", "fma-requester")
    timeout_seconds = svc["spec"]["template"]["spec"]["timeoutSeconds"]
    (cm,) = by_kind(requester, "ConfigMap", "fma-requester-config")
    longest_wait = max(spec.queue_timeout for spec in ModelRegistry.from_text(cm["data"]["models.yaml"]))
    env = {e["name"]: e.get("value") for e in svc["spec"]["template"]["spec"]["containers"][0]["env"]}
    deadline = parse_duration(env.get("FMA_EVENTS_DEADLINE", "540s"))
    assert longest_wait < deadline < timeout_seconds
    for d in [broker["spec"]["delivery"]] + [t["spec"]["delivery"] for t in requester_triggers(docs)]:
        assert d["retry"] >= 3 and d["backoffPolicy"] == "exponential"
        assert d["deadLetterSink"]["ref"]["name"] == "fma-event-log" and d["deadLetterSink"]["uri"] == "/dead-letter"
        assert timeout_seconds < iso8601_seconds(d["timeout"]), "the Broker gives up only after Knative would have"


def test_the_sinkbinding_gives_the_requester_the_broker(docs: list[dict]):
    (sb,) = by_kind(docs, "SinkBinding")
    subject = sb["spec"]["subject"]
    # By label, so the binding makes its OIDC token Secret before the requester exists (psbinding
    # ReconcileSubject stops at a named subject that is missing) and the requester is created with /oidc.
    assert "name" not in subject and {k: subject[k] for k in ("apiVersion", "kind")} == \
        {k: REQUESTER_REF[k] for k in ("apiVersion", "kind")}
    (requester,) = by_kind(render("knative/overlays/examples/fma-requester"), "Service", "fma-requester")
    labels = requester["metadata"]["labels"]
    assert subject["selector"]["matchLabels"].items() <= labels.items(), "the selector picks the requester"
    workers_labels = {"app.kubernetes.io/managed-by": "fma-requester", "llm-d.ai/role": "decode"}
    assert not subject["selector"]["matchLabels"].items() <= workers_labels.items(), "and not its workers"
    assert sb["spec"]["sink"]["ref"] == {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "name": "fma"}
    assert sb["spec"]["ceOverrides"]["extensions"], "K_CE_OVERRIDES carries something to see on every event"


def test_the_pingsource_prewarms_a_served_model_through_its_trigger(docs: list[dict]):
    (ping,) = by_kind(docs, "PingSource")
    (t,) = by_kind(docs, "Trigger", "fma-prewarm")
    # What the PingSource sends (pkg/adapter/mtping/runner.go, makeEvent): its fixed type, its source, the
    # overrides as extensions.
    sent = event(p.PING_TYPE, source=f"/apis/v1/namespaces/fma-example/pingsources/{ping['metadata']['name']}",
                 **ping["spec"]["ceOverrides"]["extensions"])
    assert trigger_matches(t["spec"], sent)
    assert not trigger_matches(t["spec"], event(p.PING_TYPE)), "other PingSources do not warm models"
    model = json.loads(ping["spec"]["data"])["model"]
    requester = render("knative/overlays/examples/fma-requester")
    (cm,) = by_kind(requester, "ConfigMap", "fma-requester-config")
    assert model in ModelRegistry.from_text(cm["data"]["models.yaml"]).names()


def test_the_event_log_runs_our_image_without_a_gpu_or_a_token(docs: list[dict]):
    (svc,) = by_kind(docs, "Service", "fma-event-log")
    pod = svc["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["fma", "event-log"] and c["image"].endswith("/fma-requester:latest")
    assert "nvidia.com/gpu" not in json.dumps(c["resources"]) and pod["automountServiceAccountToken"] is False
    assert svc["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"


def test_the_makefile_applies_eventing_before_the_requester():
    make = (REPO / "Makefile").read_text()
    deploy = make[make.index("\ndeploy:"):]
    assert deploy.index("OVERLAY=knative/eventing") < deploy.index("kubectl wait --for=condition=Ready broker/fma") \
        < deploy.index("OVERLAY=$(OVERLAY)")


def test_the_vendored_crds_say_where_they_come_from():
    source = (EVENTING / "SOURCE.md").read_text()
    assert "knative-v1.22.2" in source and "532b01f0cb2ce7bed271204697081e4264385531" in source
    for name in CRD_OF.values():
        crd = yaml.safe_load((EVENTING / f"{name}.yaml").read_text())
        assert any(v["name"] == "v1" and v["served"] for v in crd["spec"]["versions"])
