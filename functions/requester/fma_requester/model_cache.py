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
import queue
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
    hit = hub_cache.cached(hub_cache.HubRef.parse(source.ref), cache_dir)
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
        hub_cache.fetch(ref, cache_dir, token=env.get("HF_TOKEN") or None, endpoint=env.get("HF_ENDPOINT") or None,
                        progress=progress)
    except hub_cache.HubFetchError as exc:
        raise RuntimeError(str(exc)) from None
    return True


def pull(spec: ModelSpec, cache_dir: Path) -> Iterator[bytes]:
    """Fetch ``spec``'s revision as the hub has it now; one JSON line per progress message, then a last line
    with ``done`` (commit, files, bytes) or ``error``. The fetch runs on its own thread: a client that hangs up
    does not stop it (the next pull or cold start finds it done)."""
    source = parse_source(spec.source)
    if source.kind != "hf":
        raise InvalidRequest(f"model {spec.name} comes from {source.kind}:, not the hub; only hf: models are "
                             "pulled (embedded models ship in the worker image)", param="model")
    ref = hub_cache.HubRef.parse(source.ref)
    env = hub_env(spec)
    lines: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def work() -> None:
        try:
            got = hub_cache.fetch(ref, cache_dir, token=env.get("HF_TOKEN") or None,
                                  endpoint=env.get("HF_ENDPOINT") or None, refresh=True,
                                  progress=lambda message: lines.put({"message": message}))
            lines.put({"done": True, "model": spec.name, "commit": got.commit, "files": got.files,
                       "bytes": got.bytes})
        except hub_cache.HubFetchError as exc:
            lines.put({"error": str(exc)})
        except Exception:
            log.exception("pulling %s failed", spec.name)
            lines.put({"error": f"pulling {spec.name} failed; see the requester log"})
        finally:
            lines.put(None)

    threading.Thread(target=work, name=f"fma-pull-{spec.name}", daemon=True).start()
    while (line := lines.get()) is not None:
        yield (json.dumps(line) + "\n").encode()
