"""Small helpers for typed settings read from the environment.

Each service has one frozen ``Settings`` dataclass with a ``from_env(environ)``
classmethod. The helpers here parse one variable each and raise
:class:`SettingsError` naming the variable and what is wrong, so a bad value
stops the process at start-up with a clear message instead of surfacing later.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any


class SettingsError(ValueError):
    """An environment variable has a value the service cannot use."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str | float | int, *, name: str = "duration") -> float:
    """``"300s"``, ``"5m"``, ``"1.5h"``, ``"250ms"`` or a bare number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise SettingsError(f"{name}: must not be negative, got {text}")
        return float(text)
    match = _DURATION.match(str(text))
    if not match:
        raise SettingsError(f"{name}: {text!r} is not a duration like '30s', '5m' or '250ms'")
    return float(match.group(1)) * _UNITS[match.group(2)]


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name)
    return default if value is None or value == "" else value


def env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int | None = None,
            maximum: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}: {raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name}: must be <= {maximum}, got {value}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, *, minimum: float | None = None) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}: {raw!r} is not a number") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}: must be >= {minimum}, got {value}")
    return value


def env_duration(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    return parse_duration(raw, name=name)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise SettingsError(f"{name}: {raw!r} is not a boolean (use true/false)")


def env_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(env, name, default).strip().lower()
    if value not in choices:
        raise SettingsError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


_SECRET_NAME = re.compile(r"(^|_)(secret|password|api_key|token|credentials?)$")


def describe(settings: Any) -> dict[str, Any]:
    """A settings dataclass as a plain dict for one start-up log line.

    Fields whose name says they hold a secret are masked.
    """
    out: dict[str, Any] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if _SECRET_NAME.search(f.name) and value:
            value = "***"
        out[f.name] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return out
