"""Image loading from a local path, an http(s) URL, an s3:// URI or a data: URI."""

from __future__ import annotations

import base64
import binascii
import functools
import io
from pathlib import Path

import requests
from PIL import Image, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from vlmops.config import StorageConfig
from vlmops.errors import UserInputError

HTTP_TIMEOUT_S = 30
HTTP_RETRIES = 3
HTTP_BACKOFF_S = 0.5  # urllib3 backs off exponentially from this factor between tries
# Worth another try: the server's own failures and throttling. A 4xx other than 429 answers the same again.
HTTP_RETRY_STATUSES = (429, 500, 502, 503, 504)


class ImageLoadError(UserInputError):
    """An image that could not be read; the message names the image and the fix."""


def read_image_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    """The raw bytes behind an image reference."""
    if uri.startswith("data:"):
        return _data_uri_bytes(uri)
    if uri.startswith(("http://", "https://")):
        return _http_bytes(uri)
    if uri.startswith("s3://"):
        from vlmops.storage import read_object

        try:
            return read_object(uri, storage)
        except Exception as err:
            raise ImageLoadError(
                f"image {uri}: cannot read it from S3 ({err}); check storage.endpoint_url and credentials"
            ) from err
    path = Path(uri).expanduser()
    if not path.is_file():
        raise ImageLoadError(f"image {uri}: file not found (relative paths resolve against the dataset file's folder)")
    return path.read_bytes()


def load_image(uri: str, storage: StorageConfig | None = None) -> Image.Image:
    """Open an image as RGB."""
    return open_image_bytes(read_image_bytes(uri, storage), uri)


def open_image_bytes(data: bytes, uri: str = "(bytes)") -> Image.Image:
    """Decode image bytes as RGB; `uri` only names the image in errors."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise ImageLoadError(f"image {_short(uri)}: not a readable image ({err})") from err
    return image.convert("RGB")


def _data_uri_bytes(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or ";base64" not in header:
        raise ImageLoadError(f"image {_short(uri)}: only base64 data: URIs are supported (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise ImageLoadError(f"image {_short(uri)}: bad base64 payload ({err})") from err


@functools.cache
def http_session() -> requests.Session:
    """The session image downloads share: pooled connections, and urllib3's retry with backoff for
    connection errors, 5xx and 429 (honouring Retry-After), never for another 4xx."""
    retry = Retry(
        total=HTTP_RETRIES,
        backoff_factor=HTTP_BACKOFF_S,
        status_forcelist=HTTP_RETRY_STATUSES,
        allowed_methods=frozenset({"GET"}),
        raise_on_status=False,  # the last response comes back, and its status goes into the message
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _http_bytes(url: str) -> bytes:
    try:
        response = http_session().get(url, timeout=HTTP_TIMEOUT_S)
    except requests.RequestException as err:
        raise ImageLoadError(
            f"image {url}: could not download it after {HTTP_RETRIES} retries ({err}); is the host reachable?"
        ) from err
    if response.status_code == 404:
        raise ImageLoadError(f"image {url}: HTTP 404 not found")
    if not response.ok:
        tried = f" after {HTTP_RETRIES} retries" if response.status_code in HTTP_RETRY_STATUSES else ""
        raise ImageLoadError(f"image {url}: HTTP {response.status_code} {response.reason}{tried}")
    return response.content


def _short(uri: str) -> str:
    return uri if len(uri) <= 80 else uri[:60] + "..." + uri[-10:]
