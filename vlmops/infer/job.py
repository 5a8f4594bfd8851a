"""Batch inference jobs: one model over a large set of prompts, streamed, sharded, resumable, exactly once.

    OUT/part-00000.jsonl ...  results, a part per shard, records in input order
    OUT/rejects.jsonl         every record that could not be answered, with its file, line and reason
    OUT/manifest.json         written last: the parts with their record counts and hashes, model, input, settings
    OUT/_job/job.json         the job's identity and its shards (written first)
    OUT/_job/rejects-N.jsonl  each shard's rejects (gathered into rejects.jsonl at the end)

A job is the model's content hash, the inputs' content hashes and the settings that change answers, which records
are rejected, or the shard layout (`job_settings`); its id is a hash of those. The input is cut into shards of
`infer.shard_size` records (never across files). A shard is done when its part exists: the shard's rejects are
published first, its part last (each written aside and renamed, or one PUT on S3). A rerun of the same job does only
the shards whose part is missing; a rerun after the manifest is written does nothing. An output folder holding
another job is refused, never mixed.

Everything a shard needs is in `_job/job.json`, so any process that can load the model can do any shard:
this one, a process per GPU (`vlmops.infer.parallel`), or Prefect task workers on other machines
(flows/batch_inference.py).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vlmops.answers import Score
from vlmops.config import InferConfig, PipelineConfig, StorageConfig
from vlmops.data.image_paths import image_roots
from vlmops.data.images import ImageLoadError, ImageStoreError, load_image
from vlmops.data.problems import RecordError
from vlmops.errors import RunFailed, UserInputError
from vlmops.hashing import FolderHashes
from vlmops.infer.engine import (
    Engine,
    GenerationRequest,
    GenerationResult,
    refuse_context_without_room,
    slot_tokens,
)
from vlmops.infer.generation import decode_answer
from vlmops.infer.output import JobOutput, open_output, written_file
from vlmops.infer.prefetch import HOST_THREADS, in_background, prefetched
from vlmops.infer.records import (
    JOB_FILE,
    PROMPT_STEP,
    InputFile,
    Prompt,
    PromptMeasure,
    RawRecord,
    Shard,
    find_inputs,
    parse_prompt,
    read_shard,
    record_base,
    refuse_other_jobs,
    reject_key,
    scan_input,
)
from vlmops.infer.resolve import (
    REGISTRY_MANIFEST,
    ModelSource,
    catalog_resolver,
    check_pinned_from,
    model_source,
    registry_alias_version,
)
from vlmops.models.compile_cache import SharedCompileCache
from vlmops.models.loading import LoadedModel
from vlmops.models.template import encode
from vlmops.plural import counted
from vlmops.storage import is_partial

log = logging.getLogger(__name__)

SHARD_REJECTS = "_job/rejects-"
PART_PREFIX = "part-"
REJECTS_FILE = "rejects.jsonl"
MANIFEST_FILE = "manifest.json"
# How many records the image-reading threads (HOST_THREADS of them) may run ahead of the engine: image decoding
# releases the GIL, and the main thread is left to feed the GPU.
READ_AHEAD = 64


REJECT_KINDS = {
    "malformed_json": "malformed JSON",
    "not_text": "not UTF-8 text",
    "invalid_record": "invalid record",
    "missing_image": "missing image",
    "not_an_image": "not an image",
    "image_too_large": "image too large",
    "unreadable_image": "unreadable image",
    "prompt_too_long": "prompt too long",
}
"""Why a record is a reject, as its line's `kind` says (set where the reject is made, not read from its reason), and
the words the summaries use; `other` for lines written before rejects had a kind."""


class JobMismatchError(UserInputError):
    """The output folder holds another job (another model, input or settings)."""


class RecordRejectedError(UserInputError):
    """`infer.on_error: fail` and a record could not be answered."""


@dataclass(frozen=True)
class ModelInfo:
    """The model a job runs: as the user named it (`models:/NAME@ALIAS` stays the alias), the registry version it
    resolved to if any, and its content hash."""

    uri: str
    version: str | None
    content_hash: str

    @property
    def pinned(self) -> str:
        """The reference that loads this very model whatever the registry does since: `models:/NAME/VERSION` for an
        alias (the version the job took it at), else `uri`."""
        return registry_alias_version(self.uri, self.version) or self.uri

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobPlan:
    """Everything that defines a job and its shards; saved as `_job/job.json`."""

    job_id: str
    model: ModelInfo
    input: str
    files: list[InputFile]
    shards: list[Shard]
    settings: dict[str, Any]
    retry_of: str | None = None
    """A job over another job's rejects (`infer.retry_rejects`): that job's output (its files' `only` say which
    records)."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "model": self.model.as_dict(),
                "input": self.input,
                "files": [asdict(f) for f in self.files],
                "shards": [asdict(s) for s in self.shards],
                "settings": self.settings,
                "retry_of": self.retry_of,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> JobPlan:
        data = json.loads(text)
        return cls(
            data["job_id"],
            ModelInfo(**data["model"]),
            data["input"],
            [InputFile(**f) for f in data["files"]],
            [Shard(**s) for s in data["shards"]],
            data["settings"],
            data.get("retry_of"),
        )

    @property
    def records(self) -> int:
        return sum(f.records for f in self.files)

    @property
    def longest_prompt(self) -> int | None:
        """The most prompt tokens any record encodes to (what a slot of the fast engine must hold before the answer);
        None where the plan did not count them."""
        counted = [f.longest_prompt for f in self.files]
        if not counted or any(n is None for n in counted):
            return None
        return max(n for n in counted if n is not None)

    def slot_advice(self, max_new_tokens: int) -> str | None:
        """Where a few long records make every slot of the fast engine long: what they cost and the setting that
        trades them for slots (None where 99% of the records need at least half the slot, or nothing was counted).
        """
        longest = self.longest_prompt
        steps: collections.Counter[int] = collections.Counter()
        for file in self.files:
            for step, count in file.prompt_steps or []:
                steps[step] += count
        total = sum(steps.values())
        if longest is None or not total:
            return None
        covered, bulk = 0, 0
        for step, count in sorted(steps.items()):
            covered += count
            if covered >= 0.99 * total:
                bulk = step
                break
        context, bulk_context = slot_tokens(longest + max_new_tokens), slot_tokens(bulk * PROMPT_STEP + max_new_tokens)
        if 2 * bulk_context > context:
            return None
        where = next(
            (f"{f.name}:{f.longest_line}" for f in self.files if f.longest_prompt == longest and f.longest_line),
            "?",
        )
        longer = sum(count for step, count in steps.items() if step > bulk)
        return (
            f"the job's longest prompt ({where}) takes {longest} tokens, so each slot of the fast engine holds {context} "
            f"tokens with the answer, where {covered} of its {total} records need {bulk_context} or fewer: "
            f"--set infer.max_context={bulk_context} fits ~{context // bulk_context}x the slots in the same memory and "
            f"sends at most {counted(longer, 'record')} (those over {bulk * PROMPT_STEP} prompt tokens) to the rejects"
        )

    def context_advice(self, max_context: int, max_new_tokens: int) -> str | None:
        """Where a set `infer.max_context` holds some of the job's prompts but not its longest: which records go to
        the rejects (None where every counted prompt fits, or nothing was counted)."""
        longest = self.longest_prompt
        if longest is None or longest + max_new_tokens <= max_context:
            return None
        where = next(
            (f"{f.name}:{f.longest_line}" for f in self.files if f.longest_prompt == longest and f.longest_line),
            "?",
        )
        return (
            f"infer.max_context {max_context} holds prompts of up to {max_context - max_new_tokens} tokens beside "
            f"infer.max_new_tokens {max_new_tokens}; the job's longest prompt ({where}) takes {longest}: each longer "
            f"record goes to the rejects with its token count (unset infer.max_context to size the slots to the job's "
            f"prompts, or raise it to {longest + max_new_tokens})"
        )


