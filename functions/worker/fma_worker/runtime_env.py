"""The worker process's library environment, the same whether it was forked or started fresh.

A worker is either a new Python process or a child forked from the
pre-warmed launcher, which imported huggingface_hub and transformers before
it knew the worker's environment. :func:`prepare` runs first in both
(``gunicorn_conf`` is imported in the child either way): it sets our
defaults, and if the hub libraries are already imported it re-reads the
constants they computed from the environment at import
(``huggingface_hub.constants``: ``HF_HOME``, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``...; transformers keeps copies of some of them). Variables
that cannot be re-read are never different in a forked worker: the requester
starts such a worker as a plain process (``fma_common.fork_env``).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

DEFAULTS = {
    "HF_HUB_OFFLINE": "1",  # never reach the hub at run time unless asked to
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# Constants of huggingface_hub.constants that other modules copy by name at import.
_COPIED = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_HUB_OFFLINE",
           "default_cache_path", "HF_TOKEN_PATH", "ENDPOINT")


_reread_for: tuple[tuple[str, str], ...] | None = None  # the environment the constants were last re-read from


def _hub_environment() -> tuple[tuple[str, str], ...]:
    from fma_common.fork_env import is_reread

    return tuple(sorted((k, v) for k, v in os.environ.items() if is_reread(k)))


def prepare() -> None:
    """Idempotent: the arbiter re-reads once, and its forked worker (same environment) finds nothing to do."""
    global _reread_for
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    from . import import_cache

    import_cache.install()  # before transformers is first imported: its import table from disk (0.3 s)
    current = _hub_environment()
    if "huggingface_hub.constants" not in sys.modules:
        # Not imported yet: the import will read this environment itself. Recorded, so a child forked later with
        # the same environment re-reads nothing (it walked every module for 11 ms of each forked cold start).
        _reread_for = current
        return
    if current != _reread_for:
        reread_library_constants()
        _reread_for = current


def reread_library_constants() -> None:
    """Recompute what huggingface_hub (and transformers' copies) read from the environment at import."""
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is None:
        return  # not imported yet: it will read the current environment itself
    old = {name: getattr(constants, name, None) for name in _COPIED}
    importlib.reload(constants)  # same module object: functions defined there see the new values
    new = {name: getattr(constants, name, None) for name in _COPIED}
    hub = sys.modules.get("transformers.utils.hub")
    old_modules = getattr(hub, "HF_MODULES_CACHE", None) if hub else None
    new_modules = os.getenv("HF_MODULES_CACHE", os.path.join(constants.HF_HOME, "modules"))
    for name, module in list(sys.modules.items()):
        if module is None or module is constants or not name.startswith(("huggingface_hub", "transformers")):
            continue
        attrs = vars(module)
        for key in _COPIED:
            if key in attrs and attrs[key] == old[key] and old[key] != new[key]:
                setattr(module, key, new[key])
        if old_modules is not None and attrs.get("HF_MODULES_CACHE") == old_modules:
            module.HF_MODULES_CACHE = new_modules  # type: ignore[attr-defined]


def effective_hub_settings() -> dict[str, Any]:
    """What the hub libraries will actually use (logged at load, checked by tests)."""
    from huggingface_hub import constants

    return {"HF_HOME": constants.HF_HOME, "HF_HUB_CACHE": constants.HF_HUB_CACHE,
            "HF_HUB_OFFLINE": bool(constants.HF_HUB_OFFLINE)}
