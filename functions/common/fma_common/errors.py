"""Typed errors and the OpenAI error envelope.

Every failure a client can see is one of these classes. Services raise them;
the HTTP edge (``fma_common.http.register_error_handlers``) renders them into
``{"error": {"message", "type", "code", "param"}}`` with the class's status.
Nothing here imports Flask, so plain-Python service code can raise them.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Base class: an error with an HTTP status and an OpenAI error type/code."""

    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, self.type, self.code, self.param)


class InvalidRequest(ApiError):
    """The client sent something we cannot serve; fix the request and retry."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class ModelNotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Unauthorized(ApiError):
    """No API key, or one that is not ours (OpenAI answers 401 ``invalid_api_key`` the same way)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("WWW-Authenticate", 'Bearer realm="fma"')


class Forbidden(ApiError):
    """A valid key without the right: an inference key on a route that changes state."""

    status = 403
    type = "invalid_request_error"
    code = "insufficient_permissions"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(ApiError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class QueueFull(ApiError):
    """Too many requests are already waiting; retry after ``retry_after`` seconds."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: int = 1, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = max(1, int(retry_after))
        self.headers.setdefault("Retry-After", str(self.retry_after))


class RateLimited(ApiError):
    """This client asked for more of something costly than its share (e.g. token checks); retry later."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int = 1, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.headers.setdefault("Retry-After", str(max(1, int(retry_after))))


class ShuttingDown(ApiError):
    """The server is draining for shutdown and can no longer finish this; retry (another replica, or soon)."""

    status = 503
    type = "service_unavailable_error"
    code = "shutting_down"


class AuthUnavailable(ApiError):
    """A credential could not be checked right now (the API server that checks it failed); retry."""

    status = 503
    type = "service_unavailable_error"
    code = "auth_unavailable"

    def __init__(self, message: str, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.headers.setdefault("Retry-After", "1")


class WorkerNotReady(ApiError):
    """The model cannot serve right now (loading, failed, or still starting)."""

    status = 503
    type = "service_unavailable_error"
    code = "worker_not_ready"


class WorkerSleeping(WorkerNotReady):
    code = "worker_sleeping"


class WorkerFailed(WorkerNotReady):
    code = "worker_failed"


class UpstreamTimeout(ApiError):
    status = 504
    type = "service_unavailable_error"
    code = "upstream_timeout"


class DeadlineExceeded(ApiError):
    """The request's own deadline passed (a CloudEvent's ``FMA_EVENTS_DEADLINE``): permanent, not retried, so the
    layer that would retry it gets an answer before its own timeout does."""

    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class UpstreamError(ApiError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class InternalError(ApiError):
    status = 500
    type = "server_error"
    code = "internal_error"


def error_envelope(message: str, type_: str, code: str | None = None,
                   param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


class UpstreamAnswer(ApiError):
    """A worker's (or its platform's) own error answer, passed on as it was.

    Keeps the status, the worker's error envelope when it sent one (or one
    made from its text, e.g. a Knative activator's plain-text 503) and its
    ``Retry-After``, so the client sees what the worker said.
    """

    def __init__(self, status: int, envelope: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        error = envelope.get("error") if isinstance(envelope.get("error"), dict) else {}
        super().__init__(str(error.get("message") or f"worker answered {status}"), headers=headers)
        self.status = status
        self.type = str(error.get("type") or ("invalid_request_error" if status < 500 else "server_error"))
        self.code = error.get("code")
        self.param = error.get("param")
        self._envelope = envelope

    def envelope(self) -> dict[str, Any]:
        return self._envelope
