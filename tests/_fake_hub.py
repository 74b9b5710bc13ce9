"""A local stand-in for the Hugging Face Hub: the few routes ``hf_hub_download`` and
``snapshot_download`` (huggingface_hub 1.x) call, serving files from local directories.

Routes (the Hub's public HTTP API, as huggingface_hub's ``file_download.py``, ``hf_api.py`` and
``_snapshot_download.py`` use them):

* ``GET /api/models/{org}/{name}/revision/{rev}`` -> ``{"id", "sha", "siblings"}``
* ``GET /api/models/{org}/{name}/tree/{rev}[/path]?recursive=...`` -> ``[{"type": "file", "path", "size", "oid"}]``
* ``HEAD|GET /{org}/{name}/resolve/{rev}/{path}`` -> the file, with ``X-Repo-Commit`` and ``ETag``

Only loopback, started and stopped by the test (``with FakeHub({"org/name": dir}) as hub: hub.url``).
``hub.requests`` records every path asked for, so a test can tell a download from a cache hit.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a 40-hex revision, as the Hub returns


def _etag(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FakeHub:
    def __init__(self, repos: dict):
        self.repos = {repo: Path(d) for repo, d in repos.items()}
        self.requests: list[str] = []
        self._etags: dict = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                """Quiet: the test reads ``hub.requests`` instead of a request log on stderr."""

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ routes

    def _files(self, repo: str) -> list[Path]:
        root = self.repos[repo]
        return sorted(p for p in root.rglob("*") if p.is_file())

    def _etag(self, path: Path) -> str:
        if path not in self._etags:
            self._etags[path] = _etag(path)
        return self._etags[path]

    def _handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(req.path).path)
        self.requests.append(f"{req.command} {path}")
        parts = [p for p in path.split("/") if p]
        try:
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                repo = f"{parts[2]}/{parts[3]}"
                if repo not in self.repos:
                    return self._send(req, 404, b'{"error": "Repository not found"}', head,
                                      {"X-Error-Code": "RepoNotFound"})
                root = self.repos[repo]
                if parts[4] == "revision":
                    body = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                            "siblings": [{"rfilename": p.relative_to(root).as_posix()} for p in self._files(repo)]}
                else:
                    body = [{"type": "file", "path": p.relative_to(root).as_posix(), "size": p.stat().st_size,
                             "oid": self._etag(p)[:40]} for p in self._files(repo)]
                return self._send(req, 200, json.dumps(body).encode(), head, {"Content-Type": "application/json"})
            if len(parts) >= 5 and parts[2] == "resolve":
                repo = f"{parts[0]}/{parts[1]}"
                if repo not in self.repos:
                    return self._send(req, 404, b"", head, {"X-Error-Code": "RepoNotFound"})
                f = self.repos[repo].joinpath(*parts[4:])
                if not f.is_file():
                    return self._send(req, 404, b"", head, {"X-Error-Code": "EntryNotFound"})
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{self._etag(f)}"',
                           "Content-Type": "application/octet-stream"}
                return self._send_file(req, f, head, headers)
            return self._send(req, 404, b"", head)
        except (BrokenPipeError, ConnectionResetError):
            return None

    @staticmethod
    def _send(req, status: int, body: bytes, head: bool, headers: dict = None) -> None:
        req.send_response(status)
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)

    @staticmethod
    def _send_file(req, f: Path, head: bool, headers: dict) -> None:
        req.send_response(200)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(f.stat().st_size))
        req.end_headers()
        if head:
            return
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                req.wfile.write(block)
