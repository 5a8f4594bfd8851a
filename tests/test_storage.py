"""S3 helpers: URI parsing, and folder <-> prefix copies against a real SeaweedFS S3 server."""

from __future__ import annotations

import datetime
import io
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vlmops.config import StorageConfig
from vlmops.s3_content import ETAG, ContentCheck
from vlmops.storage import (
    STALE_PARTIAL_S,
    CorruptedDownloadError,
    download_prefix,
    list_objects,
    parse_s3_uri,
    s3_client,
    stat_object,
    upload_folder,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

    from tests.s3_server import S3Server


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/a/b", ("bucket", "a/b")),
        ("s3://bucket/a/b/", ("bucket", "a/b")),
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
    ],
)
def test_parse_s3_uri(uri: str, expected: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["/data/x", "https://bucket/x", "s3://", "s3:///prefix"])
def test_parse_s3_uri_refuses(uri: str) -> None:
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        parse_s3_uri(uri)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path, through symlinked folders too."""
    files = (Path(folder, name) for folder, _, names in os.walk(root, followlinks=True) for name in names)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(files)}


@pytest.mark.integration
def test_round_trip_skips_what_is_already_there(s3_env: S3Server, tmp_path: Path) -> None:
    client = s3_client()  # endpoint and credentials from the AWS_* environment
    client.create_bucket(Bucket="roundtrip")
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (src / "sub").symlink_to(tmp_path / "elsewhere")  # a linked folder is uploaded like any other
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(os.urandom(300_000))
    (src / "big.safetensors").write_bytes(os.urandom(9 * 1024 * 1024))  # above boto3's multipart threshold

    first = upload_folder(client, src, "s3://roundtrip/models/m1")
    assert sorted(first.copied) == ["big.safetensors", "config.json", "sub/weights.bin"]
    objects = {o.key: o for o in list_objects(client, "roundtrip", "models/m1")}
    assert set(objects) == {"models/m1/big.safetensors", "models/m1/config.json", "models/m1/sub/weights.bin"}
    assert objects["models/m1/big.safetensors"].etag.endswith("-2")  # multipart: the MD5-of-MD5s form
    assert list_objects(client, "roundtrip", "models/m") == []  # a prefix is a folder, not a string prefix

    again = upload_folder(client, src, "s3://roundtrip/models/m1", progress=False)
    assert again.copied == [] and len(again.skipped) == 3

    dest = tmp_path / "dest"
    down = download_prefix(client, "s3://roundtrip/models/m1", dest)
    assert _tree(dest) == _tree(src)
    assert down.bytes_copied == sum(len(v) for v in _tree(src).values())
    assert not list(dest.rglob(".*"))  # no partial files left behind

    # A run killed mid-download leaves partial files (its own, and boto3's temporary one): the next download removes
    # those nothing has written to for STALE_PARTIAL_S; one being written now (another run's copy) stays. None of
    # them is uploaded.
    stale = [dest / ".big.safetensors.part", dest / "sub" / ".weights.bin.part.3fA9c0dE"]
    live = dest / ".config.json.part"
    for path in [*stale, live]:
        path.write_bytes(b"half a file")
    for path in stale:
        os.utime(path, (time.time() - STALE_PARTIAL_S - 60,) * 2)
    assert download_prefix(client, "s3://roundtrip/models/m1", dest, progress=False).copied == []
    assert list(dest.rglob(".*")) == [live]
    pushed = upload_folder(client, dest, "s3://roundtrip/models/m1", progress=False)
    assert pushed.copied == [] and len(pushed.skipped) == 3
    live.unlink()

    # same size, different content: not "already there"
    damaged = dest / "big.safetensors"
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    big = objects["models/m1/big.safetensors"]
    assert not ContentCheck(ETAG, big.etag).matches(damaged, big.size)
    repaired = download_prefix(client, "s3://roundtrip/models/m1", dest, progress=False)
    assert repaired.copied == ["big.safetensors"] and sorted(repaired.skipped) == [
        "config.json",
        "sub/weights.bin",
    ]
    assert _tree(dest) == _tree(src)

    only_json = download_prefix(
        client, "s3://roundtrip/models/m1", tmp_path / "json", patterns=["*.json"], progress=False
    )
    assert only_json.copied == ["config.json"]


@pytest.mark.integration
def test_multipart_objects_are_checked_for_any_part_size(s3_env: S3Server, tmp_path: Path) -> None:
    """A multipart object's ETag (the MD5 of its parts' MD5s, and their count) is checked after a download as a single
    part's MD5 is. 11.5 MiB in 5 MiB parts (boto3 with multipart_chunksize=5 MiB) is one of the whole-MiB sizes that
    make 3 parts; in 5.5 MiB parts, a size no guess gives, the server says it. Both arrive checked and are "already
    there" the next time (the old guesses, 8 MiB and the 4 MiB the count implies, copied them again on every run).
    Parts of unequal sizes give an ETag no part size reproduces: that download is refused, its partial file removed."""
    from boto3.s3.transfer import TransferConfig

    from vlmops.storage import MIB

    client = s3_client()
    client.create_bucket(Bucket="multipart")
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(11 * MIB + MIB // 2)
    for name, part_size in [("five.safetensors", 5 * MIB), ("odd.safetensors", 5 * MIB + MIB // 2)]:
        (src / name).write_bytes(data)
        config = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=part_size)
        client.upload_file(str(src / name), "multipart", f"equal/{name}", Config=config)
    objects = list_objects(client, "multipart", "equal")
    assert [o.etag[-2:] for o in objects] == ["-3", "-3"]  # 5 + 5 + 1.5 MiB and 5.5 + 5.5 + 0.5 MiB

    dest = tmp_path / "dest"
    first = download_prefix(client, "s3://multipart/equal", dest, progress=False)
    assert sorted(first.copied) == ["five.safetensors", "odd.safetensors"] and _tree(dest) == _tree(src)
    again = download_prefix(client, "s3://multipart/equal", dest, progress=False)
    assert (again.copied, sorted(again.skipped)) == ([], ["five.safetensors", "odd.safetensors"])
    assert upload_folder(client, dest, "s3://multipart/equal", progress=False).copied == []

    # parts of 5 and 6.5 MiB, as a hand-made multipart upload may have them
    upload = client.create_multipart_upload(Bucket="multipart", Key="unequal/model.safetensors")
    parts: list[CompletedPartTypeDef] = []
    for number, body in enumerate([data[: 5 * MIB], data[5 * MIB :]], start=1):
        part = client.upload_part(
            Bucket="multipart",
            Key="unequal/model.safetensors",
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=body,
        )
        parts.append({"PartNumber": number, "ETag": part["ETag"]})
    client.complete_multipart_upload(
        Bucket="multipart",
        Key="unequal/model.safetensors",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": parts},
    )
    with pytest.raises(
        CorruptedDownloadError, match=r"unequal/model\.safetensors arrived corrupted, or was uploaded in"
    ):
        download_prefix(client, "s3://multipart/unequal", tmp_path / "unequal", progress=False)
    assert not [p for p in (tmp_path / "unequal").rglob("*") if p.is_file()]  # no file under its name, no partial


@pytest.mark.integration
def test_a_download_damaged_on_the_way_is_refused_and_the_next_one_passes(s3_env: S3Server, tmp_path: Path) -> None:
    """Bytes damaged between the server and here (a proxy flips a byte of each reply's marker) are refused as a
    transfer failure, not as bad input: `CorruptedDownloadError` (exit 1, retried by a Prefect task), its partial file
    removed. A large object comes in ranges that nothing checks on the way: its ETag check after the copy finds it; a
    small one in one request, whose CRC32 (boto3 sends one with each upload, the server keeps it) botocore checks as
    it reads. The same download straight from the server passes: running again is the fix."""
    from tests.corrupting_proxy import corrupting_proxy
    from vlmops.storage import MIB

    client = s3_client()
    client.create_bucket(Bucket="damaged")
    marker = b"<<a byte flipped on the way>>"
    sizes = {"large": 9 * MIB, "small": 1000}  # above and below boto3's 8 MiB threshold for ranged downloads
    (tmp_path / "src").mkdir()
    for name, size in sizes.items():
        (tmp_path / "src" / name).write_bytes(os.urandom(size // 2) + marker + os.urandom(size // 2))
        client.upload_file(str(tmp_path / "src" / name), "damaged", f"{name}/model.safetensors")

    port = int(s3_env.endpoint_url.rsplit(":", 1)[1])
    with corrupting_proxy(port, marker) as url:
        through_proxy = s3_client(StorageConfig(endpoint_url=url, region="us-east-1"))
        for name in sizes:
            with pytest.raises(
                CorruptedDownloadError, match=rf"s3://damaged/{name}/model\.safetensors arrived corrupted"
            ):
                download_prefix(through_proxy, f"s3://damaged/{name}", tmp_path / name / "dest", progress=False)
            assert not [p for p in (tmp_path / name / "dest").rglob("*") if p.is_file()]  # nothing, not even a partial

    for name in sizes:
        download_prefix(client, f"s3://damaged/{name}", tmp_path / name / "dest", progress=False)
        assert (tmp_path / name / "dest" / "model.safetensors").read_bytes() == (tmp_path / "src" / name).read_bytes()


@pytest.mark.integration
def test_encrypted_objects_are_checked_by_their_checksum(
    s3_env: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SSE-KMS objects (a bucket's default encryption, as enterprises set it) and SSE-C ones on a real server: their
    HEADs name the encryption, so their ETags are not taken for MD5s (AWS's are not; SeaweedFS's happen to be) and
    the CRC32 that boto3 sends with each upload checks them instead, whole for a small file, part by part for a
    multipart one. Both are "already there" the next time; one damaged on the way is refused. An object uploaded
    without a checksum is downloaded with a warning that only its size was checked, and copied again the next time:
    a file of the same size may be another version of it (a retrained checkpoint has the size of the last one)."""
    import boto3
    from botocore.config import Config

    from tests.corrupting_proxy import corrupting_proxy
    from vlmops.s3_content import content_check
    from vlmops.storage import MIB

    client = s3_client()
    client.create_bucket(Bucket="kms")
    client.put_bucket_encryption(
        Bucket="kms",
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": "models"}}]
        },
    )
    marker = b"<<a byte flipped on the way>>"
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "deepseek_vl"}')
    (src / "model.safetensors").write_bytes(os.urandom(5 * MIB) + marker + os.urandom(4 * MIB))  # 2 parts
    (src / "legacy.json").write_text('{"uploaded": "without a checksum"}')
    upload_folder(client, src, "s3://kms/m", progress=False)
    no_checksums = boto3.session.Session().client(
        "s3",
        endpoint_url=s3_env.endpoint_url,
        region_name=s3_env.region,
        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"),
    )
    no_checksums.put_object(Bucket="kms", Key="m/legacy.json", Body=(src / "legacy.json").read_bytes())

    heads = {name: client.head_object(Bucket="kms", Key=f"m/{name}", ChecksumMode="ENABLED") for name in _tree(src)}
    assert {h["ServerSideEncryption"] for h in heads.values()} == {"aws:kms"}
    checks = {name: content_check(head) for name, head in heads.items()}
    assert {name: (c.algorithm, c.parts) for name, c in checks.items()} == {
        "config.json": ("CRC32", None),
        "legacy.json": (None, None),
        "model.safetensors": ("CRC32", 2),
    }
    assert "the ETag of an object with SSE-KMS is not its MD5, and S3 keeps no" in checks["legacy.json"].why_size_only

    dest = tmp_path / "dest"
    with caplog.at_level("WARNING", logger="vlmops.storage"):
        first = download_prefix(client, "s3://kms/m", dest, progress=False)
    assert sorted(first.copied) == ["config.json", "legacy.json", "model.safetensors"] and _tree(dest) == _tree(src)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("s3://kms/m/legacy.json: only its size could be checked")
    again = download_prefix(client, "s3://kms/m", dest, progress=False)
    assert (again.copied, sorted(again.skipped)) == (["legacy.json"], ["config.json", "model.safetensors"])

    (dest / "model.safetensors").unlink()
    with corrupting_proxy(int(s3_env.endpoint_url.rsplit(":", 1)[1]), marker) as url:
        through_proxy = s3_client(StorageConfig(endpoint_url=url, region="us-east-1"))
        with pytest.raises(CorruptedDownloadError, match=r"model\.safetensors arrived corrupted.*multipart CRC32"):
            download_prefix(through_proxy, "s3://kms/m", dest, progress=False)
    assert not (dest / "model.safetensors").exists()

    # uploaded again by this boto3, the object gains a CRC32, and is "already there" from then on
    assert upload_folder(client, src, "s3://kms/m", progress=False).copied == ["legacy.json"]
    last = download_prefix(client, "s3://kms/m", dest, progress=False)
    assert (last.copied, sorted(last.skipped)) == (["model.safetensors"], ["config.json", "legacy.json"])

    # SSE-C: the HEAD (which needs the key) names the algorithm; the checksum checks the bytes
    key = os.urandom(32)
    client.create_bucket(Bucket="ssec")
    client.put_object(Bucket="ssec", Key="config.json", Body=b"{}", SSECustomerAlgorithm="AES256", SSECustomerKey=key)
    head = client.head_object(
        Bucket="ssec", Key="config.json", SSECustomerAlgorithm="AES256", SSECustomerKey=key, ChecksumMode="ENABLED"
    )
    (tmp_path / "ssec.json").write_bytes(b"{}")
    check = content_check(head)
    assert head["SSECustomerAlgorithm"] == "AES256" and check.algorithm == "CRC32"
    assert check.matches(tmp_path / "ssec.json", 2)


