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

Anyone who reaches ``POST /`` can present a JWT-shaped string, and each new one would cost the API server a
TokenReview. So reviews of tokens not seen before are budgeted per source (the client's address as the edge
sees it): past ``reviews_per_minute`` (and a burst), the answer is 429 ``rate_limited`` without asking the API
server. The source is the first ``X-Forwarded-For`` address, which a client can set, so a second budget bounds
all sources together (``total_per_minute``): whatever a client claims, the API server's load stays bounded, and
a Broker refused during a flood gets a 429, which it retries. Refusals are remembered too, for a shorter time,
and apart from the accepted senders: a flood of made-up tokens evicts only other refusals (least recently used
first), never a Trigger's remembered token.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fma_common.errors import AuthUnavailable, RateLimited

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


class _Remembered:
    """Token hashes and what their review said, until a time; least recently used first out when full."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._items: OrderedDict[bytes, tuple[float, str | None]] = OrderedDict()

    def get(self, key: bytes, now: float) -> tuple[float, str | None] | None:
        hit = self._items.get(key)
        if hit is None or hit[0] <= now:
            return None
        self._items.move_to_end(key)
        return hit

    def put(self, key: bytes, until: float, user: str | None) -> None:
        self._items[key] = (until, user)
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            self._items.popitem(last=False)


class _Budget:
    """A token bucket per source: ``rate`` per second, at most ``burst`` at once; sources least recently seen
    are forgotten first (a forgotten source starts with a full bucket again)."""

    def __init__(self, per_minute: float, burst: int, max_sources: int = 4096) -> None:
        self._rate, self._burst, self._max = per_minute / 60.0, float(burst), max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, at)

    def take(self, source: str, now: float) -> float:
        """0 if one review may go ahead now, else the seconds until one may."""
        tokens, at = self._buckets.get(source, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self._rate
        self._buckets[source] = (tokens - 1 if wait == 0 else tokens, now)
        self._buckets.move_to_end(source)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait


class EventSenders:
    def __init__(self, audience: str, subjects: tuple[str, ...], review: Reviewer, *, remember_s: float = 60.0,
                 refused_s: float = 10.0, max_entries: int = 1024, reviews_per_minute: float = 60.0,
                 burst: int = 20, total_per_minute: float = 600.0, clock: Callable[[], float] = time.time) -> None:
        if not subjects:
            raise ValueError("FMA_EVENTS_OIDC_SUBJECTS: name the ServiceAccounts allowed to send events "
                             "(e.g. system:serviceaccount:llm:*-oidc-eventing.knative.dev-trigger)")
        self.audience, self.subjects, self._review = audience, subjects, review
        self._remember_s, self._refused_s, self._clock = remember_s, refused_s, clock
        self._accepted = _Remembered(max_entries)  # a flood of made-up tokens never evicts these
        self._refused = _Remembered(max_entries)
        self._budget = _Budget(reviews_per_minute, burst)
        self._total = _Budget(total_per_minute, max(burst, int(total_per_minute / 6)), max_sources=1)
        self._per_minute = reviews_per_minute
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EventSenders(audience={self.audience!r}, subjects={list(self.subjects)!r})"

    def sender(self, authorization: str | None, source: str = "") -> str | None:
        """The allowed sender a Bearer token proves, or None. Raises :class:`AuthUnavailable` when the
        API server cannot say, and :class:`RateLimited` when ``source`` has asked for too many new reviews."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or token.count(".") != 2:  # not a JWT: an API key, or nothing
            return None
        key, now = hashlib.sha256(token.encode()).digest(), self._clock()
        with self._lock:
            hit = self._accepted.get(key, now) or self._refused.get(key, now)
            if hit is not None:
                return hit[1]
            wait = self._budget.take(source, now) or self._total.take("", now)
        if wait:
            log.warning("event sender tokens from %s: more new tokens than %s a minute; not reviewing this one",
                        source or "an unknown source", int(self._per_minute))
            raise RateLimited("too many new event-sender tokens from this client; retry later",
                              retry_after=int(wait + 0.999))
        try:
            review = self._review(token, self.audience)
        except Exception as exc:  # the API server down, slow or refusing us: not the sender's fault
            log.warning("TokenReview failed: %s", exc)
            raise AuthUnavailable(f"cannot check the event sender's token now (TokenReview failed: "
                                     f"{type(exc).__name__}); retry") from None
        user = self._allowed(review)
        keep = self._remember_s if user is not None else self._refused_s
        until = min(now + keep, _expiry(token) or now + keep)
        with self._lock:
            (self._accepted if user is not None else self._refused).put(key, until, user)
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
