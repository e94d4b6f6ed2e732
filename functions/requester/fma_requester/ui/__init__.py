"""The status page (``GET /ui``): three static files read once, served with a strict CSP.

Everything the page needs comes from the requester itself (no CDN, no web
fonts), so it works on an air-gapped cluster and the policy can forbid every
other origin. The page reads ``/v1/workers`` and calls the worker routes; it
holds no state of its own.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from flask import Response

from fma_common.errors import NotFound

_TYPES = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}

# Same-origin only; no inline script or style, no framing (clickjacking of the Release button).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}


@cache
def _read(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()


def page() -> Response:
    return Response(_read("index.html"), mimetype="text/html", headers=_HEADERS)


def asset(name: str) -> Response:
    if name not in _TYPES:
        raise NotFound(f"no such file in the status page: {name!r}")
    return Response(_read(name), content_type=_TYPES[name], headers=_HEADERS)