@pytest.mark.integration
def test_explicit_endpoint_and_empty_prefix(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    client = s3_client(StorageConfig(endpoint_url=s3_server.endpoint_url, region="us-east-1"))
    client.create_bucket(Bucket="explicit")
    with pytest.raises(FileNotFoundError, match="no objects under s3://explicit/nothing"):
        download_prefix(client, "s3://explicit/nothing", tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        upload_folder(client, tmp_path / "missing", "s3://explicit/x")


@pytest.mark.integration
def test_stat_object_gives_what_the_listing_gives_and_none_where_there_is_no_object(s3_env: S3Server) -> None:
    """One HEAD: the object's key, size and ETag as a listing gives them; None for a missing key, a missing bucket and
    a bucket's own URI (a HEAD's 404 has no error code to tell them apart)."""
    client = s3_env.client()
    client.create_bucket(Bucket="stat-object")
    client.put_object(Bucket="stat-object", Key="images/a.bmp", Body=b"0123456789")
    [listed] = list_objects(client, "stat-object", "images")
    found = stat_object("s3://stat-object/images/a.bmp")
    assert found is not None and (found.key, found.size, found.etag) == (listed.key, 10, listed.etag)
    for uri in ("s3://stat-object/images/b.bmp", "s3://no-such-bucket/a.bmp", "s3://stat-object"):
        assert stat_object(uri) is None, uri


def test_one_client_per_storage_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s1")
    here = StorageConfig(endpoint_url="http://127.0.0.1:1", region="us-east-1")
    client = s3_client(here)
    assert s3_client(StorageConfig(endpoint_url="http://127.0.0.1:1", region="us-east-1")) is client
    assert s3_client(StorageConfig(endpoint_url="http://127.0.0.1:2", region="us-east-1")) is not client
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k2")  # other credentials: another client
    assert s3_client(here) is not client


@pytest.mark.parametrize("key", ["models/m/../../escape.json", "models/m/{tmp_path}/escape.json", "models/m/./x.json"])
def test_a_key_that_would_land_outside_the_folder_is_refused(key: str, tmp_path: Path) -> None:
    """S3 keys are strings: `..`, `.` or an empty part (AWS keeps them as written) must not make a path that leaves
    the destination folder. SeaweedFS normalises such keys, so the listing is botocore's stubbed response."""
    import boto3
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    client = boto3.session.Session().client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
    )
    key = key.format(tmp_path=tmp_path)  # an absolute path after the prefix's slash
    etag = '"99914b932bd37a50b983c5e7c90ae93b"'  # MD5 of b"{}"
    item = {"Key": key, "Size": 2, "ETag": etag, "LastModified": datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)}
    listing = {"Contents": [item], "KeyCount": 1}
    with Stubber(client) as stub:
        stub.add_response("list_objects_v2", listing, {"Bucket": "bucket", "Prefix": "models/m/"})
        # what a download of it would get, so that the old code's write shows where it lands
        stub.add_response("head_object", {"ContentLength": 2, "ETag": etag})
        stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(b"{}"), 2), "ContentLength": 2})
        with pytest.raises(ValueError, match=r"s3://bucket/models/m/.*rename the object"):
            download_prefix(client, "s3://bucket/models/m", tmp_path / "out" / "dest", progress=False)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
