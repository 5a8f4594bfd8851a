"""Whether a local file holds an S3 object's bytes, by what the object's HEAD says of them.

Two values can say it. The ETag, where it is an MD5: S3 makes it the MD5 of the bytes (for a multipart upload, the MD5
of the parts' MD5s, then `-<count of parts>`) for an object stored unencrypted or with SSE-S3, but not for SSE-KMS,
DSSE-KMS or SSE-C, whose ETags are opaque ("ETag" in the S3 API reference; SeaweedFS keeps the MD5 for those too, AWS
does not). And the additional checksum S3 keeps with the object: the one the uploader sent (boto3 >= 1.36 sends a CRC32
with every upload) or, since December 2024, the CRC64NVME that AWS adds to an upload that came without one. Whole-file
for a single part or a FULL_OBJECT multipart upload; for a COMPOSITE one, like the ETag, the checksum of the parts'
checksums, then `-<count>`.

`content_check` picks the ETag where it is an MD5, else a checksum this install computes (CRC32, SHA1, SHA256, SHA512;
CRC32C and CRC64NVME need awscrt, as botocore's own do), else nothing: then only the size can be compared, and
`ContentCheck.why_size_only` says why.

Neither value says the part size of a multipart upload, only the count of parts: boto3's default 8 MiB and the few other
whole-MiB sizes that make that count are tried (`guessed_part_sizes`); `vlmops.storage` then asks the server.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

MIB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MIB  # boto3's TransferConfig.multipart_chunksize
GUESSED_PART_SIZES = 4
"""How many part sizes `ContentCheck.matches` tries for a multipart value: each is a pass over the file."""
CHECKSUMS = ("CRC64NVME", "CRC32C", "CRC32", "SHA1", "SHA256", "SHA512")
"""The checksums a HEAD reports (`Checksum<NAME>`), fastest to compute first; an object normally has one."""
ETAG = "ETag"
"""`ContentCheck.algorithm` of an MD5-based ETag."""

_MD5_ETAG = re.compile(r"[0-9a-f]{32}(-[1-9][0-9]*)?")
_ENCRYPTION = {"aws:kms": "SSE-KMS", "aws:kms:dsse": "DSSE-KMS"}


class _Hash(Protocol):
    def update(self, chunk: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


@dataclass(frozen=True)
class ContentCheck:
    """What a local file must hash to, to hold an object's bytes (`content_check` reads it off the object's HEAD)."""

    algorithm: str | None
    """`ETAG` (an MD5-based one), a checksum's name ("CRC32", "SHA256", ...), or None: only the size can be compared."""
    expected: str = ""
    """The ETag (hex) or the checksum (base64) as S3 gives it; the value of an upload in N parts ends with `-N`."""
    why_size_only: str = ""
    """Where `algorithm` is None: why, and what would let the content be checked."""

    @property
    def parts(self) -> int | None:
        """The count of parts `expected` ends with; None for a single part's value."""
        return _part_count(self.expected)

    def matches(self, path: Path, size: int, part_size: int | None = None) -> bool:
        """Whether the file at `path` has `size` bytes that give `expected`. A multipart value is tried with
        `part_size`, else with each of `guessed_part_sizes`. Always False where only the size can be compared."""
        if self.algorithm is None or not (path.is_file() and path.stat().st_size == size):
            return False
        count = self.parts
        if count is None:
            return file_value(path, self.algorithm) == self.expected
        sizes = [part_size] if part_size else guessed_part_sizes(size, count)
        return any(file_value(path, self.algorithm, s) == self.expected for s in sizes)


def content_check(head: Mapping[str, Any]) -> ContentCheck:
    """How to tell that a local file holds the object described by `head` (a HeadObject response, asked with
    ChecksumMode=ENABLED: without it S3 leaves the checksums out)."""
    etag = str(head.get("ETag", "")).strip('"')
    encryption = _encryption(head)
    if encryption is None and _MD5_ETAG.fullmatch(etag):
        return ContentCheck(ETAG, etag)
    hashes = checksum_hashes()
    present = [name for name in CHECKSUMS if head.get(f"Checksum{name}")]
    for name in present:
        if name in hashes:
            return ContentCheck(name, str(head[f"Checksum{name}"]))
    etag_is = (
        f"the ETag of an object with {encryption} is not its MD5" if encryption else f"its ETag {etag!r} is not an MD5"
    )
    if present:
        why = f"{etag_is}, and its {present[0]} checksum needs awscrt, which is not installed (pip install awscrt)"
    else:
        why = (
            f"{etag_is}, and S3 keeps no checksum for this one (uploaded without one, before S3 added one by "
            "default); upload it again with a current AWS CLI or boto3, which send one"
        )
    return ContentCheck(None, why_size_only=why)


