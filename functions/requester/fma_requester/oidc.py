"""Knative Eventing's sender identity: a Broker delivery's OIDC token, checked with a Kubernetes TokenReview.

Eventing (feature ``authentication-oidc``) sends each Trigger's deliveries with ``Authorization: Bearer
<JWT>``: a token of the Trigger's own ServiceAccount, requested for the subscriber's audience (the Trigger's
``spec.subscriber.audience``). The ServiceAccount is Eventing's, named after the Trigger
(``<trigger>-oidc-eventing.knative.dev-trigger``; before 1.15 ``oidc-eventing.knative.dev-trigger-<trigger>``;
``pkg/auth/serviceaccount.go``, ``GetOIDCServiceAccountNameForResource``). Such a sender has no API key, so
with keys on its events would be refused: here a token that is no API key is shown to the API server
(``TokenReview`` with our audience), and accepted when it is authenticated for that audience *and* its user
matches one of ``FMA_EVENTS_OIDC_SUBJECTS``. The audience alone proves nothing: any pod may request a token of
its own ServiceAccount for any audience. A review is remembered for a minute (never past the token's ``exp``)
so a busy Trigger costs one review a minute, not one per event. The API server failing is a 503: the Broker
retries, and no event is refused for our outage.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fma_common.errors import AuthUnavailable

log = logging.getLogger("fma.requester.oidc")


@dataclass(frozen=True)
class Review:
    """What the API server said of a token."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    error: str = ""


Reviewer = Callable[[str, str], Review]  # (token, audience) -> Review; raises on an API failure


def _expiry(token: str) -> float | None:
    """The token's ``exp`` (unverified: only to bound the cache; the TokenReview is the authority)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


class EventSenders:
    def __init__(self, audience: str, subjects: tuple[str, ...], review: Reviewer, *, remember_s: float = 60.0,
                 max_entries: int = 1024, clock: Callable[[], float] = time.time) -> None:
        if not subjects:
            raise ValueError("FMA_EVENTS_OIDC_SUBJECTS: name the ServiceAccounts allowed to send events "
                             "(e.g. system:serviceaccount:llm:*-oidc-eventing.knative.dev-trigger)")
        self.audience, self.subjects, self._review = audience, subjects, review
        self._remember_s, self._max, self._clock = remember_s, max_entries, clock
        self._cache: dict[bytes, tuple[float, str | None]] = {}  # sha256(token) -> (until, allowed user)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EventSenders(audience={self.audience!r}, subjects={list(self.subjects)!r})"

    def sender(self, authorization: str | None) -> str | None:
        """The allowed sender a Bearer token proves, or None. Raises :class:`AuthUnavailable` when the
        API server cannot say."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or token.count(".") != 2:  # not a JWT: an API key, or nothing
            return None
        key, now = hashlib.sha256(token.encode()).digest(), self._clock()
        with self._lock:
            hit = self._cache.get(key)
        if hit and hit[0] > now:
            return hit[1]
        try:
            review = self._review(token, self.audience)
        except Exception as exc:  # the API server down, slow or refusing us: not the sender's fault
            log.warning("TokenReview failed: %s", exc)
            raise AuthUnavailable(f"cannot check the event sender's token now (TokenReview failed: "
                                     f"{type(exc).__name__}); retry") from None
        user = self._allowed(review)
        until = min(now + self._remember_s, _expiry(token) or now + self._remember_s)
        with self._lock:
            if len(self._cache) >= self._max:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= self._max:
                    self._cache.clear()
            self._cache[key] = (until, user)
        return user

    def _allowed(self, review: Review) -> str | None:
        if not review.authenticated:
            log.info("event sender refused: token not authenticated (%s)", review.error or "no reason given")
            return None
        if self.audience not in review.audiences:
            log.info("event sender %s refused: token not for audience %s", review.username, self.audience)
            return None
        if not any(fnmatch.fnmatchcase(review.username, pattern) for pattern in self.subjects):
            log.info("event sender %s refused: not in FMA_EVENTS_OIDC_SUBJECTS", review.username)
            return None
        return review.username


def kube_reviewer(api_client: Any, timeout_s: float) -> Reviewer:
    """TokenReviews through the Kubernetes API (``create`` on ``tokenreviews.authentication.k8s.io``)."""
    from kubernetes import client

    auth = client.AuthenticationV1Api(api_client)

    def review(token: str, audience: str) -> Review:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[audience]))
        status = auth.create_token_review(body, _request_timeout=timeout_s).status
        user = status.user.username if status and status.user else ""
        return Review(bool(status and status.authenticated), user or "", tuple(status.audiences or ()),
                      status.error or "")

    return review


def in_cluster_reviewer(timeout_s: float) -> Reviewer:
    """The reviewer with the requester's own credentials (in-cluster, else the kubeconfig)."""
    from kubernetes import client

    from .kube import load_configuration

    configuration = load_configuration()
    configuration.retries = False  # one attempt: a failure is a 503 and the Broker retries
    return kube_reviewer(client.ApiClient(configuration), timeout_s)