@dataclass
class ShardStats:
    """What one shard's run did."""

    shard: int
    results: int
    rejects: int
    generated_tokens: int
    images: int
    seconds: float
    worker: str = ""


def shards_wall_s(ran: Sequence[ShardStats]) -> float:
    """The wall time of shards run by workers side by side: the largest of the workers' sums."""
    per_worker: dict[str, float] = {}
    for stats in ran:
        per_worker[stats.worker] = per_worker.get(stats.worker, 0.0) + stats.seconds
    return max(per_worker.values(), default=0.0)


def shards_rates(ran: Sequence[ShardStats]) -> tuple[float, float]:
    """Generated tokens/s and images/s of shards over their wall time (`shards_wall_s`); 0 where it is 0."""
    seconds = shards_wall_s(ran)
    if not seconds:
        return 0.0, 0.0
    return sum(s.generated_tokens for s in ran) / seconds, sum(s.images for s in ran) / seconds


@dataclass
class JobResult:
    """A finished job: its manifest, and what this run did (shards it ran, their speed)."""

    output: str
    manifest: dict[str, Any]
    ran: list[ShardStats] = field(default_factory=list)
    mlflow_run_id: str | None = None
    startup_s: float | None = None
    """Seconds before the shards began in this process: resolve and hash the model, plan, load it, build the engine
    (None: nothing ran here, or the shards ran in worker processes)."""
    finished_before: bool = False
    """The manifest was there already: this command did nothing."""

    @property
    def records(self) -> int:
        return int(self.manifest["records_read"])

    @property
    def results(self) -> int:
        return int(self.manifest["results"])

    @property
    def rejects(self) -> int:
        return int(self.manifest["rejects"])

    @property
    def seconds(self) -> float:
        """How long the shards took: a worker's shards run one after another (each shard's seconds count from the
        end of its worker's previous one), workers side by side, so the busiest worker's sum."""
        return shards_wall_s(self.ran)

    @property
    def tokens_per_s(self) -> float:
        return shards_rates(self.ran)[0]

    @property
    def images_per_s(self) -> float:
        return shards_rates(self.ran)[1]

    def metrics(self) -> dict[str, float]:
        return {
            "records": self.records,
            "results": self.results,
            "rejects": self.rejects,
            **{f"rejects.{kind}": n["count"] for kind, n in self.manifest.get("rejects_by_reason", {}).items()},
            "generated_tokens": float(self.manifest["generated_tokens"]),
            "shards_run": len(self.ran),
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "images_per_s": self.images_per_s,
            **({"startup_seconds": self.startup_s} if self.startup_s is not None else {}),
            **({"scored": score["scored"], "exact_match": score["accuracy"]} if (score := self.score) else {}),
        }

    @property
    def score(self) -> dict[str, Any] | None:
        """Exact match of the answers against the records' reference answers (None: no record had one, or a
        manifest written before jobs scored)."""
        return self.manifest.get("score")


