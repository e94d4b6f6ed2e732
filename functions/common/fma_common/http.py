"""Flask edge helpers shared by the requester and the worker.

* :func:`register_error_handlers` - the one place where exceptions become the
  OpenAI error envelope. Client mistakes are 4xx with a message that says what
  to fix; anything unexpected is logged with its traceback and rendered as a
  500 envelope without internals.
* :func:`parse_body` - JSON body -> pydantic model, with validation errors
  turned into :class:`InvalidRequest` naming the offending field.
* :func:`sse_event` / :func:`sse_error` - Server-Sent Events framing.
* :func:`install_access_log` - one structured line per request (method, path,
  status, elapsed); bodies and prompts are never logged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, TypeVar

from flask import Flask, Response, g, request
from pydantic import BaseModel, ValidationError
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .errors import (
    ApiError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    error_envelope,
)

log = logging.getLogger("fma.http")

M = TypeVar("M", bound=BaseModel)


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    resp = Response(json.dumps(payload, separators=(",", ":")), status=status, mimetype="application/json")
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def error_response(err: ApiError) -> Response:
    return json_response(err.envelope(), err.status, err.headers)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(err: ApiError) -> Response:
        if err.status >= 500:
            log.warning("request failed: %s %s -> %d %s: %s", request.method, request.path,
                        err.status, err.code, err.message)
        return error_response(err)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(err: RequestEntityTooLarge) -> Response:
        limit = app.config.get("MAX_CONTENT_LENGTH")
        return error_response(PayloadTooLarge(
            f"request body is larger than the limit of {limit} bytes; send a smaller body"))

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        status = err.code or 500
        if status == 404:
            return error_response(NotFound(f"no route for {request.method} {request.path}"))
        if status == 405:
            mapped = MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
            resp = error_response(mapped)
            allowed = getattr(err, "valid_methods", None)
            if allowed:
                resp.headers["Allow"] = ", ".join(allowed)
            return resp
        type_ = "invalid_request_error" if status < 500 else "server_error"
        return json_response(error_envelope(err.description or err.name, type_, err.name.lower().replace(" ", "_")),
                             status)

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(InternalError(f"internal error ({type(err).__name__}); see the server log"))


MAX_JSON_DEPTH = 64  # an OpenAI body nests a handful of levels; a hostile one nests thousands


def loads_checked(body: bytes | str, what: str = "request body") -> Any:
    """JSON that the rest of the code can trust, or :class:`InvalidRequest` (never a 500).

    Refused: invalid JSON, nesting deeper than :data:`MAX_JSON_DEPTH` (the
    parser itself would raise ``RecursionError`` past about a thousand), and
    strings holding a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON but
    not text: a tokenizer, or any UTF-8 encoder, fails on it).
    """
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest(f"{what} is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    check_json_tree(value, what)
    return value


def check_json_tree(value: Any, what: str = "request body") -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"{what} holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                                     "text; send valid Unicode") from None
            continue
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise InvalidRequest(f"{what} is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def parse_json(raw: bytes | None = None) -> Any:
    """The request body as JSON, or :class:`InvalidRequest` saying why not."""
    body = request.get_data(cache=True) if raw is None else raw
    if not body:
        raise InvalidRequest("request body is empty; send a JSON object")
    return loads_checked(body)


def validation_error(exc: ValidationError) -> InvalidRequest:
    """The first pydantic error as an :class:`InvalidRequest` with ``param`` set."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__") or None
    msg = first.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    text = f"{loc}: {msg}" if loc else msg
    if len(exc.errors()) > 1:
        text += f" (and {len(exc.errors()) - 1} more problem(s))"
    return InvalidRequest(text, param=loc)


def parse_model(model: type[M], payload: Any) -> M:
    if not isinstance(payload, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(payload).__name__}")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_body(model: type[M]) -> M:
    return parse_model(model, parse_json())


def sse_event(payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(err: ApiError) -> bytes:
    """The single event that ends a stream which failed after it started."""
    return sse_event(err.envelope())


SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}


def merged_headers(base: Mapping[str, str], overrides: Mapping[str, str]) -> Headers:
    """``base`` with ``overrides`` replacing any header of the same name, whatever its case.

    A relayed worker answer arrives with lower-case names (httpx); a plain dict
    merge would send ``Cache-Control`` twice and a proxy would read ``no, no``.
    """
    out = Headers(list(base.items()))
    for name, value in overrides.items():
        out.set(name, value)
    return out


def install_access_log(app: Flask, logger_name: str) -> None:
    access = logging.getLogger(logger_name)
    quiet = {"/health", "/ready", "/metrics"}

    @app.before_request
    def _start_timer() -> None:
        g.fma_started = time.perf_counter()

    @app.after_request
    def _log(resp: Response) -> Response:
        started = getattr(g, "fma_started", None)
        if started is not None and request.path not in quiet:
            access.info("%s %s -> %d in %.1f ms%s", request.method, request.path, resp.status_code,
                        (time.perf_counter() - started) * 1000, " (stream)" if resp.is_streamed else "")
        return resp


def query_args(args: Any) -> dict[str, Any]:
    """Query parameters with integer-looking values as ints, for pydantic models."""
    out: dict[str, Any] = {}
    for key, value in args.items():
        try:
            out[key] = int(value)
        except ValueError:
            out[key] = value
    return out
