"""Hub models fetched once into the model cache, verified, and then loaded with no network at all.

A ``hf:ORG/NAME`` model (``hf:ORG/NAME@REVISION`` pins a branch, tag or commit) lives under
``$FMA_CACHE_DIR/hub/ORG--NAME/``:

* ``<commit>/``: the files a worker loads, complete (``fma-complete.json`` lists each file with its size and
  digest, written last, after every file was checked);
* ``refs/<revision>``: the commit a revision resolved to when it was fetched. A later cold start reads it and
  never asks the hub again: a branch is pinned at its first fetch until ``fma models pull`` fetches it anew.

What is fetched: configuration, tokenizer and generation files, and the weights as safetensors (``*.bin``
only where the repository has no safetensors); other frameworks' weights (TensorFlow, Flax, ONNX, Core ML,
GGUF, Rust) and repository furniture are left on the hub.

**Verified, never trusted.** Every file is checked against the hub's own tree listing: an LFS file's sha256
(the weights), any other file's git blob id (sha1 of ``blob <size>\\0<bytes>``). A short, long or altered file
fails the fetch and leaves nothing behind: the files are written into a temporary sibling that is renamed into
place only when all of them check out.

**Once, with many asking.** A file lock per model: the first fetches, the others wait for the lock and find the
folder complete. Nothing else uses the network: ``huggingface_hub`` for the listing and the downloads (its
``HF_ENDPOINT`` and token handling), nothing else. The token (``HF_TOKEN``, on a cluster from a Secret) goes to
the hub and nowhere else: never into a log line or an error message.

torch-free, so the requester, the CLI (``fma models pull``) and a worker can all fill the cache.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COMPLETE = "fma-complete.json"
SKIP = ("*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "*.mlmodel", "*.gguf", "*.pt", "*.pth",
        "*.ckpt", "*.pb", "onnx/*", "coreml/*", "tf_model*", "flax_model*", "rust_model*", "*.md", ".gitattributes",
        "*.png", "*.jpg", "*.gif")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubFetchError(RuntimeError):
    """A hub model could not be put in the cache; the message says why and what to do (never the token)."""


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str = "main"

    @classmethod
    def parse(cls, ref: str) -> HubRef:
        repo, _, revision = ref.partition("@")
        bad_repo = repo.count("/") > 1 or not all(_NAME.fullmatch(part) for part in repo.split("/"))
        bad_revision = bool(revision) and (".." in revision or revision.startswith("/") or "\\" in revision)
        if bad_repo or bad_revision or ".." in repo:
            raise HubFetchError(f"{ref!r} is not a hub model id (ORG/NAME or NAME, optionally @REVISION)")
        return cls(repo, revision or "main")

    def folder(self, cache_dir: Path) -> Path:
        return cache_dir / "hub" / self.repo.replace("/", "--")


@dataclass(frozen=True)
class CachedModel:
    folder: Path
    commit: str
    files: int
    bytes: int


def cached(ref: HubRef, cache_dir: Path) -> CachedModel | None:
    """The complete folder for ``ref`` if the cache has it (no network)."""
    base = ref.folder(cache_dir)
    try:
        commit = (base / "refs" / ref.revision.replace("/", "--")).read_text().strip()
    except OSError:
        commit = ref.revision  # a commit id asked for directly
    if not _COMMIT.fullmatch(commit):  # a folder name from a file or a request: only ever a commit id
        return None
    folder = base / commit
    try:
        marker = json.loads((folder / COMPLETE).read_text())
        return CachedModel(folder, commit, len(marker["files"]), sum(int(f["size"]) for f in marker["files"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def from_hf_cache(ref: HubRef) -> Path | None:
    """The model's snapshot in huggingface_hub's own cache (``HF_HOME``), complete for ``ref``'s revision, or
    None. For models put there before this cache existed, or by hand for an offline machine: no network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref.repo, revision=ref.revision, local_files_only=True))
    except Exception:  # not there, or not complete: the caller fetches, or says what to do
        return None