@dataclass
class StoppedJob:
    """A job stopped by `infer.max_shards` before its last shard: where it stands (read back from its output) and
    what this run did."""

    status: JobStatus
    ran: list[ShardStats]
    startup_s: float | None = None


# -- identity -----------------------------------------------------------------------------------------------


SETTING_KEYS = {
    "max_new_tokens": "infer.max_new_tokens",
    "temperature": "infer.temperature",
    "top_p": "infer.top_p",
    "top_k": "infer.top_k",
    "seed": "infer.seed",
    "repetition_penalty": "infer.repetition_penalty",
    "shard_size": "infer.shard_size",
    "system_prompt": "model.system_prompt",
    "dtype": "model.dtype",
    "max_context": "infer.max_context",
    "allowed_roots": "data.allowed_roots",
    "url_max_mib": "storage.url_max_mib",
    "url_allow_networks": "storage.url_allow_networks",
}
"""Each of a job's settings (`job_settings`) and the config key it comes from, which a mismatch names."""

_DEFAULT_URL_MAX_MIB = StorageConfig().url_max_mib


def job_settings(config: PipelineConfig) -> dict[str, Any]:
    """The settings that change answers, which records are answered or rejected, or the shard layout; batch size,
    workers and engine do not (sampled, the engines draw differently, but each draw is a valid answer of the same
    settings).

    The limits on prompts and images (`infer.max_context`, `data.allowed_roots`, `storage.url_max_mib`,
    `storage.url_allow_networks`) decide which records are rejects: a rerun with another would answer records the
    done shards rejected, or the reverse. They are in only where set (not their defaults), so that a job planned
    before they were part of the identity keeps its id.
    """
    infer, storage = config.infer, config.storage
    sampling = {"top_k": infer.top_k, "seed": infer.seed} if infer.temperature > 0 else {}
    limits: dict[str, Any] = {}
    if infer.max_context is not None:
        limits["max_context"] = infer.max_context
    if config.data.allowed_roots:  # as the records' image paths are checked against them: resolved, in any order
        limits["allowed_roots"] = sorted({str(root) for root in image_roots(None, config.data.allowed_roots)})
    if storage.url_max_mib != _DEFAULT_URL_MAX_MIB:
        limits["url_max_mib"] = storage.url_max_mib
    if storage.url_allow_networks:
        limits["url_allow_networks"] = sorted(storage.url_allow_networks)
    return {
        "max_new_tokens": infer.max_new_tokens,
        "temperature": infer.temperature,
        "top_p": infer.top_p,
        **sampling,
        "repetition_penalty": infer.repetition_penalty,
        "shard_size": infer.shard_size,
        "system_prompt": config.model.system_prompt,
        "dtype": config.model.dtype,
        **limits,
    }


def resolve_job_model(ref: str, config: PipelineConfig, named_as: str | None = None) -> tuple[ModelSource, ModelInfo]:
    """The folders to load for `ref` (any form `vlmops infer` takes) and the model's identity: a registry alias is
    looked up once, and the version it names is the one downloaded, hashed and recorded. `named_as`: the alias a
    pinned `ref` (`models:/NAME/VERSION`) was resolved from by the caller (`pinned_model_ref`), recorded as the job's
    model URI, as the user named it.

    Raises:
        UserInputError: `named_as` is not an alias of the registered model `ref` is a version of.
    """
    if named_as is not None:
        check_pinned_from(named_as, ref)
    source = model_source(ref, None, catalog_resolver(config))
    cache = hash_cache_dir(config)
    digest = folder_hash(source.checkpoint, cache)
    if source.adapter is not None:
        adapter = folder_hash(source.adapter, cache)
        digest = hashlib.sha256(f"{digest}+{adapter}".encode()).hexdigest()
    return source, ModelInfo(named_as or ref, _registry_version(source.checkpoint), f"sha256:{digest}")


