"""Typed settings read from the environment, defined once per service.

Each service declares one frozen :class:`EnvSettings` subclass. Every field
names its environment variable, its default (written the way a user would
set it, e.g. ``"30s"``) and what it means, in one place:

    class WorkerSettings(EnvSettings):
        max_tokens: int = setting("FMA_MAX_TOKENS", "2048", "largest max_tokens a request may ask for", ge=1)

From that single declaration come the parsing and validation
(:meth:`EnvSettings.from_env`, which stops start-up with one line naming the
variable), the start-up log line (:func:`describe`, secrets masked), the
README tables (:func:`markdown_table`; a test keeps the README equal to it)
and ``fma settings``.

Why not pydantic-settings: its environment source reads ``os.environ``
implicitly, while ours take the mapping they are given (tests and the CLI
pass their own), an empty variable means "unset" here, durations use our
``30s``/``5m`` syntax, and the README needs the default *as written*. Plain
pydantic models with an alias per field do all of that in a few lines.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo


class SettingsError(ValueError):
    """An environment variable (or a models file) has a value the service cannot use."""


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


def _duration(value: Any) -> Any:
    try:
        return parse_duration(value)
    except SettingsError as exc:
        raise ValueError(str(exc).removeprefix("duration: ")) from None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


Duration = Annotated[float, BeforeValidator(_duration)]
"""Seconds, written as ``250ms``, ``30s``, ``5m``, ``1h`` or a plain number."""
Flag = Annotated[bool, BeforeValidator(_flag)]
"""``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``)."""
Lower = BeforeValidator(_lower)
"""Put before a ``Literal`` of lowercase choices: ``INFO`` is ``info``."""


def _auto_or_flag(value: Any) -> Any:
    try:
        return "true" if _flag(value) else "false"
    except ValueError:
        return _lower(value)  # "auto", or a value the Literal refuses with its own message


AutoFlag = Annotated[Literal["auto", "true", "false"], BeforeValidator(_auto_or_flag)]
"""``auto``, or a boolean spelled as :data:`Flag` takes it, given as ``true``/``false``."""


def setting(env: str, default: Any, description: str, *, shown: str | None = None, keep_empty: bool = False,
            **constraints: Any) -> Any:
    """One setting: its variable, its default as a user would write it, and its meaning.

    ``shown`` replaces the default in the README when the real default is
    derived from other values (it is then computed by the class). With
    ``keep_empty`` an empty value is a value (``FMA_OWNER_SERVICE=""``: no
    owner), not "unset".
    """
    extra = {"env": env, "shown": shown if shown is not None else str(default), "keep_empty": keep_empty}
    return Field(default, alias=env, description=description, validate_default=default is not None,
                 json_schema_extra=extra, **constraints)


class EnvSettings(BaseModel):
    """Base class: frozen, one alias (the variable name) per field."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True, arbitrary_types_allowed=True)

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field name -> environment variable."""
        return {name: f.alias or name for name, f in cls.model_fields.items()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Any:
        env = os.environ if environ is None else environ
        raw: dict[str, Any] = {}
        for field in cls.model_fields.values():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if "env" not in extra:
                continue  # derived, not read from the environment
            var = str(extra["env"])
            value = env.get(var)
            if value is None or (value == "" and not extra.get("keep_empty")):
                continue
            raw[var] = value
        try:
            # Validators that derive a default from other variables read them from the context.
            return cls.model_validate(raw, context={"env": env})
        except ValidationError as exc:
            raise settings_error(exc) from None

    @classmethod
    def rows(cls) -> list[tuple[str, str, str]]:
        """(variable, default as shown, meaning) for every setting, in declaration order."""
        out = []
        for name, field in cls.model_fields.items():
            extra = field.json_schema_extra or {}
            if not isinstance(extra, dict) or "env" not in extra:
                continue
            out.append((str(extra["env"]), str(extra["shown"]), field.description or name))
        return out


def context_env(info: ValidationInfo) -> Mapping[str, str]:
    """The environment a settings object is being read from (for derived defaults)."""
    ctx = info.context or {}
    return ctx.get("env", os.environ)


def settings_error(exc: ValidationError) -> SettingsError:
    """The first validation error as one line that names the variable."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    value = first.get("input")
    got = f" (got {value!r})" if isinstance(value, (str, int, float)) and first.get("type") != "value_error" else ""
    return SettingsError(f"{loc}: {msg}{got}" if loc else msg)


def markdown_table(cls: type[EnvSettings]) -> str:
    """The README table of a settings class (a test keeps the README equal to it)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for env, shown, meaning in cls.rows():
        lines.append(f"| `{env}` | {shown or '(empty)'} | {meaning} |")
    return "\n".join(lines) + "\n"


_SECRET_NAME = re.compile(r"(^|_)(secret|password|api_key|api_keys|token|credentials?|keys)$")


def describe(settings: Any) -> dict[str, Any]:
    """Settings as a plain dict for one start-up log line; fields that hold secrets are masked."""
    if isinstance(settings, BaseModel):
        items = [(name, getattr(settings, name)) for name in type(settings).model_fields]
    else:
        from dataclasses import fields

        items = [(f.name, getattr(settings, f.name)) for f in fields(settings)]
    out: dict[str, Any] = {}
    for name, value in items:
        if _SECRET_NAME.search(name) and value:
            value = "***"
        out[name] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return out
