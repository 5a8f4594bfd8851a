"""Image loading: HTTP against a real local server (retried for 5xx/429 by urllib3, never for a 4xx; redirects
checked hop by hop; private addresses refused unless allowed), and unusual but valid images decoded right."""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from tests.image_server import image_server
from vlmops.config import StorageConfig
from vlmops.data.fetch import HTTP_RETRIES, UrlFetchError, UrlPolicy, check_url
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
