"""Broker deliveries with Knative Eventing's OIDC tokens get in with keys on; nothing else does.

The tokens come from the fake API server (``issue_token``, as a TokenRequest would give them) and are checked
with the real ``kubernetes`` client's TokenReview against it, under the RBAC of the requester's manifests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kube_fake import FakeKube, load_role
from kubernetes import client
from test_requester_app import MODELS, FakeActuator

from conftest import REPO
from fma_common.errors import AuthUnavailable
from fma_requester.app import create_app
from fma_requester.oidc import EventSenders, Review, kube_reviewer
from fma_requester.registry import ModelRegistry
from fma_requester.settings import RequesterSettings

AUDIENCE = "fma-requester"
TRIGGER_SA = "system:serviceaccount:llm:fma-worker-warm-requested-oidc-eventing.knative.dev-trigger"
OLD_TRIGGER_SA = "system:serviceaccount:llm:oidc-eventing.knative.dev-trigger-fma-completion-requested"
SUBJECTS = ("system:serviceaccount:llm:*-oidc-eventing.knative.dev-trigger,"
            "system:serviceaccount:llm:oidc-eventing.knative.dev-trigger-*")
RBAC = (REPO / "knative" / "base" / "role.yaml", REPO / "knative" / "base" / "tokenreview-rbac.yaml")


@pytest.fixture()
def kube() -> Iterator[FakeKube]:
    fake = FakeKube(role=load_role(*RBAC)).start()
    yield fake
    fake.stop()


@pytest.fixture()
def app_client(kube: FakeKube):
    configuration = client.Configuration(host=kube.url)
    configuration.retries = False
    reviewer = kube_reviewer(client.ApiClient(configuration), timeout_s=5)
    registry = ModelRegistry.from_text(
        "models:\n" + "".join(f"  - {{name: {m}, source: 'embedded:smollm2-135m-instruct'}}\n" for m in MODELS))
    settings = RequesterSettings.from_env({
        "FMA_LOG_LEVEL": "warning", "FMA_API_KEYS": "infer-key", "FMA_ADMIN_KEYS": "admin-key",
        "FMA_EVENTS_OIDC_AUDIENCE": AUDIENCE, "FMA_EVENTS_OIDC_SUBJECTS": SUBJECTS})
    app = create_app(settings, registry=registry, actuator=FakeActuator(), token_reviewer=reviewer)
    return app.test_client()


def warm_event(client_, token: str | None, kind: str = "ai.llm-d.fma.worker.warm.requested"):
    headers = {"ce-specversion": "1.0", "ce-type": kind, "ce-source": "/broker", "ce-id": "e1",
               "ce-subject": MODELS[0]}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client_.post("/", json={"model": MODELS[0]}, headers=headers)


def test_a_trigger_delivery_with_its_oidc_token_is_served_even_a_control_event(app_client, kube: FakeKube):
    for sa in (TRIGGER_SA, OLD_TRIGGER_SA):
        resp = warm_event(app_client, kube.issue_token(sa, (AUDIENCE,)))
        assert resp.status_code == 200 and resp.headers["ce-type"] == "ai.llm-d.fma.worker.ready", resp.data
    assert [m for m, p in kube.requests if p.endswith("/tokenreviews")] == ["POST", "POST"]


def test_one_review_per_token_not_per_event(app_client, kube: FakeKube):
    token = kube.issue_token(TRIGGER_SA, (AUDIENCE,))
    for _ in range(5):
        assert warm_event(app_client, token).status_code == 200
    assert sum(p.endswith("/tokenreviews") for _, p in kube.requests) == 1


@pytest.mark.parametrize("who, audiences, ttl", [
    ("system:serviceaccount:llm:default", (AUDIENCE,), 3600),  # any pod can get a token for our audience
    ("system:serviceaccount:other:x-oidc-eventing.knative.dev-trigger", (AUDIENCE,), 3600),  # another namespace
    (TRIGGER_SA, ("https://kubernetes.default.svc",), 3600),  # a token for someone else
    (TRIGGER_SA, (AUDIENCE,), -10),  # expired
])
def test_tokens_that_are_not_an_allowed_trigger_for_our_audience_are_401(app_client, kube, who, audiences, ttl):
    resp = warm_event(app_client, kube.issue_token(who, audiences, ttl_s=ttl))
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "invalid_api_key"


def test_no_token_an_unknown_jwt_or_a_token_on_other_routes_is_401(app_client, kube: FakeKube):
    assert warm_event(app_client, None).status_code == 401
    assert warm_event(app_client, "eyJh.eyJz.c2ln").status_code == 401  # JWT-shaped, not issued
    token = kube.issue_token(TRIGGER_SA, (AUDIENCE,))
    resp = app_client.post("/v1/completions", json={"model": MODELS[0], "prompt": "x"},
                           headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 401, "a Trigger's token is good for events only"
    assert warm_event(app_client, "admin-key").status_code == 200, "keys still work on events"
    assert warm_event(app_client, "infer-key").status_code == 403, "an inference key may not warm"


def test_the_api_server_failing_the_review_is_a_503_the_broker_retries(app_client, kube: FakeKube):
    token = kube.issue_token(TRIGGER_SA, (AUDIENCE,))
    kube.fail_all = 500
    resp = warm_event(app_client, token)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert resp.get_json()["error"]["code"] == "auth_unavailable" and "ce-type" not in resp.headers
    kube.fail_all = None
    assert warm_event(app_client, token).status_code == 200, "a failure is not remembered as a refusal"


def test_without_the_cluster_role_the_review_is_forbidden_and_says_so(kube: FakeKube):
    kube.role = load_role(RBAC[0])  # the namespaced Role only
    configuration = client.Configuration(host=kube.url)
    senders = EventSenders(AUDIENCE, (TRIGGER_SA,), kube_reviewer(client.ApiClient(configuration), 5))
    with pytest.raises(AuthUnavailable, match="TokenReview failed"):
        senders.sender(f"Bearer {kube.issue_token(TRIGGER_SA, (AUDIENCE,))}")


def test_a_remembered_review_ends_with_the_token():
    now = [1000.0]
    calls: list[str] = []

    def review(token: str, audience: str) -> Review:
        calls.append(token)
        return Review(True, TRIGGER_SA, (audience,))

    senders = EventSenders(AUDIENCE, (TRIGGER_SA,), review, remember_s=60, clock=lambda: now[0])
    import base64
    import json

    def jwt(exp: float) -> str:
        body = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).decode().rstrip("=")
        return f"e30.{body}.sig"

    short = jwt(1010)
    assert senders.sender(f"Bearer {short}") == TRIGGER_SA
    now[0] = 1005
    assert senders.sender(f"Bearer {short}") == TRIGGER_SA and len(calls) == 1
    now[0] = 1011  # past the token's exp: asked again (the API server will say it expired)
    senders.sender(f"Bearer {short}")
    assert len(calls) == 2
    assert senders.sender("Bearer not-a-jwt") is None and len(calls) == 2, "API keys are never sent for review"


def _fake_jwt(i: int) -> str:
    return f"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4IiwiaSI6{i}fQ.sig{i}"


def test_made_up_tokens_cost_the_api_server_a_bounded_number_of_reviews_per_client():
    """Issue 21, defect 6: every POST / with a new JWT-shaped string cost a TokenReview, and a full cache was
    cleared wholesale (a Trigger's remembered token with it)."""
    from fma_common.errors import RateLimited

    now = [1000.0]
    calls: list[str] = []

    def review(token: str, audience: str) -> Review:
        calls.append(token)
        return Review(True, TRIGGER_SA, (audience,)) if token == "e30.good.sig" else Review(False, error="invalid")

    senders = EventSenders(AUDIENCE, (TRIGGER_SA,), review, max_entries=8, reviews_per_minute=60, burst=5,
                           clock=lambda: now[0])
    assert senders.sender("Bearer e30.good.sig", "10.0.0.9") == TRIGGER_SA
    refused = 0
    for i in range(50):  # one client making tokens up
        try:
            assert senders.sender(f"Bearer {_fake_jwt(i)}", "10.0.0.66") is None
        except RateLimited as exc:
            refused += 1
            assert exc.status == 429 and exc.headers["Retry-After"] == "1"
    assert len(calls) == 1 + 5 and refused == 45, "the burst, then 429s that cost the API server nothing"
    for i in range(20):  # many clients, one made-up token each: within their budgets, so reviewed
        senders.sender(f"Bearer {_fake_jwt(100 + i)}", f"10.1.0.{i}")
    assert senders.sender("Bearer e30.good.sig", "10.0.0.9") == TRIGGER_SA
    assert calls.count("e30.good.sig") == 1, "refusals never evict an accepted sender"
    assert senders.sender(f"Bearer {_fake_jwt(119)}", "10.1.0.19") is None
    assert calls.count(_fake_jwt(119)) == 1, "a refusal is remembered a while too"
    now[0] += 11
    senders.sender(f"Bearer {_fake_jwt(119)}", "10.1.0.19")
    assert calls.count(_fake_jwt(119)) == 2, "... only a short while"
    now[0] += 60  # the client's budget refills
    assert senders.sender(f"Bearer {_fake_jwt(200)}", "10.0.0.66") is None


def test_a_client_flooding_post_with_made_up_tokens_gets_429_and_the_api_server_a_bounded_load(app_client,
                                                                                             kube: FakeKube):
    answers = [warm_event(app_client, _fake_jwt(i)).status_code for i in range(40)]
    reviews = [m for m, p in kube.requests if p.endswith("/tokenreviews")]
    assert answers.count(401) == len(reviews) and 429 in answers
    assert len(reviews) <= 20, f"{len(reviews)} TokenReviews for 40 made-up tokens from one client"
    good = kube.issue_token(TRIGGER_SA, (AUDIENCE,))
    assert warm_event(app_client, good).status_code == 429, "this client's budget is spent, for new tokens too"


def test_made_up_tokens_claiming_ever_new_sources_are_bounded_all_together():
    from fma_common.errors import RateLimited

    calls: list[str] = []
    senders = EventSenders(AUDIENCE, (TRIGGER_SA,), lambda t, a: calls.append(t) or Review(False),
                           reviews_per_minute=60, burst=5, total_per_minute=120, clock=lambda: 1000.0)
    limited = 0
    for i in range(200):  # a different X-Forwarded-For each time
        try:
            senders.sender(f"Bearer {_fake_jwt(i)}", f"203.0.113.{i}")
        except RateLimited:
            limited += 1
    assert len(calls) == 20 and limited == 180, "the total budget's burst, whatever the sources claim"
