"""What a batch inference job reads: input files (local or on S3), their records, and one prompt per record.

An input is a `.jsonl` or `.json` file, a folder or glob of them, or an `s3://` prefix. A record is either
a dataset record (`conversations` / `messages`, as in training: the model answers the last user turn, and a
final assistant turn, if present, is kept as `reference`) or the simple form

    {"id": "q1", "query": "<img>cat.png</img>What is this?", "images": ["dog.png"], "history": [["hi", "hello"]]}

where `images` fill `<image>` marks of the query and history in order (without any mark they come before
the query's text). Relative image paths resolve against the input file's folder (local inputs only).

Both file types are read from a shard's byte offset, a line (`.jsonl`) or a list item (`.json`,
vlmops.data.jsonarray) at a time, so a job never holds more than one shard's records.
"""

from __future__ import annotations

import codecs
import collections
import glob
import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import IO, Any, TypeVar

from vlmops.config import StorageConfig
from vlmops.conversation import Message
from vlmops.data.jsonarray import TOO_DEEP, ArrayItem, JsonArrayError, json_array_items
from vlmops.data.parsing import Turn, parse_record, parse_turns, refuse_mixed_formats
from vlmops.data.problems import RecordError
from vlmops.errors import UserInputError
from vlmops.folders import listed_matching, listed_under, refuse_unreadable
from vlmops.plural import counted

log = logging.getLogger(__name__)

T = TypeVar("T")

INPUT_SUFFIXES = (".jsonl", ".json")
ADDED_FIELDS = ("key", "source", "response", "reference", "generated_tokens", "finish_reason", "model")
"""Fields a job adds to every result; an input record that already has one is rejected (rename it)."""
CHUNK = 1 << 20
JOB_FILE = "_job/job.json"
"""A batch job's identity file, under its output: a folder that holds one is a job's output, not input."""


@dataclass(frozen=True)
class InputFile:
    """One input file: where it is, the name its keys use (relative to the input root), and its identity.

    `longest_prompt`: the most prompt tokens (image tokens included) any of its records encodes to, where the scan
    counted them (None: not counted, as in plans written before it was); `longest_line`: that record's line;
    `shortest_prompt`, `shortest_line`: the fewest, and where (None: not counted, or no record could be);
    `prompt_steps`: [steps, records] pairs, how many of its records take `steps` x PROMPT_STEP tokens or fewer (and
    more than one step fewer), ascending.
    """

    uri: str
    name: str
    size: int = 0
    sha256: str = ""
    records: int = 0
    longest_prompt: int | None = None
    longest_line: int | None = None
    prompt_steps: list[list[int]] | None = None
    shortest_prompt: int | None = None
    shortest_line: int | None = None
    only: list[int] | None = None
    """The records the job reads from the file, by line (.jsonl) or list index (.json), ascending: a job over
    another job's rejects (`infer.retry_rejects`); None: every record. `records` counts these alone."""


PROMPT_STEP = 128
"""The prompt lengths' histogram step in a plan (the fast engine rounds its slots up to the same step)."""


@dataclass(frozen=True)
class Shard:
    """A run of consecutive records of one file: the unit written, resumed and handed to a worker.

    `offset` is the byte offset of its first record (the start of its line in a .jsonl file, of the item in a
    .json list) and `line` that line's number; `start` is the index of its first record in the file. Where the
    file's records are chosen (`InputFile.only`), the shard holds `count` of those, from its first one on.
    """

    index: int
    file: int
    start: int
    count: int
    offset: int
    line: int

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


@dataclass
class RawRecord:
    """One record as read: where it is (`file:line` or `file[index]`; `number` is that line or index) and its
    text (jsonl) or parsed value (json)."""

    location: str
    key_location: str
    number: int
    text: str | None = None
    value: Any = None
    problem: str | None = None
    """Why the line is not text (a byte that is not UTF-8): the record is a reject, never answered with it replaced."""


@dataclass
class Prompt:
    """One record ready to answer: its key, the fields to write back, the prompt turns and the reference."""

    key: Any
    source: str
    fields: dict[str, Any]
    messages: list[Message]
    reference: str | None


