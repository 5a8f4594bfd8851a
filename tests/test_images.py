"""Image loading: HTTP against a real local server (retried for 5xx/429 by urllib3, never for a 4xx; redirects
checked hop by hop; private addresses refused unless allowed), and unusual but valid images decoded right."""

from __future__ import annotations

import io
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from tests.image_server import image_server, self_signed_certificate, serving_images
from vlmops.config import StorageConfig
from vlmops.data.fetch import HTTP_RETRIES, UrlFetchError, UrlPolicy, check_url, fetch_url
from vlmops.data.images import ImageLoadError, load_image, open_image_bytes

LOOPBACK = StorageConfig(url_allow_networks=["127.0.0.1"])  # the test server, and nothing else non-public


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
    image = load_image(f"{server}/fail-2-{status}/a.png", LOOPBACK)
    assert image.size == (4, 4)
    assert Flaky.hits[f"/fail-2-{status}/a.png"] == 3


@pytest.mark.parametrize(("status", "message"), [(404, "HTTP 404 not found"), (403, "HTTP 403 Forbidden")])
def test_client_errors_are_not_retried(server: str, status: int, message: str) -> None:
    with pytest.raises(ImageLoadError, match=message):
        load_image(f"{server}/fail-9-{status}/a.png", LOOPBACK)
    assert Flaky.hits[f"/fail-9-{status}/a.png"] == 1


def test_a_server_that_keeps_failing_gives_up_after_the_retries(server: str) -> None:
    with pytest.raises(ImageLoadError, match=f"HTTP 503 Service Unavailable after {HTTP_RETRIES} retries"):
        load_image(f"{server}/fail-9-503/a.png", LOOPBACK)
    assert Flaky.hits["/fail-9-503/a.png"] == HTTP_RETRIES + 1


def test_an_unreachable_host_names_the_image(server: str) -> None:
    with pytest.raises(ImageLoadError, match=r"image http://127\.0\.0\.1:1/x\.png: could not download it"):
        load_image("http://127.0.0.1:1/x.png", LOOPBACK)


def test_redirects_are_followed_and_each_hop_is_checked() -> None:
    with image_server() as url:
        image = load_image(f"{url}/redirect?to=/ok.png", LOOPBACK)
        assert image.size == (4, 4)
        with pytest.raises(
            ImageLoadError, match=r"redirected to http://10\.0\.0\.1/a\.png: host 10\.0\.0\.1 .* private"
        ):
            load_image(f"{url}/redirect?to=http://10.0.0.1/a.png", LOOPBACK)
        # the test server itself is refused without the allowlist
        with pytest.raises(ImageLoadError, match="a loopback address: refused by default"):
            load_image(f"{url}/ok.png")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://[::1]/a.png", "::1, a loopback address"),
        ("http://[::ffff:127.0.0.1]/a.png", "127.0.0.1, a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://192.168.1.10/a.png", "private"),
        ("http://100.64.0.1/a.png", "non-public"),  # carrier-grade NAT (shared address space)
        ("http://0.0.0.0/a.png", "unspecified"),
        ("http://localhost/a.png", "loopback"),
        ("ftp://example.com/a.png", "only http:// and https:// URLs"),
        ("http:///a.png", "no host"),
    ],
)
def test_non_public_addresses_and_other_schemes_are_refused(url: str, reason: str) -> None:
    with pytest.raises(UrlFetchError, match=re.escape(reason)):
        check_url(url, UrlPolicy())


def test_an_allowed_network_lets_its_addresses_through() -> None:
    policy = UrlPolicy.from_storage(StorageConfig(url_allow_networks=["10.1.0.0/16", "::1"]))
    check_url("http://10.1.2.3/a.png", policy)
    check_url("http://[::1]/a.png", policy)
    with pytest.raises(UrlFetchError, match="private"):
        check_url("http://10.2.0.1/a.png", policy)