def folder_hash(folder: Path, cache_dir: Path | None = None) -> str:
    """One hash over every file's relative path and content (the registry's download note and partial S3 downloads
    excluded).

    With `cache_dir`, large files unchanged since an earlier job (size, mtime, ctime, inode) are not read again.
    """
    hashes = FolderHashes(folder, cache_dir)
    digest = hashlib.sha256()
    files = (p for p in hashes.folder.rglob("*") if p.is_file() and p.name != REGISTRY_MANIFEST and not is_partial(p))
    for path in sorted(files):
        digest.update(f"{path.relative_to(hashes.folder).as_posix()}\0{hashes.sha256(path)}\n".encode())
    hashes.save()
    return digest.hexdigest()


def hash_cache_dir(config: PipelineConfig) -> Path:
    """Where jobs remember the hashes of model files: beside the model cache (`model.cache_dir`)."""
    return Path(config.model.cache_dir).expanduser() / "hashes"


def _registry_version(checkpoint: Path) -> str | None:
    """The version number of a registered model downloaded by `download_registered_model`, else None."""
    for folder in (checkpoint, *list(checkpoint.parents)[:3]):
        note = folder / REGISTRY_MANIFEST
        if note.is_file():
            return str(json.loads(note.read_text())["version"])
    return None


class PromptCounter:
    """A record's prompt tokens exactly as a `ShardRunner` encodes it (template, system prompt, image tokens), for the
    plan's `longest_prompt`: the fast engine sizes its K/V slots to the job with it."""

    def __init__(self, tokenizer: Any, num_image_tokens: int, config: PipelineConfig):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.system_prompt = config.model.system_prompt

    def __call__(self, raw: RawRecord, base_dir: Path | str) -> int | None:
        try:
            prompt = parse_prompt(raw, base_dir)
            encoded = encode(
                prompt.messages,
                self.tokenizer,
                self.num_image_tokens,
                self.system_prompt,
                add_generation_prompt=True,
            )
        except (RecordError, ValueError):  # rejected when the job reads it: no slot needs to hold it
            return None
        return len(encoded.input_ids)


def counts_prompts(config: PipelineConfig) -> bool:
    """Whether a job's plan counts its prompts' tokens: the fast engine sizes its slots with them where
    `infer.max_context` leaves that to the job; where it is set, the plan checks that some prompt fits it
    (`refuse_when_no_prompt_fits`), whichever engine answers."""
    infer = config.infer
    return infer.max_context is not None or infer.engine != "plain"


def plan_job(
    model: ModelInfo,
    input_spec: str,
    config: PipelineConfig,
    output_uri: str | None = None,
    measure: PromptMeasure | None = None,
) -> JobPlan:
    """Read the inputs once (hash, count, shard offsets; with `measure`, each file's longest prompt) and give the job
    its id and shards. Files under `output_uri` (an output inside the input folder) are the job's own, never
    input.

    Raises:
        UserInputError: `infer.max_context` leaves no room for a prompt beside `infer.max_new_tokens` (before any
            input is read), or for any of the job's prompts as `measure` counted them.
    """
    if config.infer.max_context is not None:
        # Before any input is read: every record would be a reject (the plain engine answers none), whichever engine.
        refuse_context_without_room(config.infer.max_context, config.infer.max_new_tokens)
    files: list[InputFile] = []
    shards: list[Shard] = []
    found = find_inputs(input_spec, config.storage, output_uri)
    retry_of = config.infer.retry_rejects
    before: dict[str, InputFile] = {}
    every = found
    if retry_of is not None:
        old, found = _choose_rejected(retry_of, found, config)
        before = {f.uri: f for f in old.files}
    refuse_other_jobs(input_spec, every, found)
    for file_index, chosen in enumerate(found):
        scanned, file_shards = scan_input(chosen, file_index, config.infer.shard_size, config.storage, measure)
        if retry_of is not None and scanned.sha256 != before[scanned.uri].sha256:
            log.warning(
                "%s changed since job %s read it: its rejects are taken by their line (or list index), so a line added "
                "or removed above one answers another record; the results' keys and source say which",
                scanned.uri,
                old.job_id,
            )
        files.append(scanned)
        shards += [replace(s, index=len(shards) + i) for i, s in enumerate(file_shards)]
    settings = job_settings(config)
    identity: dict[str, Any] = {
        "model": model.content_hash,
        "inputs": [[f.name, f.sha256] for f in files],
        "settings": settings,
    }
    if retry_of is not None:  # the records chosen: another choice is another job
        identity["only"] = [f.only for f in files]
    job_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    plan = JobPlan(job_id, model, input_spec, files, shards, settings, retry_of)
    refuse_when_no_prompt_fits(plan, config.infer)
    return plan


