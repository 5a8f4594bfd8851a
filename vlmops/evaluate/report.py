"""Base versus fine-tuned: the numbers and a bar chart, for the console, metrics files and MLflow."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlmops.evaluate.metrics import EvalResult


def compare(base: EvalResult, tuned: EvalResult) -> dict[str, float]:
    """Accuracy of both, the gain, and how many records the fine-tuning fixed or broke.

    Every value is a number, so the dict can go to MLflow as metrics as it is.

    Raises:
        ValueError: the two results are not over the same records (different indices).
    """
    base_by_index = {s.index: s for s in base.per_record}
    tuned_by_index = {s.index: s for s in tuned.per_record}
    if base_by_index.keys() != tuned_by_index.keys():
        only_base = sorted(base_by_index.keys() - tuned_by_index.keys())[:5]
        only_tuned = sorted(tuned_by_index.keys() - base_by_index.keys())[:5]
        raise ValueError(
            f"base ({base.predictions}) and fine-tuned ({tuned.predictions}) predictions are not over the "
            f"same records (only in base: {only_base}, only in fine-tuned: {only_tuned}); "
            "predict the same eval file with both"
        )
    pairs = [(base_by_index[i].correct, tuned_by_index[i].correct) for i in sorted(base_by_index)]
    return {
        "total": tuned.total,
        "base_accuracy": base.accuracy,
        "finetuned_accuracy": tuned.accuracy,
        "gain": tuned.accuracy - base.accuracy,
        "fixed": sum(1 for b, t in pairs if not b and t),
        "broken": sum(1 for b, t in pairs if b and not t),
        "both_correct": sum(1 for b, t in pairs if b and t),
        "both_wrong": sum(1 for b, t in pairs if not b and not t),
    }


def plot_comparison(
    base: EvalResult, tuned: EvalResult, out_png: str | os.PathLike[str], title: str | None = None
) -> Path:
    """A PNG bar chart of base and fine-tuned accuracy, each bar labelled with correct/total."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt

    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 3.2), dpi=120)
    try:
        bars = ax.bar(["base", "fine-tuned"], [base.accuracy, tuned.accuracy], color=["#9aa5b1", "#2f6fdf"])
        for bar, result in zip(bars, (base, tuned)):
            ax.annotate(
                f"{result.accuracy:.1%}\n({result.correct}/{result.total})",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        ax.set_ylim(0, 1.15)
        ax.set_ylabel(f"accuracy ({tuned.metric})")
        ax.set_title(title or f"eval split, {tuned.total} records", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def write_comparison(base: EvalResult, tuned: EvalResult, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """`comparison.json` and `comparison.png` in `out_dir`; returns both paths."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    numbers = folder / "comparison.json"
    numbers.write_text(json.dumps(compare(base, tuned), indent=2) + "\n")
    return numbers, plot_comparison(base, tuned, folder / "comparison.png")
