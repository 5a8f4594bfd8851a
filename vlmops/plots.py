"""PNG charts logged beside the numbers: token lengths and the training loss curve (the accuracy chart
lives with the evaluation, in vlmops.evaluate.report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


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
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