def refuse_when_no_prompt_fits(plan: JobPlan, infer: InferConfig) -> None:
    """Refuse a job none of whose prompts fits `infer.max_context` beside `infer.max_new_tokens`: every record would
    go to the rejects one by one, after the model's weights loaded. The prompts as the plan counted them (the runner's
    own encoding: the chat template, the system prompt and each image's tokens); nothing is checked where they were
    not counted. A job where some prompt fits runs, and each longer record is a reject that gives its token count.

    Raises:
        UserInputError: naming the shortest prompt, its tokens, both keys and what to change.
    """
    shortest = [(f.shortest_prompt, f"{f.name}:{f.shortest_line}") for f in plan.files if f.shortest_prompt is not None]
    if infer.max_context is None or not shortest:
        return
    tokens, where = min(shortest)
    needed = tokens + infer.max_new_tokens
    if needed <= infer.max_context:
        return
    room = infer.max_context - tokens
    lower = f", or lower infer.max_new_tokens to {room} or less" if room >= 1 else ""
    raise UserInputError(
        f"infer.max_context {infer.max_context} holds none of this job's prompts beside infer.max_new_tokens "
        f"{infer.max_new_tokens}: its shortest prompt ({where}) takes {tokens} tokens (chat template, system prompt "
        f"and image tokens included), so every record would be rejected ({counted(plan.records, 'record')}). Raise "
        f"infer.max_context to at least {needed} ({tokens} + {infer.max_new_tokens}), or unset it to size it to the "
        f"job's prompts{lower}"
    )


def _choose_rejected(retry_of: str, found: list[InputFile], config: PipelineConfig) -> tuple[JobPlan, list[InputFile]]:
    """The finished job in `retry_of` and the input files that hold records it rejected, each with `only` those
    records (files without one are left out).

    Raises:
        UserInputError: no finished job there, it rejected nothing, or its rejects name files the input does not.
    """
    where = f"infer.retry_rejects={retry_of}"
    output = open_output(retry_of, config.storage)
    old = saved_plan(output, f"{where}: ")
    rejects = output.read_text(REJECTS_FILE) if read_manifest(old, output) is not None else None
    if rejects is None:
        raise UserInputError(
            f"{where}: job {old.job_id} is not finished (its rejects are gathered into {REJECTS_FILE} as it finishes): "
            "run its command again to finish it first"
        )
    chosen: dict[str, set[int]] = collections.defaultdict(set)
    for line in jsonl_lines(rejects):
        reject = json.loads(line)
        chosen[reject["file"]].add(int(reject["line"] if "line" in reject else reject["index"]))
    if not chosen:
        raise UserInputError(f"{where}: job {old.job_id} rejected no record: nothing to answer again")
    missing = sorted(chosen.keys() - {f.uri for f in found})
    if missing:
        raise UserInputError(
            f"{where}: job {old.job_id} rejected records of {missing[0]}"
            + (f" (and {counted(len(missing) - 1, 'more file')})" if len(missing) > 1 else "")
            + f", which --input does not name: give the input that job read ({old.input})"
        )
    return old, [replace(f, only=sorted(chosen[f.uri])) for f in found if f.uri in chosen]


def open_job(plan: JobPlan, output: JobOutput) -> JobPlan:
    """Start the job in `output`, or pick it up again (with `plan`'s prompt counts where the saved plan has none);
    refuse an output that holds anything else.

    Raises:
        JobMismatchError: the output holds another job, or files that no job of this kind wrote.
    """
    saved = output.read_text(JOB_FILE)
    if saved is None:
        foreign = output.names(PART_PREFIX) + output.names(MANIFEST_FILE)
        if foreign:
            raise JobMismatchError(
                f"output {output.uri} already holds {foreign[0]} but no {JOB_FILE}: it is not a batch inference "
                "job's folder; pass an empty or new --output"
            )
        with written_file(output, JOB_FILE) as path:
            path.write_text(plan.to_json() + "\n", encoding="utf-8")
        return plan
    old = JobPlan.from_json(saved)
    if old.job_id != plan.job_id:
        raise JobMismatchError(
            f"output {output.uri} holds job {old.job_id}, not this job {plan.job_id} "
            f"({_difference(old, plan)}); a different model, input or settings is a different job: pass another "
            f"--output, or delete {output.uri} to start over"
        )
    if old.longest_prompt is None and plan.longest_prompt is not None:
        # Planned before without the prompts' counts (with infer.engine plain then, or by an older vlmops): the same
        # files (the same job), now counted. Saved, so that workers reading the plan size their slots the same way.
        old = replace(old, files=plan.files)
        with written_file(output, JOB_FILE) as path:
            path.write_text(old.to_json() + "\n", encoding="utf-8")
    return old


