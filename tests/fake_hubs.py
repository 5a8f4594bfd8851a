"""Local stand-ins for the ModelScope and HF hub HTTP APIs, so the real clients download from 127.0.0.1.

Each serves repositories from folders on disk: `repos[(repo_id, revision)] = folder`. Only the routes the
clients' snapshot downloads use are answered (ModelScope 1.40 / modelscope-hub: file listing and file
download; huggingface_hub: revision info, tree listing, resolve), with HTTP Range support so the clients'
resume logic runs. Every request is recorded in `requests` for assertions.

Point the clients here with `use_modelscope` (sets `MODELSCOPE_ENDPOINT`, which modelscope-hub reads once per
process, and resets that config) and `use_hf_hub` (`HF_ENDPOINT` is read when huggingface_hub is imported, so
it patches the two constants made from it).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlparse

import pytest


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    range: str | None


@dataclass
class FakeHub:
    """State shared with the request handler."""

    repos: dict[tuple[str, str], Path] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    truncate_once: set[str] = field(default_factory=set)
    """File paths whose first full download sends half the body and hangs up (to exercise resume)."""
    listed_sizes: dict[str, int] = field(default_factory=dict)
    """File path -> size to report in listings instead of the real one (to exercise the disk check)."""
    hold: dict[str, float] = field(default_factory=dict)
    """File path -> seconds its first download waits before it is sent (a slow transfer, for two clients at once)."""
    held: threading.Event = field(default_factory=threading.Event)
    """Set when a download in `hold` starts waiting."""
    url: str = ""

    def files(self, repo_id: str, revision: str) -> dict[str, Path] | None:
        folder = self.repos.get((repo_id, revision))
        if folder is None:
            return None
        return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}

    def downloads(self, name: str) -> list[Request]:
        """GET requests that fetched file `name` (either hub's route)."""
        return [
            r
            for r in self.requests
            if r.method == "GET" and (r.query.get("FilePath") == name or r.path.endswith("/" + name))
        ]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.hub.requests.append(Request(self.command, unquote(url.path), query, self.headers.get("Range")))
        path = unquote(url.path)
        for pattern, handler in self.routes:
            match = re.fullmatch(pattern, path)
            if match:
                handler(self, match, query, head)
                return
        self._send(404, b'{"error": "not found"}', {"Content-Type": "application/json"}, head)

    # ModelScope -------------------------------------------------------------------------------------
    def _ms_files(self, match: re.Match[str], query: dict[str, str], head: bool) -> None:
        repo_id, revision = match.group(1), query.get("Revision", "master")
        files = self.hub.files(repo_id, revision)
        if files is None:
            body = {"Code": 10010205001, "Message": f"model {repo_id} not exist", "Success": False}
            self._send(404, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
            return
        entries = [
            {
                "Path": name,
                "Name": name.rsplit("/", 1)[-1],
                "Type": "blob",
                "Size": self.hub.listed_sizes.get(name, path.stat().st_size),
                "Sha256": _sha256(path),
                "Revision": revision,
            }
            for name, path in files.items()
        ]
        body = {"Code": 200, "Success": True, "Data": {"Files": entries}}
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)

    def _ms_file(self, match: re.Match[str], query: dict[str, str], head: bool) -> None:
        files = self.hub.files(match.group(1), query.get("Revision", "master"))
        name = query.get("FilePath", "")
        if files is None or name not in files:
            self._send(404, b'{"Code": 404, "Message": "file not exist"}', {"Content-Type": "application/json"}, head)
            return
        self._send_file(name, files[name], head, {})

    # HF hub -----------------------------------------------------------------------------------------
    def _hf_revision(self, match: re.Match[str], query: dict[str, str], head: bool) -> None:
        repo_id, revision = match.group(1), (match.group(2) if match.lastindex == 2 else "main")
        files = self.hub.files(repo_id, revision)
        if files is None:
            self._hf_missing(head)
            return
        siblings = [{"rfilename": n, "size": p.stat().st_size} for n, p in files.items()]
        body = {"id": repo_id, "modelId": repo_id, "sha": _commit(repo_id, revision), "siblings": siblings}
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)

    def _hf_tree(self, match: re.Match[str], query: dict[str, str], head: bool) -> None:
        repo_id, revision = match.group(1), match.group(2)
        files, _ = self._hf_files(repo_id, revision)
        if files is None:
            self._hf_missing(head)
            return
        entries = [
            {
                "type": "file",
                "path": n,
                "size": self.hub.listed_sizes.get(n, p.stat().st_size),
                "oid": hashlib.sha1(p.read_bytes(), usedforsecurity=False).hexdigest(),
            }
            for n, p in files.items()
        ]
        self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)

    def _hf_resolve(self, match: re.Match[str], query: dict[str, str], head: bool) -> None:
        repo_id, revision, name = match.group(1), match.group(2), match.group(3)
        files, commit = self._hf_files(repo_id, revision)
        if files is None:
            self._hf_missing(head)
            return
        if name not in files:
            self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            return
        headers = {"ETag": f'"{_sha256(files[name])}"', "X-Repo-Commit": commit}
        self._send_file(name, files[name], head, headers)

    def _hf_files(self, repo_id: str, revision: str) -> tuple[dict[str, Path] | None, str]:
        """The files of a revision given by name or by commit, and that commit."""
        for rid, rev in self.hub.repos:
            if rid == repo_id and revision in (rev, _commit(rid, rev)):
                return self.hub.files(rid, rev), _commit(rid, rev)
        return None, ""

    def _hf_missing(self, head: bool) -> None:
        self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)

    # plumbing ---------------------------------------------------------------------------------------
    def _send_file(self, name: str, path: Path, head: bool, headers: dict[str, str]) -> None:
        if not head and name in self.hub.hold:
            seconds = self.hub.hold.pop(name)
            self.hub.held.set()
            time.sleep(seconds)
        data = path.read_bytes()
        wanted = self.headers.get("Range")
        if wanted and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)):
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            part = data[start : end + 1]
            headers = {
                **headers,
                "Content-Range": f"bytes {start}-{end}/{len(data)}",
                "Accept-Ranges": "bytes",
            }
            self._send(206, part, headers, head)
            return
        if not head and name in self.hub.truncate_once:
            self.hub.truncate_once.discard(name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(200, data, {**headers, "Accept-Ranges": "bytes"}, head)

    def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    routes: ClassVar = [
        (r"/api/v1/models/([^/]+/[^/]+)/repo/files", _ms_files),
        (r"/api/v1/models/([^/]+/[^/]+)/repo", _ms_file),
        (r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", _hf_revision),
        (r"/api/models/([^/]+/[^/]+)", _hf_revision),  # model_info of the default branch
        (r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", _hf_tree),
        (r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", _hf_resolve),
    ]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _commit(repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode(), usedforsecurity=False).hexdigest()


@contextmanager
def serve(hub: FakeHub) -> Iterator[FakeHub]:
    """Serve `hub` on a free loopback port until the block exits; `hub.url` is its base URL."""
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


def use_modelscope(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point the ModelScope client at `url` the way a user would: MODELSCOPE_ENDPOINT."""
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", url)
    # modelscope-hub reads the environment once, into a process-wide config: drop it so it is read again
    # (monkeypatch puts the old one back after the test).
    monkeypatch.setattr("modelscope_hub.config._default_config", None)


def use_hf_hub(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point huggingface_hub at `url` (what HF_ENDPOINT does when set before the import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
