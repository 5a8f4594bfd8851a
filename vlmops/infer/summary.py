"""A batch job in words: the rows `vlmops batch-infer` prints and the batch-inference flow publishes as its
summary artifact, the phrases `vlmops batch-status` shares with them, and its first answers as a table to read."""

from __future__ import annotations

import itertools
from pathlib import PurePath
from typing import Any

from vlmops.answers import exact_match
from vlmops.infer.job_output import REJECT_KINDS, iter_results
from vlmops.infer.job_status import (
    JobResult,
    ShardStats,
    StoppedJob,
    shards_rates,
    shards_wall_s,
)
from vlmops.infer.output import JobOutput
from vlmops.infer.records import ADDED_FIELDS, parse_prompt
from vlmops.infer.shards import RawRecord
from vlmops.plural import counted, counted_of

SHOWN_REASONS = 3
"""Reject kinds a summary names, most first; the rest are counted in one more row (one kind more is named instead:
the row is spent either way)."""
SAMPLE_ROWS = 50
"""Results in a samples table: enough to see what the answers look like, small enough for a UI page."""


def summary_rows(result: JobResult) -> list[tuple[str, str]]:
    """(label, text) rows: the model, the records, the answers and their score, this run's speed, where it all is."""
    manifest = result.manifest
    rows = [
        _model_row(manifest["model"]),
        ("records", f"{result.records} read: {result.results} answered, {result.rejects} rejected"),
        *_retry_row(manifest["input"].get("retry_of")),
        ("generated tokens", str(manifest["generated_tokens"])),
        ("answers", token_choice(manifest["settings"])),
    ]
    if score := result.score:
        rows.append(("exact match", score_text(score)))
    rows += _run_rows(result.ran, result.startup_s)
    rows.append(("output", f"{result.output}/part-*.jsonl ({counted(len(manifest['parts']), 'part')}), manifest.json"))
    if result.rejects:
        rows.append(("rejects", f"{result.output}/rejects.jsonl"))
        rows += reason_rows(manifest.get("rejects_by_reason", {}))
    if result.mlflow_run_id:
        rows.append(("MLflow run", result.mlflow_run_id))
    return rows


def stopped_rows(stopped: StoppedJob) -> list[tuple[str, str]]:
    """(label, text) rows for a job `infer.max_shards` stopped: the model, what is done and to do, this run's speed,
    where the parts are and how to go on."""
    status = stopped.status
    plan = status.plan
    records_to_do = counted(sum(s.count for s in status.pending), "record")
    return [
        _model_row(plan.model.as_dict()),
        (
            "done",
            f"{counted_of(len(status.done), len(plan.shards), 'shard')}: {counted(status.records_done, 'record')}, "
            f"{status.records_done - status.rejects} answered, {status.rejects} rejected",
        ),
        ("to do", f"{counted(len(status.pending), 'shard')}: {records_to_do}"),
        *_retry_row(plan.retry_of),
        ("answers", token_choice(plan.settings)),
        *_run_rows(stopped.ran, stopped.startup_s),
        ("output", f"{status.output}/part-*.jsonl ({counted(len(status.done), 'part')} so far), no manifest.json yet"),
        ("go on", "run the same command without infer.max_shards (or with a larger one): done shards are not redone"),
    ]


