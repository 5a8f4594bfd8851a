"""A real local HTTP server that serves images and misbehaves on purpose, for the URL-fetching tests.

Routes: `/ok.png` an image; `/flaky.png` 503 while the server's `down` is set, then the image; `/missing.png` 404;
`/slow.png` answers after `SLOW_S`; `/paced.png` an image after the server's `pace_s` (a round trip's wait, PACE_S
unless set; its `most_at_once` says how many were in flight together); `/held.png` an image once the server's
`release` is set (a client stuck until a test lets it go); `/page.png` an HTML page;
`/big.png` a 64 KiB image with its length announced, `/big-unannounced.png` the same without a length;
`/redirect?to=URL` a 302 to URL (relative or absolute: `file://`, a private address, `/ok.png`). Over https
with `serving_images(certificate=...)` and a certificate from `self_signed_certificate`.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

SLOW_S = 3.0
PACE_S = 0.05


def png_bytes(size: tuple[int, int] = (4, 4), colour: tuple[int, int, int] = (0, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: about 3 * side * side bytes."""
    buf = io.BytesIO()
    Image.merge("RGB", [Image.effect_noise((side, side), 100).convert("L") for _ in range(3)]).save(buf, format="PNG")
    return buf.getvalue()


class ImageServer(ThreadingHTTPServer):
    """The server, with the first line of every request it received (any bytes at all: a TLS hello too)."""

    # Connections waiting to be accepted, as a real server's (socketserver's 5 dropped a burst of 16 downloads'
    # connects, each then retried by the kernel a second later).
    request_queue_size = 128

    def __init__(self, host: str = "127.0.0.1", certificate: tuple[Path, Path] | None = None) -> None:
        super().__init__((host, 0), ImageRoutes)
        self.received: list[bytes] = []
        self.down = False  # /flaky.png answers 503 while set
        self.pace_s = PACE_S
        self.in_flight = 0  # /paced.png requests being answered, and the most of them at once
        self.most_at_once = 0
        self.counting = threading.Lock()
        self.release = threading.Event()  # /held.png waits for it
        self.scheme = "https" if certificate else "http"
        if certificate:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*certificate)
            self.socket = context.wrap_socket(self.socket, server_side=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.server_address[0]}:{self.server_address[1]}"


class ImageRoutes(BaseHTTPRequestHandler):
    server: ImageServer
    raw_requestline: bytes  # set by BaseHTTPRequestHandler.handle_one_request; typeshed leaves it out

    def parse_request(self) -> bool:
        self.server.received.append(self.raw_requestline)  # before parsing: a line that is not HTTP counts too
        return super().parse_request()

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/ok.png" or (parts.path == "/flaky.png" and not self.server.down):
            self._send(200, png_bytes(), "image/png")
        elif parts.path == "/flaky.png":
            self._send(503, b"try again later", "text/plain")
        elif parts.path == "/slow.png":
            time.sleep(SLOW_S)
            self._send(200, png_bytes(), "image/png")
        elif parts.path == "/paced.png":
            with self.server.counting:
                self.server.in_flight += 1
                self.server.most_at_once = max(self.server.most_at_once, self.server.in_flight)
            time.sleep(self.server.pace_s)
            with self.server.counting:
                self.server.in_flight -= 1
            self._send(200, png_bytes(), "image/png")
        elif parts.path == "/held.png":
            self.server.release.wait()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client may have died meanwhile
                self._send(200, png_bytes(), "image/png")
        elif parts.path == "/page.png":
            self._send(200, b"<html><body>Not found, but 200</body></html>", "text/html")
        elif parts.path == "/big.png":
            self._send(200, noise_png(148), "image/png")
        elif parts.path == "/big-unannounced.png":
            self._send(200, noise_png(148), "image/png", announce=False)
        elif parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"no such image", "text/plain")

    def _send(self, status: int, body: bytes, kind: str, announce: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        if announce:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")  # HTTP/1.0: the body ends when the connection does
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that stops at a size limit
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serving_images(host: str = "127.0.0.1", certificate: tuple[Path, Path] | None = None) -> Iterator[ImageServer]:
    """A running ImageRoutes server (its `url` is `http://HOST:PORT`; https with a (certificate, key) pair)."""
    httpd = ImageServer(host, certificate)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.release.set()
        httpd.shutdown()
        httpd.server_close()


@contextmanager
def image_server() -> Iterator[str]:
    """`http://127.0.0.1:PORT` of a running ImageRoutes server."""
    with serving_images() as httpd:
        yield httpd.url


def self_signed_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """PEM files (certificate, key) of a certificate for the DNS name `name` that signs itself: a client that
    takes the certificate file as its CA bundle verifies the server by that name."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / f"{name}.crt", folder / f"{name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file
