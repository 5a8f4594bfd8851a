"""Bad input: a corpus of malformed records, each answered with its file, line (or index), field and reason.

Every case is one bad record after a good one in a small dataset folder, checked by `validate_files` (the code
behind `vlmops validate PATH`); the same corpus, all in one file, goes through the command itself, which must
list every problem (not the first) and never print a traceback. Images are made with Pillow, URLs served by a
real local HTTP server (tests/image_server.py), s3:// objects by a real SeaweedFS (integration).
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.image_server import image_server, png_bytes, serving_images
from tests.s3_server import S3Server
from vlmops.cli.main import main
from vlmops.config import DataConfig, StorageConfig
from vlmops.data.problems import DatasetError
from vlmops.data.validation import validate_files

GOOD = {
    "conversations": [{"from": "user", "value": "<img>ok.png</img>Colour?"}, {"from": "assistant", "value": "blue"}]
}
LOOPBACK = ["127.0.0.1/32"]  # the test server itself; nothing else non-public


def ask(value: str, answer: str = "blue") -> dict[str, Any]:
    return {"conversations": [{"from": "user", "value": value}, {"from": "assistant", "value": answer}]}


def image_bytes(fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.merge("RGB", [Image.effect_noise(size, 60).convert("L") for _ in range(3)]).save(buf, format=fmt)
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking PNG of a few bytes whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


@dataclass
class Case:
    """One malformed record (`line`: a jsonl line, text or bytes; or `record`), what to put beside it, and the
    field and reason expected."""

    name: str
    field: str
    reason: str
    record: Any = None
    line: str | bytes | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    outside: dict[str, bytes] = field(default_factory=dict)  # written beside the dataset folder, not in it
    data: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=dict)

    def text(self, server: str, root: Path) -> bytes:
        if self.line is not None:
            return self.line if isinstance(self.line, bytes) else self.line.encode()
        raw = json.dumps(self.record).replace("{URL}", server).replace("{OUTSIDE}", str(root / "outside"))
        return raw.encode()


def tag(uri: str) -> dict[str, Any]:
    return ask(f"<img>{uri}</img>What is this?")


CASES = [
    # JSON and types
    Case("json syntax error", "(line)", r"not valid JSON: Expecting property name", line="{not json"),
    Case("json cut short", "(line)", r"not valid JSON", line='{"conversations": [{"from": "user"'),
    Case("record not an object", "(record)", r"must be an object, got list", record=[1, 2]),
    # json's parser recurses per level and raised RecursionError, which stopped validation with a traceback
    Case("lists nested 100,000 deep", "(line)", r"nested too deeply to read", line="[" * 100_000 + "]" * 100_000),
    Case(
        "a field nested 100,000 deep",
        "(line)",
        r"nested too deeply to read",
        line=json.dumps(GOOD)[:-1] + ', "meta": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001,
    ),
    Case(
        "no conversations or messages",
        "(record)",
        r"needs a 'conversations' or 'messages' key \(found: text\)",
        record={"text": "hi"},
    ),
    Case("conversations not a list", "conversations", r"must be a non-empty list", record={"conversations": "hi"}),
    Case("conversations empty", "conversations", r"must be a non-empty list", record={"conversations": []}),
    Case("turn not an object", "conversations[0]", r'needs "from" and "value"', record={"conversations": ["hi"]}),
    Case(
        "value not a string",
        "conversations[1].value",
        r"must be a string, got int",
        record={"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": 5}]},
    ),
    Case(
        "messages without content",
        "messages[0]",
        r'needs "role" and "content"',
        record={"messages": [{"role": "user"}], "images": []},
    ),
    Case(
        "images not a list",
        "images",
        r"must be a list of image paths",
        record={"messages": [{"role": "user", "content": "<image>hi"}], "images": "ok.png"},
    ),
    # roles and turns
    Case(
        "unknown role",
        "conversations[0].from",
        r"unknown role 'robot'",
        record={"conversations": [{"from": "robot", "value": "hi"}, {"from": "assistant", "value": "x"}]},
    ),
    Case(
        "role not a string",
        "messages[0].role",
        r"unknown role 1",
        record={"messages": [{"role": 1, "content": "hi"}, {"role": "assistant", "content": "x"}]},
    ),
    Case(
        "answer before question",
        "(turns)",
        r"turn 1 is 'assistant' but 'user' was expected",
        record={"conversations": [{"from": "assistant", "value": "x"}, {"from": "user", "value": "y"}]},
    ),
    Case(
        "two questions in a row",
        "(turns)",
        r"turn 2 is 'user' but 'assistant' was expected",
        record={
            "conversations": [
                {"from": "user", "value": "a"},
                {"from": "user", "value": "b"},
                {"from": "assistant", "value": "c"},
            ]
        },
    ),
    Case(
        "no answer at the end",
        "(turns)",
        r"must end with an assistant turn",
        record={"conversations": [{"from": "user", "value": "hi"}]},
    ),
    Case("empty answer", "(turns)", r"turn 2 \(assistant\) is empty", record=ask("Colour?", "  ")),
    Case(
        "system message alone",
        "(turns)",
        r"a system message alone",
        record={"messages": [{"role": "system", "content": "Be brief."}]},
    ),
    Case(
        "image in an answer",
        "(turns)",
        r"images are only allowed in user turns",
        record=ask("Draw it", "<img>ok.png</img>"),
    ),
    # <img> tags and <image> marks
    Case(
        "img tag unclosed",
        "conversations[0].value",
        r"<img> at character 0 is never closed",
        record=ask("<img>images/a.png What?"),
    ),
    Case(
        "img tag nested",
        "conversations[0].value",
        r"inside another <img> tag",
        record=ask("<img>a<img>ok.png</img></img>What?"),
    ),
    Case("img tag empty", "conversations[0].value", r"empty image reference", record=ask("<img> </img>What?")),
    Case(
        "img close without open",
        "conversations[0].value",
        r"</img> at character 2 closes no <img>",
        record=ask("a </img> b"),
    ),
    Case(
        "more image marks than images",
        "messages[0].content",
        r"more <image> tags than the 1 entry in images",
        record={
            "messages": [{"role": "user", "content": "<image><image>?"}, {"role": "assistant", "content": "x"}],
            "images": ["ok.png"],
        },
    ),
    Case(
        "fewer image marks than images",
        "images",
        r"2 images listed but 1 <image> tag in the messages",
        record={
            "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "x"}],
            "images": ["ok.png", "ok.png"],
        },
    ),
    # image files
    Case("image file missing", "conversations[0].value", r"gone\.png: file not found", record=tag("gone.png")),
    Case(
        "image file empty",
        "conversations[0].value",
        r"empty\.png: the file is empty",
        record=tag("empty.png"),
        files={"empty.png": b""},
    ),
    Case(
        "truncated png",
        "conversations[0].value",
        r"cut\.png: not a readable image \(image file is truncated",
        record=tag("cut.png"),
        files={"cut.png": image_bytes("PNG")[:3000]},
    ),
    Case(
        "truncated jpeg",
        "conversations[0].value",
        r"cut\.jpg: not a readable image \(image file is truncated",
        record=tag("cut.jpg"),
        files={"cut.jpg": image_bytes("JPEG")[:1500]},
    ),
    Case(
        "not an image",
        "conversations[0].value",
        r"notes\.png: not a readable image \(no image format starts like",
        record=tag("notes.png"),
        files={"notes.png": b"shopping list: milk"},
    ),
    Case(
        "decompression bomb",
        "conversations[0].value",
        r"bomb\.png: too large to decode .*decompression bomb",
        record=tag("bomb.png"),
        files={"bomb.png": png_bomb()},
    ),
    Case(
        "header over the pixel limit",
        "conversations[0].value",
        r"9000 x 9000 = 81,000,000 pixels",
        record=tag("huge.png"),
        files={"huge.png": png_bomb(9000, 9000)},
    ),
    # paths that leave the dataset's folder
    Case(
        "relative path escapes the root",
        "conversations[0].value",
        r"\.\./outside/secret\.png is outside the dataset",
        record=tag("../outside/secret.png"),
        outside={"secret.png": png_bytes()},
    ),
    Case(
        "absolute path elsewhere",
        "images[0]",
        r"^image /\S+/outside/secret\.png is outside the dataset's folder; move it under ",  # the path once
        record={
            "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "x"}],
            "images": ["{OUTSIDE}/secret.png"],
        },
        outside={"secret.png": png_bytes()},
    ),
    Case("file URL", "conversations[0].value", r"file:// is not supported", record=tag("file:///etc/passwd")),
    Case(
        "NUL byte in a path",
        "conversations[0].value",
        r"'a\\x00b\.png' is not a path that can be read \(embedded null byte\)",
        record=tag("a\0b.png"),
    ),
    Case(
        "home folder of an unknown user",
        "images[0]",
        r"~no-such-user-h36/cat\.png' is not a path that can be read \(Could not determine home directory",
        record={
            "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "x"}],
            "images": ["~no-such-user-h36/cat.png"],
        },
    ),
    # URLs
    Case("url 404", "conversations[0].value", r"missing\.png: HTTP 404 not found", record=tag("{URL}/missing.png")),
    Case(
        "url times out",
        "conversations[0].value",
        r"slow\.png: no answer within 0.3 s",
        record=tag("{URL}/slow.png"),
        storage={"url_timeout_s": 0.3},
    ),
    Case(
        "url not an image",
        "conversations[0].value",
        r"page\.png: not a readable image .*<html>",
        record=tag("{URL}/page.png"),
    ),
    Case(
        "url over the size limit",
        "conversations[0].value",
        r"big\.png: larger than storage.url_max_mib \(0.03 MiB\): the server announces",
        record=tag("{URL}/big.png"),
        storage={"url_max_mib": 0.03},
    ),
    Case(
        "url over the size limit, unannounced",
        "conversations[0].value",
        r"big-unannounced\.png: larger than storage.url_max_mib \(0.03 MiB\): stopped reading",
        record=tag("{URL}/big-unannounced.png"),
        storage={"url_max_mib": 0.03},
    ),
    Case(
        "url redirects to file",
        "conversations[0].value",
        r"redirected to file:///etc/passwd: only http:// and https:// URLs",
        record=tag("{URL}/redirect?to=file:///etc/passwd"),
    ),
    Case(
        "url redirects to a private address",
        "conversations[0].value",
        r"redirected to http://10\.1\.2\.3/a\.png: host 10\.1\.2\.3 is 10\.1\.2\.3, a private address",
        record=tag("{URL}/redirect?to=http://10.1.2.3/a.png"),
    ),
    Case(
        "url redirects to another loopback address",
        "conversations[0].value",
        r"host 127\.0\.0\.2 is 127\.0\.0\.2, a loopback address: refused",
        record=tag("{URL}/redirect?to=http://127.0.0.2/ok.png"),
    ),
    Case(
        "url redirects to the metadata service",
        "conversations[0].value",
        r"169\.254\.169\.254, a link-local address",
        record=tag("{URL}/redirect?to=http://169.254.169.254/latest/meta-data/"),
    ),
    Case(
        "loopback url refused by default",
        "conversations[0].value",
        r"host 127\.0\.0\.1 is 127\.0\.0\.1, a loopback address: refused by default.*storage\.url_allow_networks",
        record=tag("{URL}/ok.png"),
        storage={"url_allow_networks": []},
    ),
    # text encoding
    Case(
        "not utf-8",
        "(line)",
        r"not UTF-8 text: byte 0xe9 at column 50",
        line=b'{"conversations": [{"from": "user", "value": "caf\xe9?"}, {"from": "assistant", "value": "x"}]}',
    ),
    # length, under the policies that stop
    Case(
        "too long, policy error",
        "(length)",
        r"\d+ tokens > data\.max_length 100",
        record=ask("word " * 200),
        data={"max_length": 100},
    ),
    Case(
        "too long, truncate-text without an answer left",
        "(length)",
        r"leaves no answer token",
        record=ask("word " * 200),
        data={"max_length": 100, "max_length_policy": "truncate-text"},
    ),
]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with image_server() as url:
        yield url


def write_case(root: Path, case: Case, server: str) -> Path:
    folder = root / "data"
    folder.mkdir(parents=True)
    (folder / "ok.png").write_bytes(png_bytes())
    for name, data in case.files.items():
        (folder / name).write_bytes(data)
    if case.outside:
        (root / "outside").mkdir()
        for name, data in case.outside.items():
            (root / "outside" / name).write_bytes(data)
    dataset = folder / "d.jsonl"
    dataset.write_bytes(json.dumps(GOOD).encode() + b"\n" + case.text(server, root) + b"\n")
    return dataset


def check(
    tokenizer: Any, paths: list[Path], data: dict[str, Any], storage: dict[str, Any], rejects: Path
) -> Callable[[], object]:
    def run() -> object:
        return validate_files(
            paths,
            DataConfig(**data),
            tokenizer,
            16,
            rejects,
            storage=StorageConfig(**{"url_allow_networks": LOOPBACK, **storage}),
        )

    return run


def test_the_corpus_is_large_and_distinct() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_record_is_named_with_file_line_field_and_reason(
    case: Case, tmp_path: Path, server: str, tiny_processor: Any
) -> None:
    dataset = write_case(tmp_path, case, server)
    rejects = tmp_path / "rejects.jsonl"
    with pytest.raises(DatasetError) as info:
        check(tiny_processor.tokenizer, [dataset], case.data, case.storage, rejects)()
    [problem] = info.value.problems
    assert problem.location == f"{dataset}:2"
    assert problem.field == case.field
    assert re.search(case.reason, problem.reason), problem.reason
    assert f"{dataset}:2 {case.field}: " in str(info.value)
    [row] = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert (row["file"], row["line"], row["field"]) == (str(dataset), 2, case.field)
    assert row["reason"] == problem.reason
    report = info.value.report
    assert report.read == 2 and report.splits["all"].records == 1


def test_skip_keeps_every_valid_record_and_writes_every_rejected_one(
    tmp_path: Path, server: str, tiny_processor: Any
) -> None:
    """The whole corpus in one file, with a good record between each two bad ones: kept + rejected = read."""
    cases = [c for c in CASES if not c.data and not c.storage]
    folder = tmp_path / "data"
    folder.mkdir()
    (tmp_path / "outside").mkdir()
    (folder / "ok.png").write_bytes(png_bytes())
    lines = []
    for case in cases:
        for name, data in case.files.items():
            (folder / name).write_bytes(data)
        for name, data in case.outside.items():
            (tmp_path / "outside" / name).write_bytes(data)
        lines += [json.dumps(GOOD).encode(), case.text(server, tmp_path)]
    dataset = folder / "all.jsonl"
    dataset.write_bytes(b"\n".join(lines) + b"\n")
    rejects = tmp_path / "rejects.jsonl"
    report = validate_files(
        [dataset],
        DataConfig(invalid_records="skip"),
        tiny_processor.tokenizer,
        16,
        rejects,
        storage=StorageConfig(url_allow_networks=LOOPBACK),
    )
    rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert report.read == 2 * len(cases)
    assert report.splits["all"].records == len(cases)
    assert report.rejected_count == len(rows) == len(cases)
    assert report.splits["all"].records + report.rejected_count == report.read
    assert [r["line"] for r in rows] == list(range(2, 2 * len(cases) + 1, 2))
    assert [r["field"] for r in rows] == [c.field for c in cases]
    assert all(r["reason"] and r["file"] == str(dataset) for r in rows)
    assert report.rejects_file == str(rejects)
    # every good record is the same: the duplicates are counted and named, not rejected
    assert report.duplicates == len(cases) - 1
    assert report.duplicate_examples[0] == {"location": f"{dataset}:3", "duplicate_of": f"{dataset}:1"}


def test_the_command_lists_every_problem_without_a_traceback(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = [c for c in CASES if not c.data and not c.storage and not c.outside]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png_bytes())
    for case in cases:
        for name, data in case.files.items():
            (folder / name).write_bytes(data)
    dataset = folder / "d.jsonl"
    dataset.write_bytes(b"\n".join(c.text(server, tmp_path) for c in cases) + b"\n" + json.dumps(GOOD).encode() + b"\n")
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "validate",
            str(dataset),
            "--set",
            f"model.cache_dir={tmp_path / 'cache'}",
            "--set",
            "storage.url_allow_networks=[127.0.0.1/32]",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert f"error: {len(cases)} rejected records:" in err
    for number, case in enumerate(cases, start=1):
        assert f"  - {dataset}:{number} {case.field}: " in err
    assert f"every rejected record is listed, with its reason, in {Path('outputs/datasets/rejects.jsonl')}" in err
    assert "all: 1 record (" in err  # the counts come with the error


def test_json_files_name_the_line_or_the_index(tmp_path: Path, tiny_processor: Any) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"conversations": []},\n  {"conversations": [}\n]\n')
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text('{"conversations": []}')
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'[\n{"conversations": [{"from": "user", "value": "caf\xe9"}]}\n]')
    items = tmp_path / "items.json"
    items.write_text(json.dumps([ask("hi"), ask("hi", "")]))
    deep = tmp_path / "deep.json"
    deep.write_text(f"[\n{json.dumps(ask('hi'))},\n{'[' * 100_000}{']' * 100_000}\n]")
    with pytest.raises(DatasetError) as info:
        validate_files([tmp_path], DataConfig(), tiny_processor.tokenizer, 16, tmp_path / "rejects.jsonl")
    found = {(p.location, p.field) for p in info.value.problems}
    assert found == {
        (f"{broken}:3", "(file)"),
        (f"{items}[1]", "(turns)"),
        (f"{latin1}:2", "(file)"),
        (str(not_a_list), "(file)"),
        (f"{deep}:3", "(file)"),
    }
    reasons = {p.location: p.reason for p in info.value.problems}
    assert reasons[f"{latin1}:2"] == "not UTF-8 text: byte 0xe9 at column 50 (save the file as UTF-8)"
    assert "must be a list of records, not dict" in reasons[str(not_a_list)]
    assert (
        reasons[f"{deep}:3"]
        == "not valid JSON: lists and objects nested too deeply to read (at most about 1,000 levels) at column 1"
    )


def test_a_symlink_out_of_the_root_is_refused_and_allowed_roots_let_it_in(tmp_path: Path, tiny_processor: Any) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "cat.png").write_bytes(png_bytes())
    (folder / "cat.png").symlink_to(shared / "cat.png")
    dataset = folder / "d.jsonl"
    dataset.write_text(json.dumps(ask("<img>cat.png</img>What?")) + "\n")
    tok = tiny_processor.tokenizer
    with pytest.raises(DatasetError) as info:
        validate_files([dataset], DataConfig(), tok, 16, tmp_path / "r.jsonl")
    [problem] = info.value.problems
    assert problem.reason == (
        f"image cat.png is outside the dataset's folder (a link to {shared / 'cat.png'}); move it under {folder} "
        "or add its folder to data.allowed_roots"
    )
    report = validate_files([dataset], DataConfig(allowed_roots=[str(shared)]), tok, 16, tmp_path / "r.jsonl")
    assert report.splits["all"].images == 1


def test_a_symlink_loop_is_refused(tmp_path: Path, tiny_processor: Any) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(json.dumps(ask("<img>a/cat.png</img>What?")) + "\n")
    with pytest.raises(DatasetError, match=r"a/cat\.png' is not a path that can be read \(Symlink loop"):
        validate_files([dataset], DataConfig(), tiny_processor.tokenizer, 16, tmp_path / "rejects.jsonl")


def test_too_long_records_under_drop_and_truncate_text(tmp_path: Path, tiny_processor: Any) -> None:
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("\n".join(json.dumps(r) for r in [ask("short?"), ask("Say it.", "word " * 60)]) + "\n")
    tok = tiny_processor.tokenizer
    dropped = validate_files([dataset], DataConfig(max_length=80, max_length_policy="drop"), tok, 16, tmp_path / "r")
    assert dropped.dropped_too_long == [f"{dataset}:2"]
    assert dropped.splits["all"].records == 1
    assert dropped.read == dropped.splits["all"].records + len(dropped.dropped_too_long)
    cut = validate_files(
        [dataset], DataConfig(max_length=80, max_length_policy="truncate-text"), tok, 16, tmp_path / "r"
    )
    assert cut.splits["all"].records == 2 and cut.splits["all"].over_max_length == 1


@pytest.mark.integration
def test_s3_image_missing(tmp_path: Path, s3_env: S3Server, tiny_processor: Any) -> None:
    s3_env.client().create_bucket(Bucket="bad-input")
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(json.dumps(ask("<img>s3://bad-input/nope.png</img>What?")) + "\n")
    with pytest.raises(DatasetError) as info:
        validate_files([dataset], DataConfig(), tiny_processor.tokenizer, 16, tmp_path / "r.jsonl")
    [problem] = info.value.problems
    assert (problem.location, problem.field) == (f"{dataset}:1", "conversations[0].value")
    assert problem.reason.startswith("image s3://bad-input/nope.png: no such object")


def test_an_image_server_that_fails_for_now_stops_validation_instead_of_dropping_the_record(
    tmp_path: Path, tiny_processor: Any
) -> None:
    """A 503 after the fetcher's retries may pass: validation stops (exit 1, `RunFailed`) rather than leave the record
    out of the snapshot with data.invalid_records: skip; once the server answers, the record is in."""
    from vlmops.data.images import ImageStoreError
    from vlmops.errors import RunFailed

    with serving_images() as server:
        dataset = tmp_path / "d.jsonl"
        dataset.write_text(json.dumps(ask(f"<img>{server.url}/flaky.png</img>What?")) + "\n")
        run = check(tiny_processor.tokenizer, [dataset], {"invalid_records": "skip"}, {}, tmp_path / "r.jsonl")
        server.down = True
        with pytest.raises(ImageStoreError, match=r"d\.jsonl:1: image .*flaky\.png: HTTP 503 .*run it again") as info:
            run()
        assert isinstance(info.value, RunFailed)
        server.down = False
        report = run()
    assert (report.read, report.rejected_count) == (1, 0)  # type: ignore[attr-defined]


def test_images_by_url_are_downloaded_at_once_and_checked_in_record_order(
    tmp_path: Path, tiny_processor: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Each URL one GET, several in flight at once while the records before them are checked (were one at a time: a
    round trip's wait each), as s3:// images are (tests/test_validate_command.py); the records checked in order: the
    missing image and the page that is no image rejected at their lines, an image named twice fetched once; every
    download on a kept connection (urllib3 warns when it drops one its pool cannot hold)."""
    from vlmops.data.validation import IMAGE_THREADS

    with serving_images() as server:
        urls = [f"{server.url}/paced.png?n={i}" for i in range(24)]
        records = [ask(f"<img>{url}</img>Which {i}?") for i, url in enumerate(urls)]
        records[10:10] = [ask(f"<img>{server.url}/missing.png</img>Gone?"), ask(f"<img>{server.url}/page.png</img>?")]
        records.append(ask(f"<img>{urls[3]}</img>Again?"))
        dataset = tmp_path / "d.jsonl"
        dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
        rejects = tmp_path / "r.jsonl"
        report = check(tiny_processor.tokenizer, [dataset], {"invalid_records": "skip"}, {}, rejects)()
        paced = [line for line in server.received if line.startswith(b"GET /paced.png")]
    assert (report.read, report.rejected_count) == (27, 2)  # type: ignore[attr-defined]
    assert len(paced) == len(urls)
    assert 1 < server.most_at_once <= IMAGE_THREADS
    rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(row["line"], row["reason"].split(":")[0]) for row in rows] == [(11, "image http"), (12, "image http")]
    assert "HTTP 404" in rows[0]["reason"] and "not a readable image" in rows[1]["reason"]
    assert "Connection pool is full" not in caplog.text