def reason_rows(by_reason: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """A row per kind of reject (`rejects_by_reason`), most first, labelled with the kind: its count and the first such
    record, so the summary says why without opening rejects.jsonl; past SHOWN_REASONS kinds, the rest in one row."""
    kinds = list(by_reason.items())
    shown = kinds if len(kinds) <= SHOWN_REASONS + 1 else kinds[:SHOWN_REASONS]
    rows = [
        (REJECT_KINDS.get(kind, kind), f"{counted(n['count'], 'record')} (first: {n['first']})") for kind, n in shown
    ]
    rest = [n for _, n in kinds[len(shown) :]]
    if rest:
        records = counted(sum(n["count"] for n in rest), "record")
        rows.append(("other kinds", f"{records} of {counted(len(rest), 'kind')}, in rejects.jsonl"))
    return rows


def _model_row(model: dict[str, Any]) -> tuple[str, str]:
    """The model: its URI, registry version and content hash (`ModelInfo.as_dict`, as a manifest holds it)."""
    version = f"version {model['version']}, " if model.get("version") else ""
    return ("model", f"{model['uri']} ({version}{model['content_hash'][:19]})")


def _retry_row(retry_of: str | None) -> list[tuple[str, str]]:
    """Where the job answers another job's rejects (`infer.retry_rejects`): whose."""
    return [("retry of", f"the records {retry_of} rejected")] if retry_of else []


def _run_rows(ran: list[ShardStats], startup_s: float | None) -> list[tuple[str, str]]:
    """This run's speed over the shards it answered, and its start-up."""
    rows = []
    if ran:
        workers = len({s.worker for s in ran})
        side_by_side = f" on {workers} workers" if workers > 1 else ""
        tokens, images = shards_rates(ran)
        rows.append(
            (
                "this run",
                f"{counted(len(ran), 'shard')}{side_by_side} in {shards_wall_s(ran):.1f} s: {tokens:.1f} tokens/s, "
                f"{images:.1f} images/s",
            )
        )
    if startup_s is not None:
        rows.append(
            (
                "start-up",
                f"{startup_s:.1f} s before the first shard (resolve, hash and load the model, build the engine; "
                "on a GPU the first shard also compiles and captures)",
            )
        )
    return rows


def token_choice(settings: dict[str, Any]) -> str:
    """How the job's tokens were picked, from its settings: greedy, or sampled with what."""
    penalty = settings.get("repetition_penalty", 1.0)
    extra = f", repetition_penalty {penalty}" if penalty != 1.0 else ""
    if not settings.get("temperature"):
        return f"greedy{extra}"
    top_k = settings.get("top_k") or "off"
    return (
        f"sampled: temperature {settings['temperature']}, top_p {settings.get('top_p', 1.0)}, top_k {top_k}, "
        f"seed {settings.get('seed', 0)}{extra}"
    )


def score_text(score: dict[str, Any]) -> str:
    """A manifest's `score`: how many answers equal their record's reference answer."""
    return (
        f"{counted_of(score['correct'], score['scored'], 'answer')} equal to the record's reference answer "
        f"({100 * score['accuracy']:.1f}%; case, spacing and final punctuation aside)"
    )


def sample_rows(output: JobOutput, limit: int = SAMPLE_ROWS) -> list[dict[str, Any]]:
    """The first `limit` results of a finished job, a row each: its key, the images and question of the turn it
    answered, the answer and why it ended; where records had a reference answer, also the reference and whether the
    answer matches it (empty for a record without one)."""
    rows: list[dict[str, Any]] = []
    for record in itertools.islice(iter_results(output), limit):
        fields = {k: v for k, v in record.items() if k not in ADDED_FIELDS}
        source = str(record["source"])
        question = parse_prompt(RawRecord(source, source, 0, value=fields), ".").messages[-1]
        row: dict[str, Any] = {
            "key": str(record["key"]),
            "images": ", ".join(PurePath(image.uri).name for image in question.images),
            "question": question.text("").strip(),
            "answer": record["response"],
            "finish_reason": record["finish_reason"],
        }
        if "reference" in record:
            row["reference"] = record["reference"]
            row["exact match"] = exact_match(str(record["response"]), str(record["reference"]))
        rows.append(row)
    scored = ("reference", "exact match") if any("reference" in row for row in rows) else ()
    columns = ("key", "images", "question", "answer", "finish_reason", *scored)
    return [{column: row.get(column, "") for column in columns} for row in rows]  # one set of columns for the table
