"""transformers' table of lazy imports, computed once per install and kept on disk.

``import transformers`` reads the source of every model file it ships (1,700
files in 5.x: ``define_import_structure`` in ``utils/import_utils.py``, which
collects each file's ``__all__``) to build the table behind its lazy module,
and it does so in every new process: 0.3 s of a plain worker's start on this
project's CPUs, a Knative pod's cold start included. The table depends only
on the installed files, so the first process to build it writes it here and
later ones read it (1-2 ms). ``fma prepare``, run when the worker image is
built, writes it into the image's cache, so no pod pays the scan.

How it is kept correct:

* **Keyed by the install.** Installed from a wheel, the key is the
  distribution's ``RECORD`` (pip writes it on every install or upgrade) and
  the scanned path. For an editable or unrecorded install, every ``.py``
  file's size and mtime (70 ms for 2,600 files, still well under the scan).
* **Plain data.** The table is written as JSON (backend names and module
  names), never pickled: a cache folder is no place for code.
* **Never a dependency.** Anything unexpected (another transformers layout,
  an unreadable or read-only cache, a table of another shape) falls back to
  transformers' own function; a failure to write is ignored.

The hook wraps one function of one module (:func:`install`, before anything
imports transformers) and only while that module is first executed; it
changes nothing transformers computes, only where the answer comes from.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.abc
import importlib.machinery
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("fma.worker.import_cache")

TARGET = "transformers.utils.import_utils"
FUNCTION = "define_import_structure"
FORMAT = 1  # bump when the file's layout changes

_installed: _Finder | None = None
stats = {"hits": 0, "misses": 0, "written": 0}


def cache_dir() -> Path:
    from fma_common.sources import default_cache_dir

    return default_cache_dir() / "import-structure"


def install() -> None:
    """Serve transformers' import table from the cache in this process (idempotent; a no-op once transformers'
    module is imported, as in a child forked from a launcher that already imported it)."""
    global _installed
    if _installed is not None or TARGET in sys.modules or os.environ.get("FMA_IMPORT_CACHE", "1") == "0":
        return
    _installed = _Finder()
    sys.meta_path.insert(0, _installed)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _Loader(spec.loader)
        return spec


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the one function wrapped."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename... as the real loader answers them
        return getattr(self._inner, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        original = getattr(module, FUNCTION, None)
        if callable(original):
            setattr(module, FUNCTION, cached(original, Path(module.__file__).resolve().parents[1]))


def cached(original: Callable[..., Any], package: Path) -> Callable[..., Any]:
    """``original`` (transformers' function), answered from the disk cache when the install is unchanged."""

    @functools.lru_cache  # as transformers' own: each model's __init__ asks again for its folder
    def define_import_structure(module_path: Any, prefix: str | None = None) -> Any:
        try:
            file = cache_dir() / f"{_key(package, Path(module_path), prefix)}.json"
        except Exception as exc:  # a layout this does not know: transformers' own answer
            log.debug("import table not cached: %s", exc)
            return original(module_path, prefix)
        try:
            table = _decode(json.loads(file.read_text()))
            stats["hits"] += 1
            return table
        except (OSError, ValueError, TypeError, KeyError):
            pass
        table = original(module_path, prefix)
        stats["misses"] += 1
        try:
            _write(file, json.dumps(_encode(table)))
            stats["written"] += 1
        except (OSError, TypeError, ValueError) as exc:  # read-only, full, or a shape JSON cannot hold
            log.debug("import table not written to %s: %s", file, exc)
        return table

    define_import_structure.__wrapped__ = original  # type: ignore[attr-defined]
    return define_import_structure


def _key(package: Path, module_path: Path, prefix: str | None) -> str:
    h = hashlib.sha256()
    h.update(repr((FORMAT, sys.version_info[:2], str(package), str(module_path), prefix)).encode())
    record = _record(package)
    if record is not None:
        h.update(repr((record.name, record.read_bytes())).encode())  # every file's hash, as installed
    else:  # editable or unrecorded: the files themselves
        base = module_path if module_path.is_dir() else module_path.parent
        for root, dirs, files in os.walk(base):
            dirs.sort()
            for name in sorted(files):
                if name.endswith(".py"):
                    st = os.stat(os.path.join(root, name))
                    h.update(f"{root}/{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _record(package: Path) -> Path | None:
    """The installed wheel's RECORD, unless the install is editable (its files change without a reinstall)."""
    for info in sorted(package.parent.glob(f"{package.name}-*.dist-info")):
        direct = info / "direct_url.json"
        if direct.is_file() and json.loads(direct.read_text()).get("dir_info", {}).get("editable"):
            return None
        record = info / "RECORD"
        if record.is_file():
            return record
    return None


def _encode(table: dict[frozenset[str], dict[str, set[str]]]) -> list[Any]:
    return [[sorted(backends), {module: sorted(names) for module, names in entries.items()}]
            for backends, entries in table.items()]


def _decode(data: list[Any]) -> dict[frozenset[str], dict[str, set[str]]]:
    table: dict[frozenset[str], dict[str, set[str]]] = {}
    for backends, entries in data:
        if not isinstance(backends, list) or not isinstance(entries, dict):
            raise ValueError("not an import table")
        table[frozenset(backends)] = {str(module): set(names) for module, names in entries.items()}
    return table


def _write(file: Path, text: str) -> None:
    """Atomically (two processes may write the same table at once; either copy is right)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