def wanted(paths: list[str]) -> list[str]:
    """The files a worker needs, from a repository's file list."""
    keep = [p for p in paths if not any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p.rsplit("/", 1)[-1], pat)
                                        for pat in SKIP)]
    if any(p.endswith(".safetensors") for p in keep):
        keep = [p for p in keep if not p.endswith(".bin") or not p.rsplit("/", 1)[-1].startswith("pytorch_model")]
    # transformers loads model.safetensors or the shards its index names; a repository may also hold the same
    # weights in another layout (Mistral's consolidated.safetensors, 14 GB): not fetched.
    if "model.safetensors" in keep or "model.safetensors.index.json" in keep:
        keep = [p for p in keep if "/" in p or not p.endswith(".safetensors") or p.startswith("model")]
    return sorted(keep)


def _git_blob_id(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # git's own object id: sha1 by definition
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check(path: Path, entry: Any) -> dict[str, Any]:
    """The file as listed by the hub, or HubFetchError: size first (a cut download), then the digest."""
    size = entry.lfs.size if entry.lfs else entry.size
    got = path.stat().st_size if path.is_file() else -1
    if got != size:
        raise HubFetchError(f"{entry.path}: {got} bytes arrived, the hub lists {size}: the download was cut or "
                            "altered; nothing was kept, the next request fetches again")
    if entry.lfs:
        digest, want, kind = _sha256(path), entry.lfs.sha256, "sha256"
    else:
        digest, want, kind = _git_blob_id(path), entry.blob_id, "git-blob"
    if digest != want:
        raise HubFetchError(f"{entry.path}: {kind} {digest[:12]}... is not the hub's {want[:12]}...: the file "
                            "is corrupt; nothing was kept, the next request fetches again")
    return {"path": entry.path, "size": size, kind: digest}


def _explain(ref: HubRef, exc: BaseException) -> HubFetchError:
    from huggingface_hub import errors

    refused = HubFetchError(f"the hub refused {ref.repo}: it is gated or private and the token was refused or "
                            "missing (set HF_TOKEN, on a cluster from a Secret; see the README)")
    if isinstance(exc, errors.GatedRepoError):  # a subclass of RepositoryNotFoundError: first
        return refused
    if isinstance(exc, errors.RepositoryNotFoundError):
        return HubFetchError(f"no model {ref.repo} on the hub (or it is private and no token was given)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubFetchError(f"{ref.repo} has no revision {ref.revision!r}")
    if getattr(getattr(exc, "response", None), "status_code", 0) in (401, 403):
        return refused
    return HubFetchError(f"could not fetch {ref.repo}@{ref.revision} from the hub: {type(exc).__name__}")


def fetch(ref: HubRef, cache_dir: Path, *, token: str | None = None, endpoint: str | None = None,
          progress: Callable[[str], None] | None = None, refresh: bool = False,
          lock_timeout_s: float = 3600.0) -> CachedModel:
    """The model in the cache, fetched (listed, downloaded, checked, renamed into place) if it is not there.

    ``refresh`` asks the hub what the revision points at now (``fma models pull``); otherwise a cached revision
    is used as it is, without the network.
    """
    from filelock import FileLock

    say = progress or (lambda msg: log.info("%s", msg))
    from huggingface_hub import constants

    if not refresh and (hit := cached(ref, cache_dir)) is not None:
        return hit
    base = ref.folder(cache_dir)
    if constants.HF_HUB_OFFLINE:  # before any write: a worker's cache may be a read-only mount
        raise HubFetchError(f"{ref.repo}@{ref.revision} is not in the model cache ({base}) and this process "
                            "is offline (HF_HUB_OFFLINE=1): the requester fetches a hub model before it starts "
                            "the worker; or fill the cache with `fma models pull`")
    base.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base / ".lock"), timeout=lock_timeout_s):
        if not refresh and (hit := cached(ref, cache_dir)) is not None:  # fetched while we waited
            return hit
        return _fetch_locked(ref, base, token=token, endpoint=endpoint or os.environ.get("HF_ENDPOINT"), say=say)


