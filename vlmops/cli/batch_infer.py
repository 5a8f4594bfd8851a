"""`vlmops batch-infer`: a batch inference job (streamed, sharded, resumable, exactly once); prints a summary."""

from __future__ import annotations

import argparse
from typing import Any

from vlmops.cli.args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch-infer",
        help="answer every record of jsonl/json files (or an s3:// prefix) with a model into part files",
        description="Rerun the same command to finish an interrupted job; a finished job is not redone.",
    )
    p.add_argument(
        "--model",
        "-m",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, run or checkpoint folder, catalog name",
    )
    p.add_argument(
        "--input", "-i", required=True, help="a .jsonl/.json file, a folder or glob of them, or an s3:// prefix"
    )
    p.add_argument(
        "--output", "-o", required=True, help="a folder or an s3:// prefix (part-*.jsonl, rejects.jsonl, manifest.json)"
    )
    add_config_args(p, default=None)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.config import load_config
    from vlmops.infer.batch_job import run_batch_job

    config = load_config(args.config, args.overrides)
    result = run_batch_job(args.model, args.input, args.output, config)
    manifest = result.manifest
    state = (
        "done" if result.ran else "finished before, nothing to do" if result.records else "the input holds no records"
    )
    print(f"batch inference job {manifest['job_id']}: {state}")
    print(f"  model             {manifest['model']['uri']} ({manifest['model']['content_hash'][:19]})")
    print(f"  records           {result.records} read: {result.results} answered, {result.rejects} rejected")
    print(f"  generated tokens  {manifest['generated_tokens']}")
    print(f"  answers           {token_choice(manifest['settings'])}")
    if score := result.score:
        print(f"  exact match       {score_text(score)}")
    if result.ran:
        workers = len({s.worker for s in result.ran})
        side_by_side = f" on {workers} workers" if workers > 1 else ""
        print(
            f"  this run          {len(result.ran)} shard(s){side_by_side} in {result.seconds:.1f} s: "
            f"{result.tokens_per_s:.1f} tokens/s, {result.images_per_s:.1f} images/s"
        )
    if result.startup_s is not None:
        print(
            f"  start-up          {result.startup_s:.1f} s before the first shard (resolve, hash and load the model, "
            "build the engine; on a GPU the first shard also compiles and captures)"
        )
    print(f"  output            {result.output}/part-*.jsonl ({len(manifest['parts'])} parts), manifest.json")
    if result.rejects:
        print(f"  rejects           {result.output}/rejects.jsonl")
    if result.mlflow_run_id:
        print(f"  MLflow run        {result.mlflow_run_id}")
    return 0


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