def guessed_part_sizes(size: int, count: int) -> list[int]:
    """Part sizes that cut `size` bytes into `count` parts, likeliest first: boto3's default 8 MiB, then whole MiB
    sizes from the smallest up (at most GUESSED_PART_SIZES).

    Uploaders use whole MiB parts (boto3 and the AWS CLI 8 MiB, rclone 5, s3cmd 15, mc 16), and a count of parts
    admits a range of them: 11 MiB in 3 parts is 4+4+3 or 5+5+1 (boto3 with multipart_chunksize=5 MiB).
    """
    if count == 1:
        return [max(size, 1)]  # one part: the whole file, whatever the part size was
    smallest = -(-size // count)  # `count` parts hold `size` bytes...
    largest = (size - 1) // (count - 1)  # ...and `count - 1` of them do not
    whole = range(-(-smallest // MIB) * MIB, largest + 1, MIB)
    default = [DEFAULT_PART_SIZE] if DEFAULT_PART_SIZE in whole else []
    return (default + [s for s in whole if s != DEFAULT_PART_SIZE])[:GUESSED_PART_SIZES]


def file_value(path: Path, algorithm: str, part_size: int | None = None) -> str:
    """The ETag (`algorithm` ETAG) or the checksum S3 gives the file at `path` uploaded whole, or in parts of
    `part_size` (then the digest of the parts' digests, and `-<count>`)."""
    new: Callable[[], _Hash] = _md5 if algorithm == ETAG else checksum_hashes()[algorithm]
    encode = bytes.hex if algorithm == ETAG else (lambda digest: base64.b64encode(digest).decode())
    with path.open("rb") as handle:
        if part_size is None:
            return encode(_digest(handle, new, None))
        digests = []
        while part := _digest(handle, new, part_size):
            digests.append(part)
    combined = new()
    combined.update(b"".join(digests))
    return f"{encode(combined.digest())}-{len(digests)}"


def checksum_hashes() -> dict[str, Callable[[], _Hash]]:
    """The S3 checksums this install computes, by name: botocore's own (its CRC32 is zlib's), and CRC32C and CRC64NVME
    only where awscrt is installed, as botocore decides for the checksums it checks itself."""
    from botocore import httpchecksum
    from botocore.compat import HAS_CRT, has_minimum_crt_version

    hashes: dict[str, Callable[[], _Hash]] = {
        "CRC32": httpchecksum.Crc32Checksum,
        "SHA1": httpchecksum.Sha1Checksum,
        "SHA256": httpchecksum.Sha256Checksum,
        "SHA512": httpchecksum.Sha512Checksum,
    }
    if HAS_CRT:
        hashes["CRC32C"] = httpchecksum.CrtCrc32cChecksum
        if has_minimum_crt_version((0, 23, 4)):
            hashes["CRC64NVME"] = httpchecksum.CrtCrc64NvmeChecksum
    return hashes


def _encryption(head: Mapping[str, Any]) -> str | None:
    """The server-side encryption that makes the ETag opaque (SSE-KMS, DSSE-KMS, SSE-C); None for none or SSE-S3."""
    if head.get("SSECustomerAlgorithm"):
        return "SSE-C"
    sse = head.get("ServerSideEncryption")
    if sse in (None, "AES256"):  # AES256 is SSE-S3, whose ETags are MD5s as a plain object's are
        return None
    return _ENCRYPTION.get(str(sse), f"encryption {sse}")


def _part_count(value: str) -> int | None:
    """The count of parts a multipart value (`<digest>-<count>`) ends with; None for a single part's."""
    _, dash, count = value.rpartition("-")
    return int(count) if dash and count.isdigit() else None


def _digest(handle: Any, new: Callable[[], _Hash], limit: int | None) -> bytes:
    """`new`'s digest of the next `limit` bytes of `handle` (None: all the rest); b"" when there are none."""
    digest, read = new(), 0
    while limit is None or read < limit:
        block = handle.read(MIB if limit is None else min(MIB, limit - read))
        if not block:
            break
        digest.update(block)
        read += len(block)
    return digest.digest() if read or limit is None else b""


def _md5() -> _Hash:
    return hashlib.md5(usedforsecurity=False)
