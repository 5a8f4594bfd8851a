"""Which value a local file is checked against (`content_check`), from HEAD responses as AWS gives them.

SeaweedFS keeps an MD5 ETag for encrypted objects (tests/test_storage.py checks them against its real HEADs), so
the opaque ETags AWS gives SSE-KMS and SSE-C objects come here as the HEAD fields botocore parses them into; the
expected checksums are computed with zlib and hashlib, apart from the code under test.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.compat import HAS_CRT

from vlmops.s3_content import ETAG, MIB, ContentCheck, content_check

OPAQUE_ETAG = '"5d41402abc4b2a76b9719d911017c592"'  # 32 hex digits, as an SSE-KMS ETag looks: not the file's MD5


def _crc32(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(4, "big")


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _composite(data: bytes, part_size: int, digest: Any) -> str:
    """S3's checksum of a multipart upload: the checksum of the parts' checksums, then `-<count>`."""
    parts = [digest(data[i : i + part_size]) for i in range(0, len(data), part_size)]
    return f"{_b64(digest(b''.join(parts)))}-{len(parts)}"


def _damaged(path: Path) -> Path:
    copy = path.with_name(f"{path.name}.damaged")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize(
    ("size", "head"),
    [
        pytest.param(  # a bucket with default SSE-KMS encryption; boto3 >= 1.36 sent a CRC32 with the upload
            1000,
            lambda data: {
                "ETag": OPAQUE_ETAG,
                "ServerSideEncryption": "aws:kms",
                "SSEKMSKeyId": "arn:aws:kms:eu-west-1:111122223333:key/1234abcd",
                "ChecksumCRC32": _b64(_crc32(data)),
                "ChecksumType": "FULL_OBJECT",
            },
            id="sse-kms",
        ),
        pytest.param(  # upload_file of 9 MiB: 8 MiB parts, a CRC32 each; the object's is the CRC32 of those two
            9 * MIB,
            lambda data: {
                "ETag": OPAQUE_ETAG.replace('"', "") + "-2",
                "ServerSideEncryption": "aws:kms",
                "ChecksumCRC32": _composite(data, 8 * MIB, _crc32),
                "ChecksumType": "COMPOSITE",
            },
            id="sse-kms-multipart",
        ),
        pytest.param(
            1000,
            lambda data: {
                "ETag": OPAQUE_ETAG,
                "ServerSideEncryption": "aws:kms:dsse",
                "ChecksumSHA256": _b64(hashlib.sha256(data).digest()),
            },
            id="dsse-kms-sha256",
        ),
        pytest.param(
            1000,
            lambda data: {
                "ETag": OPAQUE_ETAG,
                "SSECustomerAlgorithm": "AES256",
                "ChecksumSHA1": _b64(hashlib.sha1(data).digest()),
            },
            id="sse-c-sha1",
        ),
    ],
)
def test_an_encrypted_object_is_checked_by_its_checksum_not_its_etag(
    size: int, head: Callable[[bytes], dict[str, Any]], tmp_path: Path
) -> None:
    """An SSE-KMS, DSSE-KMS or SSE-C object's ETag is not its MD5 on AWS, so the MD5 rule refused every such download
    as corrupted and never found one already there. Its checksum is what tells: the file matches it, a copy with one
    byte changed does not."""
    path = tmp_path / "model.safetensors"
    data = os.urandom(size)
    path.write_bytes(data)
    response = head(data)

    check = content_check(response)

    assert check.algorithm not in (ETAG, None)
    assert check.parts == (2 if response.get("ChecksumType") == "COMPOSITE" else None)
    assert check.matches(path, size)
    assert not check.matches(_damaged(path), size)
    assert not check.matches(path, size + 1)
    assert not ContentCheck(ETAG, response["ETag"].strip('"')).matches(path, size)  # the old rule, whatever the file


def test_an_etag_that_is_an_md5_is_used_as_before(tmp_path: Path) -> None:
    """Unencrypted and SSE-S3 objects keep the MD5 ETag check, a checksum beside it or not."""
    path = tmp_path / "config.json"
    path.write_bytes(b'{"model_type": "deepseek_vl"}')
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    for encryption in ({}, {"ServerSideEncryption": "AES256"}):
        check = content_check({"ETag": f'"{md5}"', "ChecksumCRC32": "AAAAAA==", **encryption})
        assert (check.algorithm, check.expected) == (ETAG, md5)
        assert check.matches(path, path.stat().st_size)
    # an ETag some server made that is no MD5 (not 32 hex digits), on an unencrypted object: its checksum, then
    check = content_check({"ETag": '"opaque-etag"', "ChecksumCRC32": _b64(_crc32(path.read_bytes()))})
    assert check.algorithm == "CRC32" and check.matches(path, path.stat().st_size)


def test_an_encrypted_object_without_a_checksum_here_has_only_its_size(tmp_path: Path) -> None:
    """No checksum (an upload from before S3 kept one by default), or only one this install cannot compute (CRC64NVME,
    which S3 adds to uploads that came without one, needs awscrt): nothing to compare the content with, and the
    reason says which, and what to do."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(1000))

    none = content_check({"ETag": OPAQUE_ETAG, "ServerSideEncryption": "aws:kms"})
    assert none.algorithm is None and not none.matches(path, 1000)
    assert "the ETag of an object with SSE-KMS is not its MD5, and S3 keeps no" in none.why_size_only
    assert "upload it again" in none.why_size_only

    crc64 = content_check({"ETag": OPAQUE_ETAG, "SSECustomerAlgorithm": "AES256", "ChecksumCRC64NVME": "AAAAAAAAAAA="})
    if HAS_CRT:  # botocore[crt] installed: CRC64NVME is computed here too
        assert crc64.algorithm == "CRC64NVME"
    else:
        assert crc64.algorithm is None and not crc64.matches(path, 1000)
        assert (
            "an object with SSE-C" in crc64.why_size_only and "CRC64NVME checksum needs awscrt" in crc64.why_size_only
        )
