"""Image loading from a local path, an http(s) URL, an s3:// URI or a data: URI."""

from __future__ import annotations

import base64
import binascii
import io
import time
from pathlib import Path

import requests
from PIL import Image, UnidentifiedImageError

from vlmops.config import StorageConfig
from vlmops.errors import UserInputError

HTTP_TIMEOUT_S = 30
HTTP_RETRIES = 3


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


def _http_bytes(url: str) -> bytes:
    last: Exception | None = None
    for attempt in range(HTTP_RETRIES):
        try:
            response = requests.get(url, timeout=HTTP_TIMEOUT_S)
            if response.status_code == 404:
                raise ImageLoadError(f"image {url}: HTTP 404 not found")
            response.raise_for_status()
            return response.content
        except ImageLoadError:
            raise
        except requests.RequestException as err:
            last = err
            time.sleep(0.5 * 2**attempt)
    raise ImageLoadError(
        f"image {url}: could not download it after {HTTP_RETRIES} tries ({last}); is the host reachable?"
    )


def _short(uri: str) -> str:
    return uri if len(uri) <= 80 else uri[:60] + "..." + uri[-10:]
