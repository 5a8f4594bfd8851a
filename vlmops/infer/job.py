"""Answering a batch inference job's shards: its records streamed through the engine, each shard published as soon as
it is answered.

A `ShardRunner` holds one loaded model and engine. Pool threads parse the records and load their images ahead of the
engine, one thread (the tokenizer's) encodes them, and the engine answers the shards as one stream; a shard is
published as its rejects, then its part (the files: `vlmops.infer.job_output`).

Everything a shard needs is in `_job/job.json`, so any process that can load the model can do any shard:
this one, a process per GPU (`vlmops.infer.parallel`), or Prefect task workers on other machines
(flows/batch_inference.py).

The rest of a job: what defines it (`vlmops.infer.job_plan`), planning it from the model and inputs
(`vlmops.infer.planning`), its output folder (`vlmops.infer.job_output`), where it stands (`vlmops.infer.job_status`),
one run of it at a time (`vlmops.infer.job_lock`), and all of it end to end (`vlmops.infer.batch_job`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmops.config import PipelineConfig
from vlmops.data.image_paths import image_roots
from vlmops.data.images import ImageLoadError, ImageStoreError, load_image
from vlmops.data.problems import RecordError
from vlmops.errors import RunFailed, UserInputError
from vlmops.infer.engine import Engine, GenerationRequest, GenerationResult
from vlmops.infer.generation import decode_answer
from vlmops.infer.job_output import SHARD_REJECTS, part_name
from vlmops.infer.job_plan import JobPlan
from vlmops.infer.job_status import ShardStats
from vlmops.infer.output import JobOutput, written_file
from vlmops.infer.prefetch import HOST_THREADS, in_background, prefetched
from vlmops.infer.records import Prompt, parse_prompt, reject_key
from vlmops.infer.shards import InputFile, RawRecord, Shard, read_shard, record_base
from vlmops.models.compile_cache import SharedCompileCache
from vlmops.models.loading import LoadedModel
from vlmops.models.template import encode
from vlmops.plural import counted

log = logging.getLogger(__name__)

# How many records the image-reading threads (HOST_THREADS of them) may run ahead of the engine: image decoding
# releases the GIL, and the main thread is left to feed the GPU.
READ_AHEAD = 64


class RecordRejectedError(UserInputError):
    """`infer.on_error: fail` and a record could not be answered."""


class ShardRunner:
    """Answers shards with one loaded model and engine; any shard of any job with the same model."""

    def __init__(
        self,
        loaded: LoadedModel,
        engine: Engine,
        config: PipelineConfig,
        worker: str = "",
        compile_share: SharedCompileCache | None = None,
    ):
        self.loaded = loaded
        self.engine = engine
        self.config = config
        self.worker = worker
        self.compile_share = compile_share  # written back after a shard that compiled anything new

    def run(
        self, plan: JobPlan, shard: Shard, output: JobOutput, on_record: Callable[[int], None] | None = None
    ) -> ShardStats:
        """Answer one shard and publish it (see `run_many`)."""
        (stats,) = self.run_many(plan, [shard], output, on_record)
        return stats

    def run_many(
        self, plan: JobPlan, shards: list[Shard], output: JobOutput, on_record: Callable[[int], None] | None = None
    ) -> Iterator[ShardStats]:
        """Answer `shards` through one stream of the engine; publish each as soon as all its records are answered.

        The engine never drains between shards: the next shard's prompts fill slots as the last one's finish. A
        shard is published as its rejects, then its part (the commit point: the shard is done once the part
        exists). Only the shards in flight (being read or answered) are held in memory; the engine pulls the
        prompts (images decoded) lazily. Each shard's `seconds` is the wall time since the previous one was
        published (or since the start), so they add up to the run's.

        An error while reading the records (a record `infer.on_error: fail` refuses, an image store that fails, an
        unreadable input) stops the reading, not the engine: the prompts already taken are answered and every shard
        read whole before the error is published, then the error is raised. With many slots in flight (the fast
        engine pulls prompts ahead of its answers) those shards would otherwise be lost and answered again on the
        rerun; the shard where reading stopped publishes nothing.

        Raises:
            RecordRejectedError: `infer.on_error: fail` and a record cannot be answered (shards published before
                stay published; the rest is not).
        """
        works = [_ShardWork(shard, plan.files[shard.file]) for shard in shards]

        def requests(pool: ThreadPoolExecutor) -> Iterator[GenerationRequest]:
            """Run by a thread of its own (`in_background`); the pool reads and decodes the images."""
            for index, work in enumerate(works):
                work.begun = True
                file = work.file
                # A record's relative image paths resolve against its file's folder: on S3, keys under the file's
                # prefix (never the worker's disk). Local images stay inside the folder or data.allowed_roots, as a
                # dataset's do: a job run for someone else must not read `../../etc/shadow` (and quote its first
                # bytes in a reject).
                base_dir = record_base(file.uri)
                # On S3, local paths only under data.allowed_roots (a shared mount).
                roots = image_roots(base_dir if isinstance(base_dir, Path) else None, self.config.data.allowed_roots)

                def read(
                    item: tuple[int, RawRecord], base_dir: Path | str = base_dir, roots: tuple[Path, ...] = roots
                ) -> _Record:
                    return self._load_images(self._parse(*item, base_dir, roots))

                raws = enumerate(read_shard(file, work.shard, self.config.storage))
                for future in prefetched(pool, read, raws, READ_AHEAD):
                    record = self._encode(future.result())
                    if record.error is not None:
                        if isinstance(record.cause, ImageLoadError) and record.cause.retryable:
                            # Not the record's fault: rejected, it would stay out of the job's answers for good.
                            raise ImageStoreError(
                                f"{record.raw.location}: {record.error}. The job stops here rather than reject the "
                                "record for a failure that may pass; the shards published so far stay done: run "
                                "the same command again to go on"
                            ) from record.cause
                        if self.config.infer.on_error == "fail":
                            raise RecordRejectedError(
                                f"{record.raw.location}: {record.error} (infer.on_error=skip writes it to rejects)"
                            ) from record.cause
                        work.rejects.append(_reject(file, record.raw, record.error, record.kind))
                        if on_record:
                            on_record(1)
                        continue
                    assert record.prompt is not None and record.request is not None
                    work.prompts[record.position] = record.prompt
                    work.images += len(record.request.images)
                    record.request.key = (index, record.position)
                    yield record.request
                work.read = True  # last: the main thread takes a read shard's prompts as final

        pending = deque(works)
        last = time.perf_counter()

        def finished() -> Iterator[ShardStats]:
            nonlocal last
            for work in [w for w in itertools.takewhile(lambda w: w.begun, pending) if w.complete]:
                pending.remove(work)
                stats = self._finish(plan, work, output, time.perf_counter() - last)
                work.release()  # published: its records and answers are let go (memory stays flat over a long job)
                last = time.perf_counter()
                yield stats

        stopped: list[Exception] = []

        def until_error(feed: Iterator[GenerationRequest]) -> Iterator[GenerationRequest]:
            """`feed` up to its first error, which is kept for after the prompts in flight are answered."""
            try:
                yield from feed
            except Exception as err:
                log.warning("%s: finishing the prompts in flight and publishing the shards read whole first", err)
                stopped.append(err)

        pool = ThreadPoolExecutor(HOST_THREADS, thread_name_prefix="job-images")
        try:
            with closing(in_background(requests(pool), READ_AHEAD, "job-records")) as feed:
                for result in self.engine.generate(until_error(feed)):
                    index, position = result.key
                    works[index].results[position] = result
                    if on_record:
                        on_record(1)
                    if works[index].complete:
                        yield from finished()
        except BaseException:
            # Stopped (an error, Ctrl-C, a SIGTERM): the images being read are not waited for, as a server that does
            # not answer would hold the stop for storage.url_timeout_s, retried.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        yield from finished()  # shards whose last records were rejects
        if stopped:
            raise stopped.pop()  # not stopped[0]: the frame would hold it, and its traceback the frame
        for work in pending:
            missing = sorted(work.prompts.keys() - work.results.keys())
            raise RunFailed(f"shard {work.shard.name}: the engine returned no answer for records {missing[:10]}")

    def _finish(self, plan: JobPlan, work: _ShardWork, output: JobOutput, seconds: float) -> ShardStats:
        """Publish a shard whose records are all answered or rejected."""
        answered = [(work.prompts[i], work.results[i]) for i in sorted(work.prompts)]
        tokens = self._publish(plan, work.shard, output, answered, work.rejects)
        stats = ShardStats(
            work.shard.index, len(work.prompts), len(work.rejects), tokens, work.images, seconds, self.worker
        )
        log.info(
            "shard %s: %s, %s, %s in %.1f s",
            work.shard.name,
            counted(len(work.prompts), "result"),
            counted(len(work.rejects), "reject"),
            counted(tokens, "token"),
            stats.seconds,
        )
        if self.compile_share is not None:
            self.compile_share.publish_new()
        return stats

    def _parse(self, position: int, raw: RawRecord, base_dir: Path | str, roots: tuple[Path, ...]) -> _Record:
        """The record's prompt and its image paths, checked against the roots (in a pool thread)."""
        try:
            prompt = parse_prompt(raw, base_dir, roots)
        except RecordError as err:
            return _Record(position, raw, error=f"{err.field}: {err.reason}", cause=err, kind=err.kind)
        return _Record(position, raw, prompt)

    def _load_images(self, record: _Record) -> _Record:
        """Read and decode the record's images (in a pool thread: file or S3 reads and decoding overlap). An image that
        cannot be read is named by the record's field that holds it (`images[1]`, `query`), the first of them where
        several name it (it is read once), as the parse's rejects are: of several images, which one."""
        if record.prompt is not None:
            fields: dict[str, str] = {}  # URI -> the first field naming it
            for message in record.prompt.messages:
                for image in message.images:
                    fields.setdefault(image.uri, image.field)
            for uri, field in fields.items():
                try:
                    record.images[uri] = load_image(uri, self.config.storage)
                except ImageLoadError as err:
                    record.error, record.cause, record.kind = str(err.at(field)), err, err.kind
                    record.images = {}  # a reject: the ones read before are not held
                    break
        return record

    def _encode(self, record: _Record) -> _Record:
        """The prompt template-encoded into the engine's request (one thread only: the tokenizer's)."""
        if record.prompt is None or record.error is not None:
            return record
        try:
            encoded = encode(
                record.prompt.messages,
                self.loaded.tokenizer,
                self.loaded.num_image_tokens,
                self.config.model.system_prompt,
                add_generation_prompt=True,
            )
        except RecordError as err:
            record.error, record.cause, record.kind = f"{err.field}: {err.reason}", err, err.kind
            return record
        # infer.max_context holds whichever engine answers: `auto` picks the engine by the records a process has left,
        # so a resumed job or one worker of several may answer with the plain engine, and the rejects must not hang on it.
        limits = [n for n in (self.engine.max_context, self.config.infer.max_context) if n is not None]
        limit, answer = min(limits, default=None), self.config.infer.max_new_tokens
        if limit is not None and len(encoded.input_ids) + answer > limit:
            source, fix = self._limit_source(limit, len(encoded.input_ids) + answer)
            record.error = (
                f"prompt: {len(encoded.input_ids)} tokens ({counted(len(encoded.images), 'image')} of "
                f"{self.loaded.num_image_tokens} tokens) + "
                f"infer.max_new_tokens {answer} exceed the {limit} tokens a request may take ({source}); {fix}"
            )
            record.kind = "prompt_too_long"
            return record
        images = [record.images[ref.uri] for ref in encoded.images]
        infer = self.config.infer
        seed = record_seed(infer.seed, record.prompt.key) if infer.temperature > 0 else 0  # only draws read it
        record.request = GenerationRequest(record.position, encoded.input_ids, images, seed)
        return record

    def _limit_source(self, limit: int, needed: int) -> tuple[str, str]:
        """Where a request's limit of `limit` tokens comes from, and what lets one of `needed` tokens in."""
        shorter = "send fewer images or less text"
        if limit == self.config.infer.max_context:
            return "infer.max_context", f"{shorter}, or raise infer.max_context"
        if limit == getattr(self.loaded.model.config.get_text_config(), "max_position_embeddings", None):
            return "the model's max_position_embeddings", shorter
        return "the fast engine's slots", f"{shorter}, or size them with infer.max_context={needed} or more"

    def _publish(
        self,
        plan: JobPlan,
        shard: Shard,
        output: JobOutput,
        answered: list[tuple[Prompt, GenerationResult]],
        rejects: list[dict[str, Any]],
    ) -> int:
        """Write the shard's rejects, then its part (the commit point); return the generated token count."""
        model = plan.model.as_dict()
        tokens = 0
        with written_file(output, f"{SHARD_REJECTS}{shard.name}.jsonl") as path, path.open("w") as f:
            for reject in rejects:
                f.write(json.dumps(reject, ensure_ascii=False) + "\n")
        with written_file(output, part_name(shard)) as path, path.open("w", encoding="utf-8") as f:
            for prompt, result in answered:
                tokens += len(result.token_ids)
                response = decode_answer(self.loaded, result.token_ids)
                f.write(json.dumps(_result_record(prompt, result, response, model), ensure_ascii=False) + "\n")
        return tokens


