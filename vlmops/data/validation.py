"""Checking dataset records as a stream: each record is parsed, its images opened and its tokens counted,
then it is written on (kept) or to the rejects file (with its reason), and forgotten.

What stays in memory grows by a few numbers per record (its token length, image and turn counts, and an
8-byte fingerprint to find duplicates), never by the records themselves, so a file of any size validates in
about the same memory (bench/validate_rss_bench.py). The records read ahead of the one being checked are a fixed
number (`AHEAD`), with the bytes of their s3:// and http(s):// images, downloaded meanwhile (`ImagesAhead`).
`vlmops validate PATH` checks files this way without writing anything but the rejects file; `vlmops.data.prepare`
runs the same checker to build a snapshot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import statistics
from array import array
from collections import Counter, deque
from collections.abc import Container, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from vlmops.config import DataConfig, StorageConfig
from vlmops.conversation import Conversation
from vlmops.data.formats import DatasetPath, Entry, dataset_files, file_name, is_jsonl, iter_dataset, record_line
from vlmops.data.images import ImageLoadError, ImageStoreError, open_image_bytes, read_image_bytes
from vlmops.data.length import MaxLength
from vlmops.data.problems import DatasetError, RecordProblem
from vlmops.models.template import Tokenizer, encode
from vlmops.plural import counted
from vlmops.staging import publish_file
from vlmops.storage import REQUESTS_AT_ONCE

log = logging.getLogger(__name__)

IMAGE_THREADS = REQUESTS_AT_ONCE
"""s3:// and http(s):// images downloaded at once: each is a round trip, and a dataset's thousands of them one after
another were as many round trips' wait."""
DOWNLOADED = ("s3://", "http://", "https://")
"""The images downloaded ahead (ImagesAhead); those on disk and data: URIs are read as their record is checked."""
AHEAD = 4 * IMAGE_THREADS
"""Records read ahead of the one being checked, whose downloaded images are fetched meanwhile: enough to keep every
thread busy, few enough that memory holds their images' bytes and no more."""
EXAMPLES = 100
"""Problems and duplicates kept in memory and in report.json; the rejects file has every one."""
REJECTS_FILE = "rejects.jsonl"


@dataclass
class SplitStats:
    """Counts and token-length statistics of one split (lengths include the image tokens)."""

    records: int = 0
    turns: int = 0
    images: int = 0
    text_only_records: int = 0
    multi_turn_records: int = 0
    multi_image_records: int = 0
    image_tokens: int = 0
    tokens_min: int = 0
    tokens_mean: float = 0.0
    tokens_p50: int = 0
    tokens_p95: int = 0
    tokens_max: int = 0
    over_max_length: int = 0


@dataclass
class ValidationReport:
    """What validation found; written as report.json beside a snapshot and logged to MLflow.

    Every record read is kept, rejected or (`max_length_policy: drop`) dropped:
    `read == sum(split.records) + rejected_count + len(dropped_too_long)`.
    """

    sources: dict[str, str]
    max_length: int
    max_length_policy: str
    num_image_tokens: int
    splits: dict[str, SplitStats] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    """The first EXAMPLES rejected records (file:line, field, reason); all of them are in `rejects_file`."""
    dropped_too_long: list[str] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=dict)
    read: int = 0
    rejected_count: int = 0
    rejects_file: str = ""
    duplicates: int = 0
    """Records identical to an earlier one (same turns, images and fields): kept, and reported."""
    duplicate_examples: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("lengths")
        return data

    def summary(self) -> str:
        lines = [f"read {counted(self.read, 'record')}"]
        for name, s in self.splits.items():
            lines.append(
                f"{name}: {counted(s.records, 'record')} ({s.multi_turn_records} multi-turn, "
                f"{s.multi_image_records} multi-image, {s.text_only_records} text-only), {counted(s.turns, 'turn')}, "
                f"{counted(s.images, 'image')}; tokens min/p50/p95/max "
                f"{s.tokens_min}/{s.tokens_p50}/{s.tokens_p95}/{s.tokens_max} (incl. {self.num_image_tokens} per image)"
            )
        if self.rejected_count:
            lines.append(f"rejected: {counted(self.rejected_count, 'record')}; {self.rejects_file} says why")
        if self.dropped_too_long:
            lines.append(f"dropped (longer than {self.max_length} tokens): {len(self.dropped_too_long)}")
        if self.duplicates:
            shown = ", ".join(f"{d['location']} (= {d['duplicate_of']})" for d in self.duplicate_examples[:5])
            more = " ..." if self.duplicates > 5 else ""
            lines.append(f"warning: {counted(self.duplicates, 'duplicate record')}, kept: {shown}{more}")
        return "\n".join(lines)


