"""Image fetching over HTTP against a real local server: retried for 5xx/429 by urllib3, never for a 4xx."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from PIL import Image

from vlmops.data.images import HTTP_RETRIES, ImageLoadError, load_image


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 0, 255)).save(buf, format="PNG")
    return buf.getvalue()


class Flaky(BaseHTTPRequestHandler):
    """`/fail-N-STATUS/x.png` answers STATUS to the first N requests for that path, then the image."""

    hits: ClassVar[dict[str, int]] = {}

    def do_GET(self) -> None:
        count = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        _, failures, status = self.path.split("/")[1].split("-")
        if count <= int(failures):
            self.send_response(int(status))
            self.end_headers()
            return
        body = png()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Flaky.hits = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("status", [503, 500, 429])
def test_server_errors_and_throttling_are_retried(server: str, status: int) -> None:
    image = load_image(f"{server}/fail-2-{status}/a.png")
    assert image.size == (4, 4)
    assert Flaky.hits[f"/fail-2-{status}/a.png"] == 3


@pytest.mark.parametrize(("status", "message"), [(404, "HTTP 404 not found"), (403, "HTTP 403 Forbidden")])
def test_client_errors_are_not_retried(server: str, status: int, message: str) -> None:
    with pytest.raises(ImageLoadError, match=message):
        load_image(f"{server}/fail-9-{status}/a.png")
    assert Flaky.hits[f"/fail-9-{status}/a.png"] == 1


def test_a_server_that_keeps_failing_gives_up_after_the_retries(server: str) -> None:
    with pytest.raises(ImageLoadError, match=f"HTTP 503 Service Unavailable after {HTTP_RETRIES} retries"):
        load_image(f"{server}/fail-9-503/a.png")
    assert Flaky.hits["/fail-9-503/a.png"] == HTTP_RETRIES + 1


def test_an_unreachable_host_names_the_image(server: str) -> None:
    with pytest.raises(ImageLoadError, match=r"image http://127\.0\.0\.1:1/x\.png: could not download it"):
        load_image("http://127.0.0.1:1/x.png")