@pytest.mark.integration
def test_s3_image_failures_say_whether_they_may_pass(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing object is the record's fault for good; an S3 server that does not answer may come back (a batch job
    stops for it rather than reject the record: tests/infer/test_batch_job.py)."""
    import socket

    from vlmops.data.images import ImageLoadError, load_image

    s3_env.client().create_bucket(Bucket="bad-input-retry")
    with pytest.raises(ImageLoadError, match="no such object") as missing:
        load_image("s3://bad-input-retry/nope.png")
    assert missing.value.retryable is False
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(ImageLoadError, match="cannot read it from S3") as down:
        load_image("s3://bad-input-retry/a.png", StorageConfig(endpoint_url=f"http://127.0.0.1:{port}"))
    assert down.value.retryable is True


@pytest.mark.integration
@pytest.mark.parametrize(
    ("credentials", "reason"),
    [(None, r"no S3 credentials found; set AWS_ACCESS_KEY_ID"), (("wrong", "wrong"), r"access denied")],
    ids=["none", "wrong"],
)
def test_s3_image_without_credentials(
    tmp_path: Path,
    s3_env: S3Server,
    tiny_processor: Any,
    monkeypatch: pytest.MonkeyPatch,
    credentials: tuple[str, str] | None,
    reason: str,
) -> None:
    bucket = f"bad-input-auth-{'none' if credentials is None else 'wrong'}"
    s3_env.client().create_bucket(Bucket=bucket)
    s3_env.client().put_object(Bucket=bucket, Key="a.png", Body=png_bytes())
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    if credentials:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials[0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", credentials[1])
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(json.dumps(ask(f"<img>s3://{bucket}/a.png</img>What?")) + "\n")
    with pytest.raises(DatasetError) as info:
        validate_files([dataset], DataConfig(), tiny_processor.tokenizer, 16, tmp_path / "r.jsonl")
    [problem] = info.value.problems
    assert re.search(reason, problem.reason), problem.reason