@dataclass
class Tally:
    """Three numbers per kept record, in file order: token length, images, user turns."""

    lengths: array[int] = field(default_factory=lambda: array("l"))
    images: array[int] = field(default_factory=lambda: array("l"))
    turns: array[int] = field(default_factory=lambda: array("l"))

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, length: int, conv: Conversation) -> None:
        self.lengths.append(length)
        self.images.append(len(conv.images))
        self.turns.append(sum(1 for m in conv.messages if m.role == "user"))

    def subset(self, indices: Sequence[int]) -> Tally:
        part = Tally()
        for i in indices:
            part.lengths.append(self.lengths[i])
            part.images.append(self.images[i])
            part.turns.append(self.turns[i])
        return part

    def stats(self, num_image_tokens: int, max_length: int) -> SplitStats:
        s = SplitStats(records=len(self), turns=sum(self.turns), images=sum(self.images))
        s.image_tokens = s.images * num_image_tokens
        s.text_only_records = sum(1 for n in self.images if n == 0)
        s.multi_image_records = sum(1 for n in self.images if n > 1)
        s.multi_turn_records = sum(1 for n in self.turns if n > 1)
        s.over_max_length = sum(1 for n in self.lengths if n > max_length)
        if self.lengths:
            ordered = sorted(self.lengths)
            s.tokens_min, s.tokens_max = ordered[0], ordered[-1]
            s.tokens_mean = round(statistics.fmean(ordered), 1)
            s.tokens_p50 = ordered[len(ordered) // 2]
            s.tokens_p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
        return s


def rejects_path(data: DataConfig, out_root: str | os.PathLike[str]) -> Path:
    """Where rejected records go: `data.rejects_file`, else rejects.jsonl in `out_root` (the datasets folder)."""
    return Path(data.rejects_file).expanduser() if data.rejects_file else Path(out_root) / REJECTS_FILE


@dataclass
class RejectsFile:
    """The rejects file being written: one jsonl row per rejected record."""

    path: Path
    stream: IO[str]

    def write(self, row: dict[str, Any]) -> None:
        self.stream.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextmanager
def rejects_writer(path: Path) -> Iterator[RejectsFile]:
    """The rejects file, written aside and put in place when validation ends, also when it fails (that is
    when it is needed most). Rewritten by every validation, so it never describes an older one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    stream = staging.open("w", encoding="utf-8")
    try:
        yield RejectsFile(path, stream)
    finally:
        stream.close()
        publish_file(staging, path)


class RecordChecker:
    """Checks records one at a time and keeps count; see the module docstring."""

    def __init__(
        self,
        data: DataConfig,
        tokenizer: Tokenizer,
        num_image_tokens: int,
        system_prompt: str | None,
        storage: StorageConfig | None,
        rejects: RejectsFile,
        image_dir: Path | None = None,
    ):
        """`image_dir`: where to copy each image (a snapshot's images/ folder); None only checks them."""
        self.data = data
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.system_prompt = system_prompt
        self.storage = storage
        self.rejects = rejects
        self.image_dir = image_dir
        self.policy = MaxLength.for_tokenizer(data.max_length, data.max_length_policy, tokenizer, num_image_tokens)
        self.image_names: dict[str, str | ImageLoadError] = {}
        """Each image checked so far: its name in the snapshot (or "" when only checked), or why it failed."""
        self.read = 0
        self.invalid = 0
        self.too_long = 0
        self.fatal: list[RecordProblem] = []
        """The first EXAMPLES problems that stop the run."""
        self.rejected: list[dict[str, str]] = []
        self.dropped: list[str] = []
        self.duplicates = 0
        self.duplicate_examples: list[dict[str, str]] = []
        self._seen: dict[int, int] = {}  # record fingerprint -> (file number << 32 | line or index) of its first copy
        self._files: list[DatasetPath] = []
        self._ahead: ImagesAhead | None = None  # while a file is checked

    def check_file(self, path: DatasetPath, out: IO[str] | None = None, tally: Tally | None = None) -> Tally:
        """Check every record of one file (local, or an `s3://` object); write each kept record to `out` (snapshot
        form); add it to `tally`."""
        tally = tally if tally is not None else Tally()
        self._files.append(path)
        roots = [Path(r) for r in self.data.allowed_roots]
        with self._reading_ahead() as ahead:
            entries = ahead.records(iter_dataset(path, roots, self.storage))
            for entry in tqdm(entries, desc=f"validate {file_name(path)}", unit="rec", leave=False, disable=None):
                self._check_record(entry, out, tally)
        return tally

    @contextmanager
    def _reading_ahead(self) -> Iterator[ImagesAhead]:
        pool = ThreadPoolExecutor(IMAGE_THREADS, thread_name_prefix="image-read")
        self._ahead = ImagesAhead(pool, self.storage, self.image_names)
        try:
            yield self._ahead
        finally:  # validation stopped: the downloads not yet started never start
            self._ahead = None
            pool.shutdown(cancel_futures=True)

    def _check_record(self, entry: Entry, out: IO[str] | None, tally: Tally) -> None:
        """Check one record: write it to `out` and add it to `tally`, or reject or drop it."""
        self.read += 1
        if isinstance(entry.result, RecordProblem):
            self._reject(entry, entry.result)
            return
        conv = entry.result
        problem = self._check_images(conv)
        if problem is not None:
            self._reject(entry, problem)
            return
        enc = encode(conv.messages, self.tokenizer, self.num_image_tokens, self.system_prompt)
        check = self.policy.check(len(enc), enc)
        if check.problem is not None:
            self._reject(entry, RecordProblem(entry.location, "(length)", check.problem), too_long=True)
            return
        if check.dropped:
            self.dropped.append(entry.location)
            return
        line = record_line(conv, self._names(conv))
        self._note_duplicate(line, entry)
        if out is not None:
            out.write(line)
        tally.add(len(enc), conv)

    def raise_problems(self, report: ValidationReport) -> None:
        """Fill in the report's counts; raise DatasetError with every problem that stops the run."""
        report.read += self.read
        report.rejected = self.rejected[:EXAMPLES]
        report.rejected_count = self.invalid
        report.dropped_too_long = self.dropped
        report.duplicates = self.duplicates
        report.duplicate_examples = self.duplicate_examples
        report.rejects_file = str(self.rejects.path)
        stopping = self.too_long + (self.invalid if self.data.invalid_records == "error" else 0)
        if not stopping:
            if self.invalid:
                log.warning("left out %s; see %s", counted(self.invalid, "invalid record"), report.rejects_file)
            return
        hints = []
        if self.invalid and self.data.invalid_records == "error":
            hints.append("fix these records, or set data.invalid_records: skip to leave them out")
        if self.too_long:
            hints.append(self.policy.hint())
        hints.append(f"every rejected record is listed, with its reason, in {report.rejects_file}")
        raise DatasetError(self.fatal, "\n".join(hints), total=stopping, report=report)

    def _check_images(self, conv: Conversation) -> RecordProblem | None:
        for image in conv.images:
            name = self.image_names.get(image.uri)
            if name is None:
                try:
                    name = self._store_image(image.uri)
                except ImageLoadError as err:
                    if err.retryable:  # not the record's fault: left out, it would be missing from the snapshot
                        raise ImageStoreError(
                            f"{conv.source}: {err}. Validation stops here rather than leave the record out for a "
                            "failure that may pass: run it again"
                        ) from err
                    name = err
                self.image_names[image.uri] = name
            if isinstance(name, ImageLoadError):
                return RecordProblem(conv.source, image.field or "image", str(name))
        return None

    def _names(self, conv: Conversation) -> dict[str, str]:
        """Old -> snapshot URIs of this record's images (none when only checking)."""
        if self.image_dir is None:
            return {}
        return {i.uri: str(self.image_names[i.uri]) for i in conv.images}

    def _store_image(self, uri: str) -> str:
        """Check the image opens; keep its bytes under a content-hash name; its snapshot-relative path."""
        ahead = self._ahead.take(uri) if self._ahead is not None else None
        data = ahead if ahead is not None else read_image_bytes(uri, self.storage)
        open_image_bytes(data, uri)
        if self.image_dir is None:
            return ""
        digest = hashlib.sha256(data).hexdigest()
        if uri.startswith("data:"):
            # The media type is the record's text: only a plain subtype (png, jpeg, svg+xml) names the file; a
            # slash or a NUL in it would make a path that cannot be written.
            subtype = uri[len("data:image/") : uri.index(";")] if uri.startswith("data:image/") else ""
            suffix = f".{subtype}" if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]{0,15}", subtype) else ".img"
        else:
            suffix = Path(uri.split("?")[0]).suffix.lower() or ".img"
        target = self.image_dir / f"{digest[:24]}{suffix}"
        if not target.exists():
            # A copy, never a hardlink to the user's file: an edit to that file would change a snapshot named by
            # its content, and DVC (which hardlinks the snapshot into its cache) makes cached files read-only.
            target.write_bytes(data)
        return f"images/{target.name}"

    def _reject(self, entry: Entry, problem: RecordProblem, too_long: bool = False) -> None:
        if too_long:
            self.too_long += 1
        else:
            self.invalid += 1
            if len(self.rejected) < EXAMPLES:
                self.rejected.append(asdict(problem))
        if (too_long or self.data.invalid_records == "error") and len(self.fatal) < EXAMPLES:
            self.fatal.append(problem)
        file = self._files[-1]
        where = {"line": entry.number} if is_jsonl(file) else {"index": entry.number}
        row = {"file": str(file), **where, "field": problem.field, "reason": problem.reason, "record": entry.raw}
        self.rejects.write(row)

    def _note_duplicate(self, line: str, entry: Entry) -> None:
        key = int.from_bytes(hashlib.blake2b(line.encode(), digest_size=8).digest(), "big")
        here = (len(self._files) - 1) << 32 | entry.number
        first = self._seen.setdefault(key, here)
        if first == here:
            return
        self.duplicates += 1
        if len(self.duplicate_examples) < EXAMPLES:
            self.duplicate_examples.append({"location": entry.location, "duplicate_of": self._location(first)})

    def _location(self, packed: int) -> str:
        file = self._files[packed >> 32]
        number = packed & 0xFFFFFFFF
        return f"{file}:{number}" if is_jsonl(file) else f"{file}[{number}]"


class ImagesAhead:
    """The downloaded images (s3://, http(s)://) of the AHEAD records after the one being checked, fetched meanwhile
    on `pool` (IMAGE_THREADS at a time), each once, and held until the check of a record that names it takes them
    (`take`).

    Records are still checked one at a time, in order, and each finds what it found when its images were read as it
    came: a missing image, one that does not open, a failure that may pass (which stops validation). An image that no
    record's check took (an earlier image of its record was refused) is dropped once no record ahead names it. Images
    on disk or by URL are read as their record is checked; those in `checked` (their answer known) are not read
    again.
    """

    def __init__(self, pool: ThreadPoolExecutor, storage: StorageConfig | None, checked: Container[str]):
        self.pool = pool
        self.storage = storage
        self.checked = checked
        self._reads: dict[str, Future[bytes]] = {}
        self._wanted: Counter[str] = Counter()  # image -> records ahead that name it

    def records(self, entries: Iterator[Entry]) -> Iterator[Entry]:
        """`entries`, each once the images of the AHEAD after it are on their way."""
        window: deque[tuple[Entry, list[str]]] = deque()
        for entry in entries:
            window.append((entry, self._want(entry)))
            if len(window) > AHEAD:
                yield from self._check_first(window)
        while window:
            yield from self._check_first(window)

    def take(self, uri: str) -> bytes | None:
        """The image's bytes, downloaded ahead (an ImageLoadError where that failed); None where it was not."""
        read = self._reads.pop(uri, None)
        return None if read is None else read.result()

    def _want(self, entry: Entry) -> list[str]:
        if isinstance(entry.result, RecordProblem):
            return []
        wanted = [image.uri for image in entry.result.images if image.uri.startswith(DOWNLOADED)]
        wanted = [uri for uri in wanted if uri not in self.checked]
        for uri in wanted:
            self._wanted[uri] += 1
            if uri not in self._reads:
                self._reads[uri] = self.pool.submit(read_image_bytes, uri, self.storage)
        return wanted

    def _check_first(self, window: deque[tuple[Entry, list[str]]]) -> Iterator[Entry]:
        entry, wanted = window.popleft()
        yield entry
        for uri in wanted:  # its check is done: what no record ahead names is not kept
            self._wanted[uri] -= 1
            if not self._wanted[uri]:
                del self._wanted[uri]
                if (read := self._reads.pop(uri, None)) is not None:
                    read.cancel()


def validate_files(
    paths: Sequence[str | os.PathLike[str]],
    data: DataConfig,
    tokenizer: Tokenizer,
    num_image_tokens: int,
    rejects_file: Path,
    system_prompt: str | None = None,
    storage: StorageConfig | None = None,
) -> ValidationReport:
    """Check every record of the dataset files or folders `paths` (or `s3://` objects and prefixes), as one set (no
    split, no snapshot).

    Raises:
        DatasetError: records that stop the run (invalid ones unless `data.invalid_records` is skip, and too
            long ones under `data.max_length_policy: error`); it carries the report.
    """
    files = dataset_files(paths, storage)
    report = ValidationReport(
        {"all": ", ".join(str(f) for f in files)}, data.max_length, data.max_length_policy, num_image_tokens
    )
    tally = Tally()
    with rejects_writer(rejects_file) as rejects:
        checker = RecordChecker(data, tokenizer, num_image_tokens, system_prompt, storage, rejects)
        for file in files:
            checker.check_file(file, None, tally)
        report.splits["all"] = tally.stats(num_image_tokens, data.max_length)
        report.lengths["all"] = list(tally.lengths)
        checker.raise_problems(report)
    return report