def find_inputs(spec: str, storage: StorageConfig | None = None, output: str | None = None) -> list[InputFile]:
    """The input files `spec` names, in a stable order (sorted by name). A folder, glob or prefix never yields what
    lies under `output` (the job's own output location, when it sits inside its input: its parts, rejects, manifest
    and `_job/` files would otherwise be read as input on a rerun, and make it another job).

    Raises:
        FileNotFoundError: nothing there, or no .json/.jsonl file in it.
        UserInputError: an input file it names is a broken link or no file (a named pipe), before any is read.
    """
    if spec.startswith("s3://"):
        return _find_s3_inputs(spec, storage, output)
    path = Path(spec).expanduser()
    if path.is_file():
        _check_suffix(path.name, spec)
        # By its own name, a link too (a hub cache's `a.jsonl -> ../blobs/3f2a...`): its suffix picks the reader.
        return [InputFile(str(path.parent.resolve() / path.name), path.name)]
    if path.is_dir():
        root = path.resolve()
        listed = listed_under(root)
        _name_unread(spec, [p.relative_to(root).as_posix() for p in listed if p.is_file()])
        found = [p for p in listed if p.suffix.lower() in INPUT_SUFFIXES]
        found = _outside(found, _under_local(output), spec, output)
        refuse_unreadable(found)  # what would be read: a broken `notes.txt` link beside the inputs is no matter
        files = [InputFile(str(p), p.relative_to(root).as_posix()) for p in found]
    elif glob.has_magic(spec):
        # Matched by a walk, as a folder is read (each real file once, a link loop left); broken links are listed too:
        # one named like an input is refused, as in a folder.
        matched = listed_matching(path)
        refuse_unreadable(p for p in matched if p.suffix.lower() in INPUT_SUFFIXES)
        found = sorted(_as_matched(p, path) for p in matched if p.is_file())
        _name_unread(spec, [str(p) for p in found])
        found = [p for p in found if p.suffix.lower() in INPUT_SUFFIXES]
        found = _outside(found, _under_local(output), spec, output)
        root = Path(os.path.commonpath([p.parent for p in found])) if found else Path()
        files = [InputFile(str(p), p.relative_to(root).as_posix()) for p in found]
    else:
        refuse_unreadable([path] if path.is_symlink() or path.exists() else [])  # a broken link: say where it leads
        raise FileNotFoundError(f"input {spec} does not exist: pass a .jsonl/.json file, a folder, a glob or s3://")
    if not files:
        raise FileNotFoundError(f"input {spec}: no .jsonl or .json files there")
    return files


def _as_matched(match: Path, pattern: Path) -> Path:
    """A glob's match by the names it was matched with, below the pattern's folder (resolved, as an input folder is):
    a link's own name, `a.jsonl -> ../blobs/3f2a...` (a hub cache's layout), not its target's, which has no suffix
    and would leave the file out; a linked subfolder's name, as a folder input names it (a file reachable under two
    names, by the first in sorted order: `listed_matching`)."""
    literal = Path(*itertools.takewhile(lambda part: not glob.has_magic(part), pattern.parts))
    return literal.resolve() / match.relative_to(literal)


LOOKS_LIKE_RECORDS = re.compile(r"\.json|\.ndjson$|\.jsonlines$", re.IGNORECASE)
"""Names of files that hold records in a form the job does not read: `a.jsonl.gz`, `a.json.zst`, `a.ndjson`."""


def _name_unread(spec: str, names: Sequence[str]) -> None:
    """Warn of the files a folder, glob or prefix holds that look like records but are not read (not .jsonl/.json): a
    compressed `.jsonl.gz` beside the prompts left its records out without a word. Images and other files beside
    the prompts are not named, nor hidden ones (a job's scratch files)."""
    unread = [
        name
        for name in names
        if not name.lower().endswith(INPUT_SUFFIXES)
        and LOOKS_LIKE_RECORDS.search(name.rpartition("/")[2])
        and not any(part.startswith(".") for part in name.split("/"))
    ]
    if unread:
        more = f" and {len(unread) - 5} more" if len(unread) > 5 else ""
        log.warning(
            "input %s: %s named like records, not read (only .jsonl and .json are): %s%s; "
            "decompress or rename each to answer its records",
            spec,
            counted(len(unread), "file"),
            ", ".join(unread[:5]),
            more,
        )


