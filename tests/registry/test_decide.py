"""The promotion gate and the eval-samples table on hand-made results (no model, no registry)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmops.config import load_config
from vlmops.evaluate.metrics import EvalResult, RecordScore
from vlmops.evaluate.samples import sample_rows
from vlmops.registry.promote import Contender, Contest, decide
from vlmops.tracking import mlflow_links

CONTEST = Contest(Contender("m", "3", "run3"), Contender("m", "2", "run2"))


def result(right: list[bool], file: str = "eval.jsonl") -> EvalResult:
    scores = [RecordScore(i, f"{file}:{i + 1}", "red", "red" if ok else "blue", ok) for i, ok in enumerate(right)]
    return EvalResult(sum(right) / len(right), sum(right), len(right), scores)


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "promoted"),
    [
        ([True] * 15 + [False] * 5, [True] * 14 + [False] * 6, 0.05, True),  # 0.75 - 0.70: exactly the margin
        ([True] * 15 + [False] * 5, [True] * 14 + [False] * 6, 0.06, False),
        ([True] * 10, [True] * 10, 0.0, True),  # as good passes a zero margin
        ([False] * 10, [True] * 10, 0.0, False),
    ],
)
def test_gate(challenger: list[bool], champion: list[bool], margin: float, promoted: bool) -> None:
    config = load_config(None, [f"registry.promotion.min_margin={margin}"])
    decision = decide(CONTEST, result(challenger), result(champion), config, Path("eval.jsonl"))
    assert decision.promoted is promoted
    assert decision.outcome == ("promoted" if promoted else "rejected")
    assert decision.metrics()["margin"] == pytest.approx(decision.challenger_score - decision.champion_score)
    assert [row["role"] for row in decision.table()] == ["challenger", "champion"]
    assert f"**{decision.outcome}**" in decision.markdown("http://ui/run")


def test_first_version_needs_no_champion() -> None:
    decision = decide(Contest(CONTEST.challenger, None), result([False]), None, load_config(None), Path("e.jsonl"))
    assert decision.promoted and decision.champion is None and decision.margin is None
    assert "margin" not in decision.metrics() and decision.counts == {}


def test_results_over_other_records_are_refused() -> None:
    other = result([True, True, True])
    with pytest.raises(ValueError, match="not over the same records"):
        decide(CONTEST, result([True, False]), other, load_config(None), Path("e.jsonl"))


def test_min_margin_is_a_share() -> None:
    with pytest.raises(ValueError, match=r"registry\.promotion\.min_margin"):
        load_config(None, ["registry.promotion.min_margin=2"])


def test_sample_rows_match_records_by_position(tmp_path: Path) -> None:
    eval_file = tmp_path / "eval.jsonl"
    records = [
        {
            "conversations": [
                {"from": "user", "value": f"<img>images/{c}.png</img>Colour?"},
                {"from": "assistant", "value": "red"},
            ]
        }
        for c in ("a", "b")
    ]
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = sample_rows(eval_file, {"new": result([True, False], str(eval_file)), "old": result([False, False])})
    assert rows == [
        {
            "image": "a.png",
            "prompt": "Colour?",
            "reference": "red",
            "new": "red",
            "new correct": True,
            "old": "blue",
            "old correct": False,
        },
        {
            "image": "b.png",
            "prompt": "Colour?",
            "reference": "red",
            "new": "blue",
            "new correct": False,
            "old": "blue",
            "old correct": False,
        },
    ]
    assert len(sample_rows(eval_file, {"new": result([True, False])}, limit=1)) == 1
    with pytest.raises(ValueError, match="is not a record of"):
        sample_rows(eval_file, {"new": result([True, True, True])})


def test_sample_rows_read_images_where_the_batch_job_may(tmp_path: Path) -> None:
    """An evaluation set whose images lie in data.allowed_roots (a shared mount): the batch job answered it, so its
    samples table must read it too (it said 'not a record of' the file, after both versions had answered)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    eval_file = tmp_path / "evalset" / "eval.jsonl"
    eval_file.parent.mkdir()
    record = {
        "conversations": [
            {"from": "user", "value": f"<img>{shared / 'a.png'}</img>Colour?"},
            {"from": "assistant", "value": "red"},
        ]
    }
    eval_file.write_text(json.dumps(record) + "\n")
    results = {"challenger": result([True], str(eval_file))}
    rows = sample_rows(eval_file, results, allowed_roots=[str(shared)])
    assert [(row["image"], row["challenger correct"]) for row in rows] == [("a.png", True)]
    with pytest.raises(ValueError, match="data.allowed_roots"):  # outside them: refused, saying why
        sample_rows(eval_file, results)


def test_mlflow_links() -> None:
    served = mlflow_links("http://mlflow:5000/", "7", "abc", "m", "3")
    assert served.run == "http://mlflow:5000/#/experiments/7/runs/abc"
    assert served.model_version == "http://mlflow:5000/#/models/m/versions/3"
    assert mlflow_links("sqlite:////x/mlflow.db", "1", "abc").run.startswith("http://127.0.0.1:5000/#/")


def test_mlflow_links_carry_no_credentials_of_the_tracking_uri() -> None:
    """A team's tracking URI with its login in it (http://user:password@host): the links went as they were into the
    promotion's promotion.md (an MLflow artifact) and the flows' Prefect artifacts, password and all."""
    links = mlflow_links("https://ann:s3cret-pw@mlflow.example:5443/base/?token=tok123", "7", "abc", "m", "3")
    assert links.run == "https://mlflow.example:5443/base/#/experiments/7/runs/abc"
    assert links.model_version == "https://mlflow.example:5443/base/#/models/m/versions/3"


def test_new_versions_cannot_be_registered_as_champion() -> None:
    # The registering run would point champion at every new version, past the gate.
    with pytest.raises(
        ValueError, match=r"override registry\.alias=champion: .*champion is the alias the promotion gate moves"
    ):
        load_config(None, ["registry.alias=champion"])
