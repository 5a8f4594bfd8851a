"""A batch inference job's output: the files it writes, and how it is started, finished and read back.

    OUT/part-00000.jsonl ...  results, a part per shard, records in input order
    OUT/rejects.jsonl         every record that could not be answered, with its file, line and reason
    OUT/manifest.json         written last: the parts with their record counts and hashes, model, input, settings
    OUT/_job/job.json         the job's identity and its shards (written first)
    OUT/_job/rejects-N.jsonl  each shard's rejects (gathered into rejects.jsonl at the end)

A shard is done when its part exists: the shard's rejects are published first, its part last (each written aside and
renamed, or one PUT on S3). A rerun of the same job does only the shards whose part is missing; a rerun after the
manifest is written does nothing. An output folder holding another job is refused, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from vlmops.answers import Score
from vlmops.errors import RunFailed, UserInputError
from vlmops.infer.job_plan import SETTING_KEYS, JobPlan
from vlmops.infer.output import JOB_FILE, JobOutput, written_file
from vlmops.infer.shards import InputFile, Shard
from vlmops.plural import counted
from vlmops.scratch import said

log = logging.getLogger(__name__)

SHARD_REJECTS = "_job/rejects-"
PART_PREFIX = "part-"
REJECTS_FILE = "rejects.jsonl"
MANIFEST_FILE = "manifest.json"


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


def open_job(plan: JobPlan, output: JobOutput) -> JobPlan:
    """Start the job in `output`, or pick it up again (with `plan`'s prompt counts where the saved plan has none);
    refuse an output that holds anything else. The temporary files that runs killed mid-write left are removed
    (`JobOutput.sweep`: none that a run going on now writes), and for an S3 output the scratch folders that
    processes killed outright left on this machine.

    Raises:
        JobMismatchError: the output holds another job, or files that no job of this kind wrote.
    """
    old = saved_job(plan, output)
    if old is None:
        _sweep(output)  # a first run stopped while it wrote the job file
        with written_file(output, JOB_FILE) as path:
            path.write_text(plan.to_json() + "\n", encoding="utf-8")
        return plan
    _sweep(output)
    if old.longest_prompt is None and plan.longest_prompt is not None:
        # Planned before without the prompts' counts (with infer.engine plain then, or by an older vlmops): the same
        # files (the same job), now counted. Saved, so that workers reading the plan size their slots the same way.
        old = replace(old, files=plan.files)
        with written_file(output, JOB_FILE) as path:
            path.write_text(old.to_json() + "\n", encoding="utf-8")
    return old


def saved_job(plan: JobPlan, output: JobOutput) -> JobPlan | None:
    """The job saved in `output`, which must be `plan`'s job; None where the output holds none yet. Reads only: a run
    refused here has written nothing (`open_job` writes).

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
        return None
    old = JobPlan.from_json(saved)
    if old.job_id != plan.job_id:
        raise JobMismatchError(
            f"output {output.uri} holds job {old.job_id}, not this job {plan.job_id} "
            f"({_difference(old, plan)}); a different model, input or settings is a different job: pass another "
            f"--output, or delete {output.uri} to start over"
        )
    return old


def _sweep(output: JobOutput) -> None:
    swept = output.sweep()
    if swept.removed:
        log.info("%s", said(swept.removed, swept.noun, swept.where))


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