def _outside(found: list[T], is_own: Callable[[T], bool], spec: str, output: str | None) -> list[T]:
    """`found` less the job's own files (`is_own`: under its `output`), said in the log when there are any.

    Raises:
        UserInputError: every file found lies under the output (it is the input folder, or holds it).
    """
    kept = [item for item in found if not is_own(item)]
    if found and not kept:
        assert output is not None  # nothing is under no output
        raise UserInputError(
            f"input {spec}: every input file there lies under the output {output}, {_own_output_fix(spec, output)}"
        )
    if len(kept) < len(found):
        log.info(
            "input %s: left out %s under the output %s, the job's own (not input)",
            spec,
            counted(len(found) - len(kept), "file"),
            output,
        )
    return kept


def _own_output_fix(spec: str, output: str) -> str:
    """Why every input file under `output` is none, and the fix that fits: the output is the input itself, holds it
    (`--input nest/in --output nest`, where "outside the input" is no fix), or holds every file a glob names."""
    if output.startswith("s3://") or spec.startswith("s3://"):
        same = spec.rstrip("/") == output.rstrip("/")
        holds = spec.startswith(output.rstrip("/") + "/")
    else:
        inner, outer = Path(spec).expanduser().resolve(), Path(output).expanduser().resolve()
        same, holds = inner == outer, inner.is_relative_to(outer)
    # A sibling of the input, never under it nor above it (not for a glob, nor a bucket's root: another bucket).
    bucket_root = spec.startswith("s3://") and "/" not in spec[len("s3://") :].rstrip("/")
    example = "" if glob.has_magic(spec) or bucket_root else f", e.g. {spec.rstrip('/')}-results"
    own = "(the job's own files are never input)"
    if same:
        return f"which is the input itself {own}: pass an --output outside the input{example}"
    if holds:
        return f"which holds the input {own}: pass an --output that neither is the input nor holds it{example}"
    return f"{own}: pass an --output that holds none of the input files"


def refuse_other_jobs(spec: str, found: list[InputFile], read: list[InputFile]) -> None:
    """Refuse to read (`read`) files of another batch job's output that the input (`found`: every file it names)
    holds: its parts, rejects, manifest and `_job/` files are not prompts. A job's output kept beside its input
    (`--input data --output data/run1`) made the next job over `data` answer the first one's results again, and its
    manifest and job file as records. (A job's own output inside its input is left out before: `find_inputs`.)

    Raises:
        UserInputError: naming the job folders found and the fix.
    """
    jobs = {f.name.removesuffix(JOB_FILE) for f in found if f"/{f.name}".endswith(f"/{JOB_FILE}")}
    held = sorted(job.rstrip("/") or "." for job in jobs if any(f.name.startswith(job) for f in read))
    if held:
        shown = ", ".join(spec if job == "." else f"{spec.rstrip('/')}/{job}" for job in held[:3])
        more = f" and {len(held) - 3} more" if len(held) > 3 else ""
        raise UserInputError(
            f"input {spec} holds the output of another batch job ({shown}{more}: it has {JOB_FILE}), whose parts, "
            f"rejects and manifest are not prompts: move that output out of the input{_glob_fix(spec, read, jobs)}"
        )


def _glob_fix(spec: str, read: list[InputFile], jobs: set[str]) -> str:
    """The glob of the input's own files beside another job's output in the folder `spec`, as a second fix: only where
    they lie in the folder itself (a `**` glob would take in the job's parts again); none for a glob or an S3 prefix
    (not globbed)."""
    prompts = [f.name for f in read if not any(f.name.startswith(job) for job in jobs)]
    if spec.startswith("s3://") or glob.has_magic(spec) or not prompts or any("/" in name for name in prompts):
        return ""
    suffixes = {PurePath(name).suffix.lower() for name in prompts}
    pattern = f"{spec.rstrip('/')}/*{suffixes.pop() if len(suffixes) == 1 else '.json*'}"
    return f", or pass the input files themselves as a glob ('{pattern}')"


def _under_local(output: str | None) -> Callable[[Path], bool]:
    """Whether a local path lies under the local output folder (never, for no output or an S3 one)."""
    if output is None or output.startswith("s3://"):
        return lambda path: False
    folder = Path(output).expanduser().resolve()
    return lambda path: path.is_relative_to(folder)


def _check_suffix(name: str, spec: str) -> None:
    if not name.lower().endswith(INPUT_SUFFIXES):
        raise UserInputError(f"input {spec}: unsupported file type; use .jsonl (a record per line) or .json (a list)")


