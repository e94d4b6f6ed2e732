"""The model cache as the requester sees it: each model's cache state, and pulling a hub model ahead.

A hub model (``hf:``) is fetched into the cache by the requester before its first worker starts
(``local.py``), or ahead of the first request with ``POST /v1/models/{model}/pull`` (``fma models pull``),
which asks the hub for the revision's current commit and fetches it if the cache does not hold it
(``fma_common.hub_cache``). Embedded models ship in the worker image; a ``path:`` model is a folder already.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fma_common import hub_cache
from fma_common.errors import InvalidRequest
from fma_common.sources import parse_source

from .registry import ModelSpec

log = logging.getLogger("fma.requester.model_cache")


def state(spec: ModelSpec, cache_dir: Path) -> dict[str, Any]:
    """What the cache holds for ``spec``: ``{"state": "cached", "bytes", "commit"}``, ``not cached``, or where
    an embedded or folder model comes from instead. Reads two small files; no network."""
    source = parse_source(spec.source)
    if source.kind == "embedded":
        return {"state": "in the image"}
    if source.kind == "path":
        return {"state": "local folder"}
    try:
        hit = hub_cache.cached(hub_cache.HubRef.parse(source.ref), cache_dir)
    except hub_cache.HubFetchError:  # the registry refuses such a source; never a 500 for the whole list
        return {"state": "invalid source"}
    if hit is None:
        return {"state": "not cached"}
    return {"state": "cached", "bytes": hit.bytes, "files": hit.files, "commit": hit.commit,
            "dtype": checkpoint_dtype(hit.folder)}


def checkpoint_dtype(folder: Path) -> str | None:
    """The dtype the checkpoint was saved in, as its config.json says (None where it does not)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return str(value).removeprefix("torch.") if value else None


def hub_env(spec: ModelSpec) -> dict[str, str]:
    """The token and endpoint a worker of ``spec`` would use: the requester's environment, then the model's."""
    return {**os.environ, **spec.env}


def fetch_before_start(spec: ModelSpec, cache_dir: Path, env: dict[str, str],
                       progress: Callable[[str], None]) -> bool:
    """A hub model is put in the model cache before its worker starts (either actuator): the worker then loads
    it offline (``HF_HUB_OFFLINE=1``; on Knative from the claim mounted read-only), and a later cold start finds
    it and fetches nothing. ``env``: the worker's, for ``HF_TOKEN`` and ``HF_ENDPOINT`` (the model's own
    ``env`` may set them); the token goes only to the hub. True if it fetched; RuntimeError with the reason."""
    source = parse_source(spec.source)
    if source.kind != "hf":
        return False
    if str(spec.env.get("HF_HUB_OFFLINE", "")).lower() in ("1", "true", "yes", "on"):
        return False  # the model's own word: never the hub for it (its worker loads from its HF_HOME's cache)
    ref = hub_cache.HubRef.parse(source.ref)
    if hub_cache.cached(ref, cache_dir) is not None:
        return False
    progress(f"fetching {ref.repo} from the hub")
    try:
        for line in _fetching(ref, cache_dir, env, refresh=False):
            if "message" in line:
                progress(line["message"])
    except hub_cache.HubFetchError as exc:
        raise RuntimeError(str(exc)) from None
    return True


def _fetching(ref: hub_cache.HubRef, cache_dir: Path, env: dict[str, str], *, refresh: bool) \
        -> Iterator[dict[str, Any]]:
    """The fetch in a child process (``python -m fma_common.hub_cache``); its progress lines as they come, then
    ``done``; HubFetchError with the child's reason. A child, not a thread: under gevent (the requester's gunicorn
    workers) a thread is a greenlet, and hashing a file or huggingface_hub's native Xet download would hold the
    event loop, and every stream and probe with it; a native thread cannot share gevent's sockets. The token
    and endpoint reach the child in its environment, not on its command line."""
    child_env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for key in ("HF_TOKEN", "HF_ENDPOINT"):
        if env.get(key):
            child_env[key] = env[key]
        else:
            child_env.pop(key, None)
    args = [sys.executable, "-m", "fma_common.hub_cache", f"{ref.repo}@{ref.revision}", str(cache_dir)]
    proc = subprocess.Popen([*args, *(["--refresh"] if refresh else [])], env=child_env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    last: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:  # gevent's pipes under monkey patching: the loop runs between lines
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if "message" in line:
                yield line
            else:
                last = line
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.poll() is None:  # the consumer went away (a pull's client left): the fetch finishes on its own
            threading.Thread(target=proc.wait, name="fma-fetch-reaper", daemon=True).start()
    if "error" in last or not last:
        raise hub_cache.HubFetchError(last.get("error") or f"the fetch of {ref.repo} ended without a result")
    yield last


def pull(spec: ModelSpec, cache_dir: Path) -> Iterator[bytes]:
    """Fetch ``spec``'s revision as the hub has it now; one JSON line per progress message, then a last line
    with ``done`` (commit, files, bytes) or ``error``. The fetch runs in a child process (``_fetching``): a client
    that hangs up does not stop it (the next pull or cold start finds it done)."""
    source = parse_source(spec.source)
    if source.kind != "hf":
        raise InvalidRequest(f"model {spec.name} comes from {source.kind}:, not the hub; only hf: models are "
                             "pulled (embedded models ship in the worker image)", param="model")
    ref = hub_cache.HubRef.parse(source.ref)
    try:
        for line in _fetching(ref, cache_dir, hub_env(spec), refresh=True):
            yield (json.dumps({**line, "model": spec.name} if "done" in line else line) + "\n").encode()
    except hub_cache.HubFetchError as exc:
        yield (json.dumps({"error": str(exc)}) + "\n").encode()
    except Exception:
        log.exception("pulling %s failed", spec.name)
        yield (json.dumps({"error": f"pulling {spec.name} failed; see the requester log"}) + "\n").encode()