def _fetch_locked(ref: HubRef, base: Path, *, token: str | None, endpoint: str | None,
                  say: Callable[[str], None]) -> CachedModel:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token)
    started = time.monotonic()
    try:
        commit = api.model_info(ref.repo, revision=ref.revision).sha
        listing = {e.path: e for e in api.list_repo_tree(ref.repo, revision=commit, recursive=True)
                   if isinstance(e, RepoFile)}
    except Exception as exc:  # huggingface_hub's errors, connection errors: one message that says what to do
        raise _explain(ref, exc) from None
    if not commit or not _COMMIT.fullmatch(commit):
        raise HubFetchError(f"the hub gave no commit id for {ref.repo}@{ref.revision}")
    names = wanted(list(listing))
    if "config.json" not in names:
        raise HubFetchError(f"{ref.repo} has no config.json: not a transformers model")
    target = base / commit
    if (target / COMPLETE).is_file():  # the revision moved to a commit we already hold
        _point(base, ref, commit)
        return cached(HubRef(ref.repo, commit), base.parent.parent)  # type: ignore[return-value]
    for stale in base.glob(".*.tmp-*"):  # a fetch killed outright (SIGKILL, OOM, eviction); the lock is ours
        shutil.rmtree(stale, ignore_errors=True)
    tmp = base / f".{commit}.tmp-{os.getpid()}"
    total = sum((listing[n].lfs.size if listing[n].lfs else listing[n].size) for n in names)
    say(f"fetching {ref.repo}@{commit[:12]}: {len(names)} files, {total / 1e6:.1f} MB")
    try:
        checked = []
        done = 0
        for name in names:
            try:
                hf_hub_download(ref.repo, name, revision=commit, local_dir=tmp, endpoint=endpoint, token=token)
            except Exception as exc:
                known = _explain(ref, exc)
                if known.args[0].startswith("could not fetch"):  # a cut connection, a short file, a timeout
                    known = HubFetchError(f"{name}: the download failed ({type(exc).__name__}); nothing was "
                                          "kept, the next request fetches again")
                raise known from None
            checked.append(_check(tmp / name, listing[name]))
            done += checked[-1]["size"]
            say(f"{name}: {checked[-1]['size'] / 1e6:.1f} MB checked ({done / max(total, 1):.0%})")
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's own download metadata
        marker = {"repo": ref.repo, "revision": ref.revision, "commit": commit, "files": checked,
                  "seconds": round(time.monotonic() - started, 3), "fetched_at": int(time.time())}
        (tmp / COMPLETE).write_text(json.dumps(marker, indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)  # an earlier, interrupted rename
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point(base, ref, commit)
    say(f"fetched {ref.repo} in {time.monotonic() - started:.1f} s -> {target}")
    return CachedModel(target, commit, len(checked), sum(f["size"] for f in checked))


def _point(base: Path, ref: HubRef, commit: str) -> None:
    refs = base / "refs"
    refs.mkdir(exist_ok=True)
    tmp = refs / f".{os.getpid()}.tmp"
    tmp.write_text(commit + "\n")
    os.replace(tmp, refs / ref.revision.replace("/", "--"))


def main(argv: list[str] | None = None) -> int:
    """``python -m fma_common.hub_cache ORG/NAME[@REVISION] CACHE_DIR [--refresh]``: one fetch, its progress as
    JSON lines on stdout, then ``{"done": ...}`` or ``{"error": ...}`` (exit 1). ``HF_ENDPOINT`` and ``HF_TOKEN``
    come from the environment, never the command line (which ``ps`` shows). The requester runs fetches this way:
    in its own process a fetch would hold gevent's event loop while it hashes a file or while huggingface_hub's
    native Xet client downloads one, and a native thread cannot share gevent's sockets."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    refresh = "--refresh" in args
    ref_text, cache = [a for a in args if a != "--refresh"][:2]

    def emit(line: dict[str, Any]) -> None:
        try:
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):  # nobody reads any more (a pull whose client left): fetch on
            pass

    try:
        got = fetch(HubRef.parse(ref_text), Path(cache), token=os.environ.get("HF_TOKEN") or None,
                    endpoint=os.environ.get("HF_ENDPOINT") or None, refresh=refresh,
                    progress=lambda message: emit({"message": message}))
    except HubFetchError as exc:
        emit({"error": str(exc)})
        return 1
    except Exception as exc:  # never the token: huggingface_hub's messages do not carry it, and none is printed
        emit({"error": f"the fetch failed: {type(exc).__name__}"})
        return 1
    emit({"done": True, "commit": got.commit, "files": got.files, "bytes": got.bytes})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