def _find_s3_inputs(spec: str, storage: StorageConfig | None, output: str | None = None) -> list[InputFile]:
    from vlmops.storage import list_objects, parse_s3_uri, s3_client

    bucket, prefix = parse_s3_uri(spec)
    objects = list_objects(s3_client(storage), bucket, prefix)
    if not objects and prefix:  # the prefix may name one object
        parent, _, _ = prefix.rpartition("/")
        objects = [o for o in list_objects(s3_client(storage), bucket, parent) if o.key == prefix]
        if objects:
            _check_suffix(prefix, spec)
            return [InputFile(f"s3://{bucket}/{prefix}", prefix.rpartition("/")[2])]
    folder = f"{prefix}/" if prefix else ""
    _name_unread(spec, [o.key[len(folder) :] for o in sorted(objects, key=lambda o: o.key)])
    found = [o.key for o in sorted(objects, key=lambda o: o.key) if o.key.lower().endswith(INPUT_SUFFIXES)]
    if output is not None and output.startswith("s3://"):
        out_bucket, out_prefix = parse_s3_uri(output)
        own = f"{out_prefix}/" if out_prefix else ""  # the bucket's root holds every key
        found = _outside(found, lambda key: out_bucket == bucket and key.startswith(own), spec, output)
    files = [InputFile(f"s3://{bucket}/{key}", key[len(folder) :]) for key in found]
    if not files:
        raise FileNotFoundError(f"input {spec}: no .jsonl or .json objects under it")
    return files


@contextmanager
def open_input(uri: str, storage: StorageConfig | None = None, offset: int = 0) -> Iterator[IO[bytes]]:
    """A binary stream of the file from `offset` on (a ranged GET on S3)."""
    if uri.startswith("s3://"):
        from vlmops.storage import parse_s3_uri, s3_client

        bucket, key = parse_s3_uri(uri)
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        body = s3_client(storage).get_object(Bucket=bucket, Key=key, **extra)["Body"]  # type: ignore[arg-type]
        try:
            yield body  # type: ignore[misc]
        finally:
            body.close()
        return
    with open(uri, "rb") as f:
        f.seek(offset)
        yield f


def _lines(stream: IO[bytes]) -> Iterator[bytes]:
    """The stream's lines, each with its newline (the last one may lack it); works on S3 bodies too."""
    rest = b""
    for chunk in iter(lambda: stream.read(CHUNK), b""):
        rest += chunk
        *whole, rest = rest.split(b"\n")
        for line in whole:
            yield line + b"\n"
    if rest:
        yield rest


PromptMeasure = Callable[[RawRecord, Path | str], int | None]
"""A record's prompt tokens as the job will encode it, given the folder its image paths resolve against; None for a
record the job will reject."""