def _difference(old: JobPlan, new: JobPlan) -> str:
    if old.model.content_hash != new.model.content_hash:
        if old.model.uri == new.model.uri and old.model.pinned != new.model.pinned:  # an alias moved since the start
            return (
                f"model {new.model.uri}: version {old.model.version} when the job started, version "
                f"{new.model.version} now; to finish that job, name the version it started with, {old.model.pinned}"
            )
        return (
            f"model {old.model.uri} ({old.model.content_hash[:19]}) vs {new.model.uri} ({new.model.content_hash[:19]})"
        )
    if old.retry_of != new.retry_of:
        return f"records chosen: the rejects of {old.retry_of or 'no job'} vs {new.retry_of or 'no job'}"
    if [(f.name, f.sha256) for f in old.files] != [(f.name, f.sha256) for f in new.files]:
        return f"input {old.input} vs {new.input}: {_input_difference(old.files, new.files)}"
    if [f.only for f in old.files] != [f.only for f in new.files]:
        return f"records chosen: other records of the rejects of {old.retry_of}"
    keys = [*new.settings, *(k for k in old.settings if k not in new.settings)]
    changed = [k for k in keys if (k in old.settings, old.settings.get(k)) != (k in new.settings, new.settings.get(k))]
    if not changed:
        return "the same model, input and settings, identified by another version of vlmops"
    return "settings " + ", ".join(
        f"{SETTING_KEYS.get(k, k)}: {_shown(old.settings, k)} -> {_shown(new.settings, k)}" for k in changed
    )


def _input_difference(old: list[InputFile], new: list[InputFile]) -> str:
    """The first way the input files differ, by name: one that is not read now, one that was not read then, or one
    whose content changed."""
    before = {f.name: f.sha256 for f in old}
    now = {f.name: f.sha256 for f in new}
    gone = [name for name in before if name not in now]
    added = [name for name in now if name not in before]
    changed = [name for name in now if name in before and now[name] != before[name]]
    named = [
        *(f"{name} was read then, not now" for name in gone),
        *(f"{name} is new" for name in added),
        *(f"{name} changed" for name in changed),
    ]
    if not named:
        return "the same files in another order"
    return ", ".join(named[:3]) + (f" (and {len(named) - 3} more)" if len(named) > 3 else "")


def _shown(settings: dict[str, Any], key: str) -> str:
    return repr(settings[key]) if key in settings else "unset"


def jsonl_lines(text: str) -> list[str]:
    """The lines of a .jsonl file the job wrote. Not `str.splitlines`: it also ends lines at U+2028, U+2029 and U+0085,
    which results and rejects hold as they are inside their strings (written with `ensure_ascii=False`)."""
    return [line for line in text.split("\n") if line]


def part_name(shard: Shard) -> str:
    return f"{PART_PREFIX}{shard.name}.jsonl"


def pending_shards(plan: JobPlan, output: JobOutput) -> list[Shard]:
    """The shards whose part is not there yet."""
    done = set(output.names(PART_PREFIX))
    return [s for s in plan.shards if part_name(s) not in done]


# -- running shards -----------------------------------------------------------------------------------------


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

        with (
            ThreadPoolExecutor(HOST_THREADS, thread_name_prefix="job-images") as pool,
            closing(in_background(requests(pool), READ_AHEAD, "job-records")) as feed,
        ):
            for result in self.engine.generate(until_error(feed)):
                index, position = result.key
                works[index].results[position] = result
                if on_record:
                    on_record(1)
                if works[index].complete:
                    yield from finished()
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
                    record.error, record.cause, record.kind = f"{field or 'image'}: {err}", err, err.kind
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


