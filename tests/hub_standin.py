"""A stand-in for the Hugging Face hub: the file endpoints ``huggingface_hub`` uses, over real HTTP.

The real client reaches it through ``HF_ENDPOINT``. Written from the hub's documented wire (the client's
``hf_api.py`` and ``file_download.py`` read against it), not from our code:

* ``GET /api/models/{repo}/revision/{rev}``: the model's info, with ``sha`` (the commit) and ``siblings``;
* ``GET /api/models/{repo}/tree/{rev}?recursive=...``: every file with ``size``, ``oid`` (its git blob id) and,
  for LFS files, ``lfs: {oid: sha256, size}``;
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag`` (the LFS sha256
  or the blob id) and ``Content-Length``;
* a missing repository is a 401 with ``X-Error-Code: RepoNotFound`` (as the hub answers an anonymous caller),
  a gated one without the right token a 401 with ``X-Error-Code: GatedRepo``.

Files at or above ``LFS_FROM`` bytes (and every ``*.safetensors``) are listed as LFS files. Every request is
recorded (``requests``); ``corrupt`` and ``cut`` make one file arrive altered or short.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_FROM = 10_000


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()  # git's object id (sha1 by definition)


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    token: str | None = None  # gated: only this bearer token may read it

    @classmethod
    def from_folder(cls, folder: Path, **kw) -> Repo:
        return cls({str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()},
                   **kw)

    def is_lfs(self, path: str) -> bool:
        return path.endswith(".safetensors") or len(self.files[path]) >= LFS_FROM

    def entry(self, path: str) -> dict:
        data = self.files[path]
        out: dict = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
        if self.is_lfs(path):
            out["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return out


@dataclass
class HubStandIn:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    corrupt: set[str] = field(default_factory=set)  # paths served with one byte changed
    cut: set[str] = field(default_factory=set)  # paths served short (the connection closes early)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloads(self, repo: str) -> dict[str, int]:
        """GETs of each file of ``repo``."""
        out: dict[str, int] = {}
        prefix = f"/{repo}/resolve/"
        for method, path in self.requests:
            if method == "GET" and path.startswith(prefix):
                name = path[len(prefix):].split("/", 1)[1]
                out[name] = out.get(name, 0) + 1
        return out

    # ---- the wire --------------------------------------------------------------------------------------

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str],
              send_body: bool = True) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        h.end_headers()
        if send_body:
            h.wfile.write(body)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str, send_body: bool) -> None:
        self._send(h, status, json.dumps({"error": message}).encode(),
                   {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message},
                   send_body)

    def _repo(self, h: BaseHTTPRequestHandler, name: str, send_body: bool) -> Repo | None:
        repo = self.repos.get(name)
        if repo is None:
            self._error(h, 401, "RepoNotFound", "Repository Not Found", send_body)
            return None
        if repo.token is not None and h.headers.get("Authorization") != f"Bearer {repo.token}":
            self._error(h, 401, "GatedRepo", "Access to this model is restricted", send_body)
            return None
        return repo

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        url = urlparse(h.path)
        path = unquote(url.path)
        with self.lock:
            self.requests.append((h.command, path))
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            for marker in ("/revision/", "/tree/"):
                if marker in rest:
                    name, _, rev = rest.partition(marker)
                    repo = self._repo(h, name, body)
                    if repo is None:
                        return
                    if rev.split("/")[0] not in ("main", repo.commit):
                        self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
                        return
                    if marker == "/revision/":
                        info = {"id": name, "modelId": name, "sha": repo.commit, "private": repo.token is not None,
                                "siblings": [{"rfilename": p} for p in repo.files]}
                        out = json.dumps(info).encode()
                    else:
                        out = json.dumps([repo.entry(p) for p in sorted(repo.files)]).encode()
                    self._send(h, 200, out, {"Content-Type": "application/json"}, body)
                    return
        if "/resolve/" in path:
            name, _, rest = path.lstrip("/").partition("/resolve/")
            repo = self._repo(h, name, body)
            if repo is None:
                return
            rev, _, file = rest.partition("/")
            if rev not in ("main", repo.commit):
                self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
                return
            if file not in repo.files:
                self._error(h, 404, "EntryNotFound", f"{file} not found", body)
                return
            data = repo.files[file]
            etag = hashlib.sha256(data).hexdigest() if repo.is_lfs(file) else git_blob_id(data)
            headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": repo.commit,
                       "ETag": f'"{etag}"', "Accept-Ranges": "none"}
            if file in self.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            if file in self.cut and body:
                headers["Content-Length"] = str(len(data))
                self._send(h, 200, data[: len(data) // 2], headers)
                h.close_connection = True
                return
            self._send(h, 200, data, headers, body)
            return
        self._error(h, 404, "NotFound", f"no route {path}", body)
