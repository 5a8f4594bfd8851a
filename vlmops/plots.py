"""PNG charts logged beside the numbers: token lengths, the training loss curve and a batch-inference job's speed
per shard (the accuracy chart lives with the evaluation, in vlmops.evaluate.report)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _saved(plt: Any, fig: Any, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def length_histogram(lengths: dict[str, list[int]], out: Path) -> Path:
    """Token lengths per split (image tokens included)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for split, values in lengths.items():
        if values:
            ax.hist(values, bins=30, alpha=0.6, label=f"{split} ({len(values)})")
    ax.set_xlabel("tokens per sample (image tokens included)")
    ax.set_ylabel("samples")
    ax.legend()
    return _saved(plt, fig, out)


def loss_curve(train: list[tuple[int, float]], evals: list[tuple[int, float]], out: Path) -> Path:
    """Training loss per step, with the eval loss where it was measured."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _saved(plt, fig, out)


def shard_throughput(shards: Sequence[tuple[str, int, float]], job_rate: float, out: Path) -> Path:
    """A batch-inference job's records/s per shard, in the order the shards finished: (worker, records, seconds)
    each, the x axis the records done so far, one colour per worker, the job's rate (`job_rate`, all workers) dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    done = 0
    points: dict[str, tuple[list[int], list[float]]] = {}
    for worker, records, seconds in shards:
        done += records
        xs, ys = points.setdefault(worker or "this process", ([], []))
        xs.append(done)
        ys.append(records / seconds if seconds > 0 else 0.0)
    for worker, (xs, ys) in points.items():
        ax.plot(xs, ys, "o-", markersize=3, linewidth=1, label=worker if len(points) > 1 else None)
    if job_rate > 0:
        ax.axhline(job_rate, linestyle="--", color="grey", linewidth=1, label=f"job: {job_rate:.1f}")
    ax.set_xlabel("records done (shards in the order they finished)")
    ax.set_ylabel("records/s of the shard")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return _saved(plt, fig, out)
