"""A finished batch job in words: the rows `vlmops batch-infer` prints and the batch-inference flow publishes as its
summary artifact, and the phrases `vlmops batch-status` shares with them."""

from __future__ import annotations

from typing import Any

from vlmops.infer.job import JobResult


def summary_rows(result: JobResult) -> list[tuple[str, str]]:
    """(label, text) rows: the model, the records, the answers and their score, this run's speed, where it all is."""
    manifest = result.manifest
    model = manifest["model"]
    version = f"version {model['version']}, " if model.get("version") else ""
    rows = [
        ("model", f"{model['uri']} ({version}{model['content_hash'][:19]})"),
        ("records", f"{result.records} read: {result.results} answered, {result.rejects} rejected"),
        ("generated tokens", str(manifest["generated_tokens"])),
        ("answers", token_choice(manifest["settings"])),
    ]
    if score := result.score:
        rows.append(("exact match", score_text(score)))
    if result.ran:
        workers = len({s.worker for s in result.ran})
        side_by_side = f" on {workers} workers" if workers > 1 else ""
        rows.append(
            (
                "this run",
                f"{len(result.ran)} shard(s){side_by_side} in {result.seconds:.1f} s: {result.tokens_per_s:.1f} "
                f"tokens/s, {result.images_per_s:.1f} images/s",
            )
        )
    if result.startup_s is not None:
        rows.append(
            (
                "start-up",
                f"{result.startup_s:.1f} s before the first shard (resolve, hash and load the model, build the engine; "
                "on a GPU the first shard also compiles and captures)",
            )
        )
    rows.append(("output", f"{result.output}/part-*.jsonl ({len(manifest['parts'])} parts), manifest.json"))
    if result.rejects:
        rows.append(("rejects", f"{result.output}/rejects.jsonl"))
    if result.mlflow_run_id:
        rows.append(("MLflow run", result.mlflow_run_id))
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
        f"{score['correct']} of {score['scored']} answers equal the record's reference answer "
        f"({100 * score['accuracy']:.1f}%; case, spacing and final punctuation aside)"
    )
