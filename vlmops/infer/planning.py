"""Planning a batch inference job: the model resolved and hashed once, the inputs read once (hashed, counted, cut into
shards, their prompts' tokens counted), the records an earlier job rejected chosen to answer again
(`infer.retry_rejects`), and the checks that refuse a job before its model loads.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from vlmops.config import InferConfig, PipelineConfig
from vlmops.data.problems import RecordError
from vlmops.errors import UserInputError
from vlmops.folders import files_under
from vlmops.hashing import FolderHashes
from vlmops.infer.engine import refuse_context_without_room
from vlmops.infer.input_overlap import refuse_other_jobs
from vlmops.infer.inputs import find_inputs
from vlmops.infer.job_output import REJECTS_FILE, jsonl_lines, read_manifest, saved_plan
from vlmops.infer.job_plan import JobPlan, ModelInfo, job_settings
from vlmops.infer.output import open_output
from vlmops.infer.records import parse_prompt
from vlmops.infer.resolve import (
    REGISTRY_MANIFEST,
    ModelSource,
    catalog_resolver,
    check_pinned_from,
    model_source,
)
from vlmops.infer.shards import InputFile, PromptMeasure, RawRecord, Shard, scan_input
from vlmops.models.template import encode
from vlmops.plural import counted
from vlmops.storage import is_partial

log = logging.getLogger(__name__)


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

    Raises:
        UserInputError: a file of the folder is a broken link or no file (a named pipe).
    """
    hashes = FolderHashes(folder, cache_dir)
    digest = hashlib.sha256()
    for path in files_under(hashes.folder, reads=lambda p: p.name != REGISTRY_MANIFEST and not is_partial(p)):
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