REBINDING_HOST = "images.rebind.test"
PUBLIC = "93.184.215.14"  # a global address: the check up front lets it through
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def rebinding_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Name resolution where REBINDING_HOST answers PUBLIC the first time and 127.0.0.1 from then on, as a
    rebinding DNS server does (other names resolve as usual); the list holds the answers given. No proxy
    from the environment: through one, the peer would be the proxy."""
    resolve = socket.getaddrinfo
    answers: list[str] = []

    def rebinding(host: str, port: object, *args: object, **kwargs: object) -> object:
        if host != REBINDING_HOST:
            return resolve(host, port, *args, **kwargs)  # type: ignore[arg-type]
        answers.append(PUBLIC if not answers else "127.0.0.1")
        return resolve(answers[-1], port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return answers


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_name_that_rebinds_to_loopback_after_the_check_is_refused_at_connect(
    rebinding_dns: list[str], scheme: str
) -> None:
    with serving_images() as server:
        url = f"{scheme}://{REBINDING_HOST}:{server.server_address[1]}/ok.png"
        with pytest.raises(
            UrlFetchError,
            match=rf"host {re.escape(REBINDING_HOST)} connected to 127\.0\.0\.1, a loopback address: refused by "
            r"default.*storage\.url_allow_networks .*its DNS answers changed",
        ):
            fetch_url(url, UrlPolicy())
    assert rebinding_dns == [PUBLIC, "127.0.0.1"]  # once for the check, once to connect (no retry)
    # the server is shut down and its handlers joined: no request line reached it, not even a TLS hello
    assert server.received == []


def test_a_redirect_to_a_name_that_rebinds_is_refused_at_connect(rebinding_dns: list[str]) -> None:
    """The first hop is another loopback address that the policy allows; the redirect's target rebinds."""
    with serving_images() as target, serving_images("127.0.0.2") as first:
        url = f"http://{REBINDING_HOST}:{target.server_address[1]}/ok.png"
        with pytest.raises(
            UrlFetchError,
            match=rf"redirected to {re.escape(url)}: host {re.escape(REBINDING_HOST)} connected to 127\.0\.0\.1, a "
            "loopback address: refused",
        ):
            fetch_url(
                f"{first.url}/redirect?to={url}",
                UrlPolicy.from_storage(StorageConfig(url_allow_networks=["127.0.0.2"])),
            )
    assert rebinding_dns == [PUBLIC, "127.0.0.1"]
    assert first.received == [f"GET /redirect?to={url} HTTP/1.1\r\n".encode()]
    assert target.received == []


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_rebinding_name_reaches_an_allowed_address(
    rebinding_dns: list[str], scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same answers with 127.0.0.1 allowed: the server is reachable, so the refusal above is the check's; over
    https the checked connection still verifies the server's certificate by the host name."""
    certificate = self_signed_certificate(tmp_path, REBINDING_HOST) if scheme == "https" else None
    if certificate:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))
    with serving_images(certificate=certificate) as server:
        url = f"{scheme}://{REBINDING_HOST}:{server.server_address[1]}/ok.png"
        body = fetch_url(url, UrlPolicy.from_storage(LOOPBACK))
    assert open_image_bytes(body).size == (4, 4)
    assert rebinding_dns == [PUBLIC, "127.0.0.1"]
    assert server.received == [b"GET /ok.png HTTP/1.1\r\n"]


def test_through_a_proxy_the_peer_is_the_proxy_and_is_not_checked(
    rebinding_dns: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the module docstring says of proxies: the operator's proxy (here the test server, on loopback, which
    the policy refuses) is connected to; the target's name is checked up front only, and the proxy resolves it."""
    with serving_images() as server:
        monkeypatch.setenv("HTTP_PROXY", server.url)
        url = f"http://{REBINDING_HOST}/ok.png"
        assert open_image_bytes(fetch_url(url, UrlPolicy())).size == (4, 4)
    assert rebinding_dns == [PUBLIC]
    assert server.received == [f"GET {url} HTTP/1.1\r\n".encode()]


def test_a_bad_network_in_the_config_is_an_error() -> None:
    from vlmops.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"storage.url_allow_networks.*'intranet' is not an IP address"):
        load_config(None, ["storage.url_allow_networks=[intranet]"])