class RejectTally:
    """Reject lines counted by kind as they are read (a job's rejects are never held all at once), with the first
    record of each kind: {kind: {"count", "first"}}, `first` that record's `file:line` (or `file[index]`) in input
    order. Counted from the shards' rejects files, so the counts add up across workers and a resumed job's equal an
    uninterrupted one's."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, Any]] = {}

    def add(self, lines: Iterable[str]) -> None:
        for line in lines:
            reject = json.loads(line)
            kind = reject.get("kind", "other")
            where = f"{reject['file']}:{reject['line']}" if "line" in reject else f"{reject['file']}[{reject['index']}]"
            self.counts.setdefault(kind, {"count": 0, "first": where})["count"] += 1

    def by_reason(self) -> dict[str, dict[str, Any]]:
        """The counts, most first (ties in REJECT_KINDS' order)."""
        order = list(REJECT_KINDS)
        ranked = sorted(
            self.counts, key=lambda k: (-self.counts[k]["count"], order.index(k) if k in order else len(order))
        )
        return {kind: self.counts[kind] for kind in ranked}


def _result_record(prompt: Prompt, result: GenerationResult, response: str, model: dict[str, Any]) -> dict[str, Any]:
    record = {**prompt.fields, "key": prompt.key, "source": prompt.source, "response": response}
    if prompt.reference is not None:
        record["reference"] = prompt.reference
    record.update(generated_tokens=len(result.token_ids), finish_reason=result.finish_reason, model=model)
    return record


# -- finishing ----------------------------------------------------------------------------------------------


def finalize(plan: JobPlan, output: JobOutput) -> dict[str, Any]:
    """Check that every record read is a result or a reject, gather the rejects, write the manifest last.

    Raises:
        RunFailed: a shard is not done, or its part and rejects do not add up to its records.
    """
    missing = pending_shards(plan, output)
    if missing:
        raise RunFailed(
            f"job {plan.job_id}: {counted(len(missing), 'shard')} not done yet ({', '.join(s.name for s in missing[:10])}); "
            "run the same job again to finish them"
        )
    parts = []
    results = rejects = tokens = 0
    tally = RejectTally()
    score = Score()
    with written_file(output, REJECTS_FILE) as gathered, gathered.open("w", encoding="utf-8") as out:
        for shard in plan.shards:
            part_text = output.read_text(part_name(shard)) or ""
            part_records = [json.loads(line) for line in jsonl_lines(part_text)]
            reject_lines = jsonl_lines(output.read_text(f"{SHARD_REJECTS}{shard.name}.jsonl") or "")
            if len(part_records) + len(reject_lines) != shard.count:
                raise RunFailed(
                    f"job {plan.job_id}: shard {shard.name} has {counted(len(part_records), 'result')} and "
                    f"{counted(len(reject_lines), 'reject')} for {counted(shard.count, 'record')}; delete "
                    f"{part_name(shard)} and run the job again"
                )
            for line in reject_lines:
                out.write(line + "\n")
            tally.add(reject_lines)
            shard_tokens = sum(int(record["generated_tokens"]) for record in part_records)
            for record in part_records:  # dataset records that ended with an answer: scored against it
                if "reference" in record:
                    score = score.add(str(record["response"]), str(record["reference"]))
            parts.append(
                {
                    "name": part_name(shard),
                    "records": len(part_records),
                    "rejects": len(reject_lines),
                    "generated_tokens": shard_tokens,
                    "sha256": hashlib.sha256(part_text.encode("utf-8")).hexdigest(),
                }
            )
            results += len(part_records)
            rejects += len(reject_lines)
            tokens += shard_tokens
    manifest = {
        "job_id": plan.job_id,
        "model": plan.model.as_dict(),
        "input": {"spec": plan.input, "files": [asdict(f) for f in plan.files], "retry_of": plan.retry_of},
        "settings": plan.settings,
        "parts": parts,
        "records_read": plan.records,
        "results": results,
        "rejects": rejects,
        "rejects_by_reason": tally.by_reason(),
        "rejects_file": REJECTS_FILE,
        "generated_tokens": tokens,
        "score": score.as_dict() if score.scored else None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if results + rejects != plan.records:
        raise RunFailed(
            f"job {plan.job_id}: {counted(results, 'result')} + {counted(rejects, 'reject')} != "
            f"{counted(plan.records, 'record')} read"
        )
    with written_file(output, MANIFEST_FILE) as path:
        path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(plan: JobPlan, output: JobOutput) -> dict[str, Any] | None:
    """The job's manifest if the job is finished, else None."""
    text = output.read_text(MANIFEST_FILE)
    if text is None:
        return None
    manifest: dict[str, Any] = json.loads(text)
    return manifest if manifest.get("job_id") == plan.job_id else None


PACE_PARTS = 10
"""`vlmops batch-status` reads a running job's pace from its last this many parts."""


@dataclass
class JobStatus:
    """Where a job in an output folder stands, read from the folder alone (no model, no input needed)."""

    output: str
    plan: JobPlan
    done: list[Shard]
    pending: list[Shard]
    rejects: int
    """Records rejected in the done shards."""
    manifest: dict[str, Any] | None
    """The manifest once the job is finished (every shard done and gathered), else None."""
    rejects_by_reason: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The done shards' rejects by kind (`rejects_by_reason`)."""
    published: list[tuple[float, int]] = field(default_factory=list)
    """(when, records) of each done shard's part, in the order they were written (seconds since the epoch)."""

    @property
    def last_part_at(self) -> float | None:
        return self.published[-1][0] if self.published else None

    @property
    def records_done(self) -> int:
        return sum(s.count for s in self.done)

    @property
    def pace_parts(self) -> int:
        """How many parts the pace is read from: the last PACE_PARTS, after the one before them."""
        return min(len(self.published) - 1, PACE_PARTS) if self.published else 0

    @property
    def records_per_s(self) -> float | None:
        """The recent pace: the records of the last `pace_parts` parts over the time since the part before them
        (None below two parts, or parts written in the same instant)."""
        recent = self.published[-(self.pace_parts + 1) :]
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return None
        return sum(records for _, records in recent[1:]) / (recent[-1][0] - recent[0][0])

    @property
    def eta_s(self) -> float | None:
        """Seconds until the pending records are answered at the recent pace (None when finished or unknown)."""
        pace = self.records_per_s
        if self.manifest is not None or not pace:
            return None
        return sum(s.count for s in self.pending) / pace

    def as_dict(self) -> dict[str, Any]:
        plan = self.plan
        last = self.last_part_at
        return {
            "output": self.output,
            "job_id": plan.job_id,
            "state": "finished" if self.manifest else "running or stopped",
            "model": plan.model.as_dict(),
            "input": plan.input,
            "retry_of": plan.retry_of,
            "files": len(plan.files),
            "records": plan.records,
            "settings": plan.settings,
            "shards": len(plan.shards),
            "shards_done": len(self.done),
            "records_done": self.records_done,
            "rejects_done": self.rejects,
            "rejects_by_reason": self.rejects_by_reason,
            "pending_shards": [s.name for s in self.pending],
            "finished_at": self.manifest.get("finished_at") if self.manifest else None,
            "score": self.manifest.get("score") if self.manifest else None,
            "last_part_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)) if last is not None else None,
            "records_per_s": self.records_per_s,
            "eta_s": self.eta_s,
        }


def saved_plan(output: JobOutput, context: str = "") -> JobPlan:
    """The plan of the job in `output`.

    Raises:
        UserInputError: the folder holds no job (no `_job/job.json`); the message starts with `context`.
    """
    saved = output.read_text(JOB_FILE)
    if saved is None:
        raise UserInputError(
            f"{context}{output.uri} holds no batch inference job (no {JOB_FILE}): give the --output of a "
            "`vlmops batch-infer` command or a batch-inference flow run"
        )
    return JobPlan.from_json(saved)


def job_status(output: JobOutput) -> JobStatus:
    """The job in `output`: its plan, the shards whose part is there and the rejects in them.

    Raises:
        UserInputError: the folder holds no job (no `_job/job.json`).
    """
    plan = saved_plan(output)
    manifest = read_manifest(plan, output)
    parts = output.modified(PART_PREFIX)
    done = [s for s in plan.shards if part_name(s) in parts]
    pending = [s for s in plan.shards if part_name(s) not in parts]
    published = sorted((parts[part_name(s)], s.count) for s in done)
    if manifest is not None and "rejects_by_reason" in manifest:
        rejects, by_reason = int(manifest["rejects"]), manifest["rejects_by_reason"]
    else:  # each done shard's rejects file, a read each (a GET on S3: in threads)
        tally = RejectTally()
        with ThreadPoolExecutor(HOST_THREADS) as pool:
            for text in pool.map(lambda s: output.read_text(f"{SHARD_REJECTS}{s.name}.jsonl") or "", done):
                tally.add(jsonl_lines(text))
        by_reason = tally.by_reason()
        rejects = sum(n["count"] for n in by_reason.values())
    return JobStatus(output.uri, plan, done, pending, rejects, manifest, by_reason, published)


def iter_results(output: JobOutput) -> Iterator[dict[str, Any]]:
    """Every result of a finished job, in input order (parts in manifest order)."""
    text = output.read_text(MANIFEST_FILE)
    if text is None:
        raise FileNotFoundError(f"{output.uri} has no {MANIFEST_FILE}: the job is not finished")
    for part in json.loads(text)["parts"]:
        for line in jsonl_lines(output.read_text(part["name"]) or ""):
            yield json.loads(line)


def write_eval_predictions(output: JobOutput, path: Path) -> int:
    """The job's results as the predictions file `vlmops.evaluate` scores (index, source, reference, prediction).

    Raises:
        RunFailed: a result has no reference (the input records did not end with an assistant turn).
    """
    count = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for index, record in enumerate(iter_results(output)):
            if "reference" not in record:
                raise RunFailed(
                    f"{record['source']}: no reference answer to score (end the record with an assistant turn)"
                )
            row = {
                "index": index,
                "source": record["source"],
                "reference": record["reference"],
                "prediction": record["response"],
                "generated_tokens": record["generated_tokens"],
                "finish_reason": record["finish_reason"],
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count
