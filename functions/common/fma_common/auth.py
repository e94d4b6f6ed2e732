"""API keys: who may infer, who may change state. Pure checks; the HTTP edges call :meth:`KeyRing.require`.

Two roles. An **inference** key may run completions, list models and workers and send completion events; an
**admin** key may also do everything that changes state (sleep, wake, warm, release, readiness switches,
worker-control events). Keys come from the environment or from files (one per line, ``#`` comments: a
mounted Kubernetes Secret), are kept only as SHA-256 digests, and are compared in constant time against every
key of the ring (``hmac.compare_digest``, no early exit), so neither the answer's timing nor a log line can
give one away. A ring with no keys is *off*: everything is allowed, as before keys existed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import Forbidden, Unauthorized

Role = Literal["infer", "admin"]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_keys(inline: str | None, file: Path | None) -> list[str]:
    """Keys from a comma-separated value and a file of one key per line (blank lines and ``#`` comments skipped)."""
    keys = [k.strip() for k in (inline or "").split(",")]
    if file is not None:
        try:
            text = file.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the key file {file}: {exc.strerror or exc}") from None
        keys += [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [k for k in keys if k]


@dataclass(frozen=True)
class KeyRing:
    infer: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def of(cls, infer: Iterable[str] = (), admin: Iterable[str] = ()) -> KeyRing:
        return cls(tuple(_digest(k) for k in infer), tuple(_digest(k) for k in admin))

    @property
    def enabled(self) -> bool:
        return bool(self.infer or self.admin)

    def __repr__(self) -> str:  # never the digests either
        return f"KeyRing({len(self.infer)} inference key(s), {len(self.admin)} admin key(s))"

    def role_of(self, authorization: str | None) -> Role | None:
        """The role the ``Authorization`` header grants, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = _digest(token.strip())
        admin = _matches(presented, self.admin)
        infer = _matches(presented, self.infer)
        return "admin" if admin else "infer" if infer else None

    def require(self, authorization: str | None, need: Role) -> None:
        """Raise 401 (no or unknown key) or 403 (an inference key where admin is needed); nothing when off."""
        if not self.enabled:
            return
        role = self.role_of(authorization)
        if role is None:
            what = "no API key" if not authorization else "an API key that is not valid here"
            raise Unauthorized(f"{what}: send Authorization: Bearer <key>")
        if need == "admin" and role != "admin":
            raise Forbidden("this key may run inference but not change workers; use an admin key")


def _matches(presented: bytes, digests: tuple[bytes, ...]) -> bool:
    found = False
    for digest in digests:  # every one, whatever matched: the time does not depend on which
        found |= hmac.compare_digest(presented, digest)
    return found
