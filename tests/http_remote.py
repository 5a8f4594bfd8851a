"""A folder served as DVC's http remote over loopback: GET and HEAD read its files, POST and PUT write them (a `dvc
push`); with a login, a request without it is answered 401, as a remote behind basic auth; with a status, every request
is answered with it, as a remote whose front end is up and whose storage is down (503)."""

from __future__ import annotations

import base64
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class _RemoteHandler(SimpleHTTPRequestHandler):
    def __init__(self, *args: Any, authorization: str | None, status: int | None, **kwargs: Any):
        self.authorization = authorization
        self.status = status
        super().__init__(*args, **kwargs)

    def _refused(self) -> bool:
        """Answers the request itself where the remote is down or the login is wrong; whether it did."""
        if self.status is not None:
            self.send_error(self.status)
        elif self.authorization is not None and self.headers.get("Authorization") != self.authorization:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="dvc"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            return False
        return True

    def do_GET(self) -> None:
        if not self._refused():
            super().do_GET()

    def do_HEAD(self) -> None:
        if not self._refused():
            super().do_HEAD()

    def do_POST(self) -> None:
        if self._refused():
            return
        target = Path(self.translate_path(self.path))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self._body())
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PUT(self) -> None:
        self.do_POST()

    def _body(self) -> bytes:
        """The request's body: fsspec uploads in chunked transfer encoding (a chunk's size in hex, then the chunk)."""
        if "chunked" not in self.headers.get("Transfer-Encoding", ""):
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b""
        while size := int(self.rfile.readline().split(b";")[0], 16):
            body += self.rfile.read(size)
            self.rfile.readline()  # the CRLF after the chunk
        self.rfile.readline()  # the CRLF after the last, empty chunk
        return body

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def http_remote(folder: Path, login: tuple[str, str] | None = None, status: int | None = None) -> Iterator[str]:
    """`folder` as an http remote at `127.0.0.1:PORT` (yielded), asking for `login` (user, password) when given, and
    answering every request with `status` when given."""
    authorization = None
    if login is not None:
        authorization = "Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
    folder.mkdir(parents=True, exist_ok=True)
    handler = functools.partial(_RemoteHandler, authorization=authorization, status=status, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