def scan_input(
    file: InputFile,
    file_index: int,
    shard_size: int,
    storage: StorageConfig | None = None,
    measure: PromptMeasure | None = None,
) -> tuple[InputFile, list[Shard]]:
    """Read a file once: its content hash, its record count, where each of its shards starts and, with `measure`,
    its longest and shortest prompts.

    Shards never cross files, so a shard's records are one ranged read. Memory stays one line (jsonl) or
    one item and a chunk (a .json list).
    Shard indexes are left 0: the job numbers shards across files.
    """
    digest = hashlib.sha256()
    shards: list[Shard] = []
    chosen = frozenset(file.only) if file.only is not None else None
    count = 0  # records read (all of them, or the chosen ones)
    index = 0  # records in the file
    size = 0
    longest, longest_line, steps = 0, 0, collections.Counter[int]()
    shortest: tuple[int, int] | None = None  # (tokens, line)
    base_dir = record_base(file.uri)

    def measured(raw: RawRecord, line: int) -> None:
        nonlocal longest, longest_line, shortest
        assert measure is not None
        tokens = measure(raw, base_dir)
        if tokens is None:  # a reject when the job reads it
            return
        steps[-(-tokens // PROMPT_STEP)] += 1
        if tokens > longest:
            longest, longest_line = tokens, line
        if shortest is None or tokens < shortest[0]:
            shortest = (tokens, line)

    if file.uri.lower().endswith(".jsonl"):
        with open_input(file.uri, storage) as stream:
            for number, line in enumerate(_lines(stream), start=1):
                if not _blank(number, line):
                    if chosen is None or number in chosen:
                        if count % shard_size == 0:
                            shards.append(Shard(0, file_index, index, 0, size, number))
                        count += 1
                        if measure is not None:  # a record is only decoded to be counted
                            measured(_line_record(file, number, line), number)
                    index += 1
                digest.update(line)
                size += len(line)
    else:
        with open_input(file.uri, storage) as stream:
            counted = _Counted(stream, digest)
            try:
                for item in json_array_items(counted):
                    if chosen is not None and item.index not in chosen:
                        continue
                    if count % shard_size == 0:
                        shards.append(Shard(0, file_index, item.index, 0, item.offset, item.line))
                    count += 1
                    if measure is not None:
                        measured(_item_record(file, item), item.line)
            except JsonArrayError as err:
                where = f"{file.uri}:{err.line}" if err.line else file.uri
                raise UserInputError(f"{where}: {err.problem()}") from None
            size = counted.size
    # The k-th shard begins at the (k x shard_size)-th record read.
    sized = [
        Shard(0, s.file, s.start, min(shard_size, count - k * shard_size), s.offset, s.line)
        for k, s in enumerate(shards)
    ]
    scanned = InputFile(file.uri, file.name, size, digest.hexdigest(), count, only=file.only)
    if measure is not None:
        histogram = [[step, steps[step]] for step in sorted(steps)]
        scanned = replace(scanned, longest_prompt=longest, longest_line=longest_line or None, prompt_steps=histogram)
        if shortest is not None:
            scanned = replace(scanned, shortest_prompt=shortest[0], shortest_line=shortest[1])
    return scanned, sized


def record_base(uri: str) -> Path | str:
    """The folder a record's relative image paths resolve against: its file's folder, or on S3 the file's prefix."""
    return uri.rpartition("/")[0] if uri.startswith("s3://") else Path(uri).parent


def _blank(number: int, line: bytes) -> bool:
    """Whether a .jsonl line holds no record: whitespace alone (opening the file, after a byte-order mark)."""
    return not (line.removeprefix(codecs.BOM_UTF8) if number == 1 else line).strip()


def _line_record(file: InputFile, number: int, line: bytes) -> RawRecord:
    # A byte-order mark (Windows editors write one) opens the file: not part of the first record. The line ending is
    # not part of it either: a record cut off at its end would be "not valid JSON at column 1" (of the next line).
    encoding = "utf-8-sig" if number == 1 else "utf-8"
    line = line.rstrip(b"\r\n")
    problem = None
    try:
        text = line.decode(encoding)
    except UnicodeDecodeError as err:
        text = line.decode(encoding, "replace")
        problem = f"not UTF-8 text: byte {line[err.start]:#04x} at column {err.start + 1} (save the file as UTF-8)"
    return RawRecord(f"{file.uri}:{number}", f"{file.name}:{number}", number, text, problem=problem)


def _item_record(file: InputFile, item: ArrayItem) -> RawRecord:
    return RawRecord(f"{file.uri}[{item.index}]", f"{file.name}[{item.index}]", item.index, value=item.value)


def read_shard(file: InputFile, shard: Shard, storage: StorageConfig | None = None) -> Iterator[RawRecord]:
    """The shard's records, in file order, each with its location (of the file's chosen records, where it has
    `only`)."""
    chosen = frozenset(file.only) if file.only is not None else None
    if file.uri.lower().endswith(".jsonl"):
        with open_input(file.uri, storage, shard.offset) as stream:
            read = 0
            for number, line in enumerate(_lines(stream), start=shard.line):
                if _blank(number, line) or (chosen is not None and number not in chosen):
                    continue
                if read == shard.count:
                    return
                read += 1
                yield _line_record(file, number, line)
        return
    with open_input(file.uri, storage, shard.offset) as stream:
        if shard.offset:  # streamed from the shard's first item
            items = json_array_items(stream, shard.offset, shard.line, shard.start)
        else:  # a plan from before shards knew their offset: read up to the shard
            items = itertools.islice(json_array_items(stream), shard.start, None)
        if chosen is not None:
            items = (item for item in items if item.index in chosen)
        for item in itertools.islice(items, shard.count):
            yield _item_record(file, item)


class _Counted:
    """A stream that hashes and counts the bytes read through it."""

    def __init__(self, stream: IO[bytes], digest: Any):
        self.stream = stream
        self.digest = digest
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


def _record_object(raw: RawRecord) -> dict[str, Any]:
    """The record's JSON object (a .jsonl line parsed, a .json item as read).

    Raises:
        RecordError: the line is not UTF-8 text or not JSON, or the record not an object.
    """
    if raw.problem is not None:
        raise RecordError("(line)", raw.problem, kind="not_text")
    value = raw.value
    if raw.text is not None:
        try:
            value = json.loads(raw.text)
        except json.JSONDecodeError as err:
            raise RecordError(
                "(line)", f"not valid JSON: {err.msg} at column {err.colno}", kind="malformed_json"
            ) from None
        except RecursionError:  # json's parser recurses per level of nesting, and stops at Python's limit
            raise RecordError("(line)", f"not valid JSON: {TOO_DEEP}", kind="malformed_json") from None
    if not isinstance(value, dict):
        raise RecordError("(record)", f"must be an object, got {type(value).__name__}")
    return value


def _is_id(key: Any) -> bool:
    return isinstance(key, (str, int)) and not isinstance(key, bool)


def reject_key(raw: RawRecord) -> Any:
    """A record's key where it cannot be answered: its `id` where one can be read (as its result's would be), else its
    file and line."""
    try:
        key = _record_object(raw).get("id")
    except RecordError:
        return raw.key_location
    return key if _is_id(key) else raw.key_location


def parse_prompt(raw: RawRecord, base_dir: Path | str, roots: Sequence[Path] | None = None) -> Prompt:
    """One raw record -> the prompt to answer; local image paths resolved against `base_dir` must lie inside
    `roots` (None: anywhere), as a dataset's must (`data.allowed_roots`).

    Raises:
        RecordError: the line is not JSON, not an object, in neither form, or has an invalid field.
    """
    value = _record_object(raw)
    clash = [name for name in ADDED_FIELDS if name in value]
    if clash:
        raise RecordError(clash[0], "is a field batch inference adds to its results; rename it in the input")
    key = value.get("id")
    if key is None:
        key = raw.key_location
    elif not _is_id(key):
        raise RecordError("id", f"must be a string or an integer, got {type(key).__name__}")
    if "conversations" in value or "messages" in value:
        refuse_mixed_formats(value)  # a turn's other keys are harmless here: the result keeps the whole record
        conversation = parse_record(value, raw.location, base_dir, require_answer=False, roots=roots)
        messages = conversation.messages
    elif "query" in value:
        turns, images = _simple_turns(value)
        messages = parse_turns(turns, images, base_dir, require_answer=False, roots=roots)
    else:
        keys = ", ".join(sorted(value)) or "none"
        raise RecordError("(record)", f"needs 'conversations', 'messages' or 'query' (found: {keys})")
    reference = None
    if messages[-1].role == "assistant":
        reference = messages[-1].text("").strip()
        messages = messages[:-1]
    return Prompt(key, raw.location, value, messages, reference)


def _simple_turns(record: dict[str, Any]) -> tuple[list[Turn], list[str]]:
    """The simple form's turns and images, each turn with the field that holds it (`query`, `history[i][0]`, ...),
    for the parser both forms share: a problem names the record's own field, not the `messages` it is read as."""
    query, history, images = record["query"], record.get("history") or [], record.get("images") or []
    if not isinstance(query, str):
        raise RecordError("query", f"must be a string, got {type(query).__name__}")
    if not isinstance(history, list):
        raise RecordError("history", "must be a list of [query, response] string pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise RecordError(f"history[{i}]", "must be a [query, response] pair of strings")
    if not isinstance(images, list):
        raise RecordError("images", "must be a list of image paths or URLs")
    for i, image in enumerate(images):
        if not isinstance(image, str):
            raise RecordError(f"images[{i}]", f"must be an image path or URL, got {type(image).__name__}")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise RecordError("system", f"must be a string, got {type(system).__name__}")
    turns: list[Turn] = []
    for i, (asked, answered) in enumerate(history):
        turns += [Turn("user", asked, f"history[{i}][0]"), Turn("assistant", answered, f"history[{i}][1]")]
    # Without marks, the images come before the query's text. A mark in a response counts too: the parse fills it
    # and refuses it there; not counted, the images were put in the query as well, and the reject blamed the query.
    if images and not any("<image>" in text for text in [*(turn.text for turn in turns), query]):
        query = "<image>" * len(images) + query
    turns.append(Turn("user", query, "query"))
    if system is not None:  # ms-swift's query-response form: the record's own system prompt ("" for none)
        turns.insert(0, Turn("system", system, "system"))
    return turns, images