@dataclass
class _ShardWork:
    """A shard in flight: its prompts and rejects as they are read (by the feeding thread), its answers."""

    shard: Shard
    file: InputFile
    prompts: dict[int, Prompt] = field(default_factory=dict)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    results: dict[int, GenerationResult] = field(default_factory=dict)
    images: int = 0
    begun: bool = False
    read: bool = False
    """Every record of the shard has been read (set last by the feeding thread)."""

    @property
    def complete(self) -> bool:
        return self.read and len(self.results) == len(self.prompts)

    def release(self) -> None:
        self.prompts, self.rejects, self.results = {}, [], {}


@dataclass
class _Record:
    """One record on its way to the engine: parsed and encoded, then its images loaded; or why it cannot be."""

    position: int
    raw: RawRecord
    prompt: Prompt | None = None
    images: dict[str, Any] = field(default_factory=dict)
    """The decoded images by URI (each read once however often the prompt shows it)."""
    request: GenerationRequest | None = None
    error: str | None = None
    cause: Exception | None = None
    kind: str = "invalid_record"
    """Which of REJECT_KINDS the error is."""


def record_seed(seed: int, key: Any) -> int:
    """The seed of a record's sampled tokens: `infer.seed` and the record's key (its `id`, or file and line), so the
    record draws the same answer in any shard, batch or rerun."""
    digest = hashlib.sha256(json.dumps([seed, key], sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFFFFFFFFFFFFFF


def _reject(file: InputFile, raw: RawRecord, reason: str, kind: str) -> dict[str, Any]:
    """A reject's line: its file, line (or list index), key (its `id` where one can be read, as a result's), reason
    and kind (one of REJECT_KINDS)."""
    where = {"line": raw.number} if raw.text is not None else {"index": raw.number}
    return {"file": file.uri, **where, "key": reject_key(raw), "reason": reason, "kind": kind}


def _result_record(prompt: Prompt, result: GenerationResult, response: str, model: dict[str, Any]) -> dict[str, Any]:
    record = {**prompt.fields, "key": prompt.key, "source": prompt.source, "response": response}
    if prompt.reference is not None:
        record["reference"] = prompt.reference
    record.update(generated_tokens=len(result.token_ids), finish_reason=result.finish_reason, model=model)
    return record
