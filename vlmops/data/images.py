"""Image loading from a local path, an http(s) URL, an s3:// URI or a data: URI, decoded to plain RGB.

Whatever a dataset holds comes out the same way: EXIF orientation applied (a phone photo stands the way it
was taken), transparency laid on white, the first frame of an animation, 16-bit and CMYK pixels scaled to
8-bit RGB. Anything Pillow cannot decode, or an image whose header claims more pixels than
`MAX_IMAGE_PIXELS` (a decompression bomb: a few KiB that would take gigabytes to unpack), is an
`ImageLoadError` that names the image.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from vlmops.config import StorageConfig
from vlmops.data.fetch import UrlFetchError, UrlPolicy, fetch_url
from vlmops.errors import RunFailed, UserInputError

MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""Largest image decoded (8192 x 8192). Below Pillow's own limit (89M pixels), so Pillow never gets as far
as its warning: the bomb is refused here, from the header, before any pixel is unpacked."""
WHITE = (255, 255, 255)


class ImageStoreError(RunFailed):
    """An image could not be read for a reason that may pass (no connection, a 5xx, throttling), so the work stops
    rather than treat the record as bad for good: a batch job without rejecting it (a rerun goes on from the shards
    not yet done), a dataset validation without leaving it out of the snapshot."""


# S3 error codes that may pass (besides any 5xx or 429): throttling and timeouts.
S3_RETRYABLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"})


class ImageLoadError(UserInputError):
    """An image that could not be read; the message names the image and the fix. `retryable`: the failure may pass
    (no connection, a 5xx, S3 throttling): a batch job stops rather than reject the record for good. `field`: where
    the reader was given the image (`images[1]`, `query`), once `at` has named it."""

    def __init__(
        self, message: str, *, retryable: bool = False, kind: str = "unreadable_image", field: str = ""
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.kind = kind  # sorts a batch job's rejects (vlmops.infer.job_output.REJECT_KINDS)
        self.field = field

    def at(self, field: str) -> ImageLoadError:
        """This error named by the field that holds the image, as a reader of several says which one failed:
        `images[1]: image x.png: file not found (...)`."""
        return ImageLoadError(f"{field or 'image'}: {self}", retryable=self.retryable, kind=self.kind, field=field)


def read_image_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    """The raw bytes behind an image reference (URLs within `storage`'s url_* limits)."""
    if uri.startswith("data:"):
        return _data_uri_bytes(uri)
    if uri.startswith(("http://", "https://")):
        try:
            return fetch_url(uri, UrlPolicy.from_storage(storage))
        except UrlFetchError as err:
            raise ImageLoadError(f"image {_short(uri)}: {err}", retryable=err.retryable) from err
    if uri.startswith("s3://"):
        return _s3_bytes(uri, storage)
    path = Path(uri).expanduser()
    if not path.is_file():
        raise ImageLoadError(
            f"image {uri}: file not found (relative paths resolve against the dataset file's folder)",
            kind="missing_image",
        )
    data = path.read_bytes()
    if not data:
        raise ImageLoadError(f"image {uri}: the file is empty (0 bytes)", kind="not_an_image")
    return data


def load_image(uri: str, storage: StorageConfig | None = None) -> Image.Image:
    """Open an image as RGB."""
    return open_image_bytes(read_image_bytes(uri, storage), uri)


def open_image_bytes(data: bytes, uri: str = "(bytes)") -> Image.Image:
    """Decode image bytes as RGB; `uri` only names the image in errors."""
    if not data:
        raise ImageLoadError(f"image {_short(uri)}: empty (0 bytes)", kind="not_an_image")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # a format whose size Pillow checks before ours can be
        raise ImageLoadError(_too_large(uri, str(err).partition(",")[0]), kind="image_too_large") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(
            f"image {_short(uri)}: not a readable image (no image format starts like {data[:16]!r})",
            kind="not_an_image",
        ) from err
    except OSError as err:
        raise ImageLoadError(f"image {_short(uri)}: not a readable image ({err})", kind="not_an_image") from err
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageLoadError(_too_large(uri, f"{width} x {height} = {width * height:,} pixels"), kind="image_too_large")
    try:
        image.load()  # of an animation: the first frame
        return _as_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError) as err:
        # OSError: truncated or corrupt data; SyntaxError and ValueError: some decoders' way of saying the same.
        raise ImageLoadError(f"image {_short(uri)}: not a readable image ({err})", kind="not_an_image") from err


def _as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. A plain `convert("RGB")` would clip 16-bit values to white and turn transparent pixels into
    whatever colour they hide (usually black)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = image.point(lambda v: v / 256).convert("L") if image.mode == "I" else _scale_16bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _scale_16bit(image: Image.Image) -> Image.Image:
    # "I;16*" images do not take point() with a float function: widen to 32-bit first.
    return image.convert("I").point(lambda v: v / 256).convert("L")


def _too_large(uri: str, size: str) -> str:
    return (
        f"image {_short(uri)}: too large to decode ({size}; the limit is {MAX_IMAGE_PIXELS:,} pixels): "
        "a decompression bomb, or an image to resize before training"
    )


def _s3_bytes(uri: str, storage: StorageConfig | None) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError, ParamValidationError

    from vlmops.storage import read_object

    try:
        return read_object(uri, storage)
    except NoCredentialsError as err:
        raise ImageLoadError(
            f"image {uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        ) from err
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            reason = "no such object"
        elif code == "NoSuchBucket":
            reason = "no such bucket"
        elif code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            reason = f"access denied ({code}); check the S3 credentials"
        else:
            reason = str(err)
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        retryable = status >= 500 or status == 429 or code in S3_RETRYABLE_CODES
        raise ImageLoadError(
            f"image {uri}: {reason} (storage.endpoint_url: the S3 server)",
            retryable=retryable,
            kind="missing_image" if reason.startswith("no such") else "unreadable_image",
        ) from err
    except ValueError as err:
        raise ImageLoadError(f"image {uri}: cannot read it from S3 ({err}); check storage.endpoint_url") from err
    except BotoCoreError as err:  # no connection, a timeout, a broken read: after botocore's own retries
        raise ImageLoadError(
            f"image {uri}: cannot read it from S3 ({err}); check storage.endpoint_url and credentials",
            retryable=not isinstance(err, (ParamValidationError, NoRegionError)),
        ) from err


def _data_uri_bytes(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or ";base64" not in header:
        raise ImageLoadError(f"image {_short(uri)}: only base64 data: URIs are supported (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError as err:  # binascii.Error, or a non-ASCII character (a plain ValueError)
        raise ImageLoadError(
            f"image {_short(uri)}: bad base64 payload ({err}); encode the image again (base64 uses only A-Z a-z 0-9 + /"
            " and = padding)"
        ) from err


def _short(uri: str) -> str:
    """`uri` as an error shows it: a data: URI's payload (megabytes of base64) cut to its ends; a path or URL whole,
    which is what the user needs to find the image (one over 80 characters was cut as well)."""
    if not uri.startswith("data:") or len(uri) <= 80:
        return uri
    return uri[:60] + "..." + uri[-10:]