def _encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    """A JPEG stored 8 x 4 whose EXIF orientation (6: rotate 90 clockwise) says it stands 4 x 8."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encoded(Image.new("RGB", (8, 4), (200, 0, 0)), "JPEG", exif=exif)


def _animated() -> bytes:
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _transparent_palette() -> bytes:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    return _encoded(image, "PNG", transparency=0)


def _rgba() -> bytes:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black: shows as the white it is laid on
    return _encoded(image, "PNG")


# (name, bytes, size after EXIF, pixel (0,0), pixel (1,1)); JPEG colours are compared loosely
UNUSUAL = [
    ("cmyk jpeg", _encoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"), (4, 4), (255, 0, 0), (255, 0, 0)),
    (
        "16-bit grayscale png",
        _encoded(Image.new("I;16", (4, 4), 32768), "PNG"),
        (4, 4),
        (128, 128, 128),
        (128, 128, 128),
    ),
    ("rgba png", _rgba(), (4, 4), (255, 255, 255), (255, 0, 0)),
    (
        "palette png",
        _encoded(Image.new("RGB", (4, 4), (0, 255, 0)).convert("P"), "PNG"),
        (4, 4),
        (0, 255, 0),
        (0, 255, 0),
    ),
    ("palette png with transparency", _transparent_palette(), (4, 4), (255, 255, 255), (0, 255, 0)),
    ("grayscale png", _encoded(Image.new("L", (4, 4), 77), "PNG"), (4, 4), (77, 77, 77), (77, 77, 77)),
    ("grayscale + alpha png", _encoded(Image.new("LA", (4, 4), (77, 255)), "PNG"), (4, 4), (77, 77, 77), (77, 77, 77)),
    ("exif-rotated jpeg", _exif_rotated(), (4, 8), (200, 0, 0), (200, 0, 0)),
    ("animated gif", _animated(), (4, 4), (255, 0, 0), (255, 0, 0)),
    ("webp", _encoded(Image.new("RGB", (4, 4), (0, 0, 255)), "WEBP", lossless=True), (4, 4), (0, 0, 255), (0, 0, 255)),
]


@pytest.mark.parametrize(("name", "data", "size", "corner", "inside"), UNUSUAL, ids=[u[0] for u in UNUSUAL])
def test_unusual_images_load_as_rgb(
    name: str, data: bytes, size: tuple[int, int], corner: tuple[int, ...], inside: tuple[int, ...]
) -> None:
    image = open_image_bytes(data, name)
    assert image.mode == "RGB"
    assert image.size == size
    for got, want in ((image.getpixel((0, 0)), corner), (image.getpixel((1, 1)), inside)):
        assert max(abs(g - w) for g, w in zip(got, want, strict=True)) <= 3, (got, want)  # type: ignore[arg-type]


def test_16_bit_rgb_png_keeps_its_colour(tmp_path: Path) -> None:
    """A 48-bit PNG (written by hand: Pillow writes no 16-bit RGB) decodes to the 8-bit colour."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + struct.pack(">HHH", 65535, 32768, 0) * 2
    png16 = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(row * 2))
        + chunk(b"IEND", b"")
    )
    path = tmp_path / "deep.png"
    path.write_bytes(png16)
    assert load_image(str(path)).getpixel((1, 1)) == (255, 128, 0)


def test_an_error_shows_a_long_path_whole_and_a_data_uri_cut(tmp_path: Path) -> None:
    """Paths over 80 characters were cut in the middle like a data: URI's payload, so the message named no file the
    user could find."""
    deep = tmp_path / ("a-folder-with-a-long-name-" * 4) / "notes.png"
    deep.parent.mkdir()
    deep.write_text("not a picture")
    with pytest.raises(ImageLoadError, match=rf"^image {re.escape(str(deep))}: not a readable image"):
        load_image(str(deep), StorageConfig())
    payload = "data:image/png;base64," + "QUJD" * 100 + "!"
    with pytest.raises(ImageLoadError, match=r"^image data:image/png;base64,\w{38}\.\.\.\w{9}!: bad base64"):
        load_image(payload, StorageConfig())
