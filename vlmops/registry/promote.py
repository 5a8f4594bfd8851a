"""Champion/challenger promotion: both answer the same evaluation set; `champion` moves only past the gate.

    challenger  models:/NAME@challenger (the newest registered version), or a version the user names
    champion    models:/NAME@champion, if any: with none, the challenger is promoted whatever its score
    gate        challenger's score - champion's score >= registry.promotion.min_margin (metric: accuracy)

The decision is an MLflow run (its metrics table, the decision and the per-record samples as artifacts) and
tags on both versions (`promotion.*`); the Prefect flow adds its artifacts. Who answers the evaluation set
(the batch inference job) is the caller's business: this module finds the contenders, decides and records.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmops.config import PipelineConfig
from vlmops.errors import RunFailed, UserInputError
from vlmops.evaluate.metrics import EvalResult
from vlmops.evaluate.report import compare
from vlmops.infer.resolve import registered_version
from vlmops.registry.lineage import dataset_snapshot
from vlmops.tracking import Tracker, mlflow_links, resolve_tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"
EVAL_SPLIT = "eval.jsonl"


@dataclass(frozen=True)
class Contender:
    """One registered version in the contest."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        """The version pinned by number: an alias may move while the contest runs."""
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class Contest:
    challenger: Contender
    champion: Contender | None

    @property
    def settled(self) -> bool:
        """The challenger is the champion already: nothing to compare."""
        return self.champion is not None and self.champion.version == self.challenger.version


def find_contest(config: PipelineConfig, challenger: str | None = None) -> Contest:
    """The challenger (`challenger`: a version number, a `models:/` URI, or None for the config's alias) and
    the current champion of the same registered model.

    Raises:
        ValueError: an unknown model, version or alias.
    """
    name = config.registry.model_name
    ref = challenger or f"models:/{name}@{config.registry.alias}"
    if ref.isdigit():
        ref = f"models:/{name}/{ref}"
    found = registered_version(ref, resolve_tracking_uri(config.tracking.uri))
    contender = _contender(found.name, found.version)
    champion_version = found.client.get_registered_model(found.name).aliases.get(CHAMPION)
    champion = None
    if champion_version is not None:
        champion = _contender(found.name, found.client.get_model_version(found.name, str(champion_version)))
    return Contest(contender, champion)


def _contender(name: str, version: Any) -> Contender:
    return Contender(name, str(version.version), str(version.run_id or ""), dict(version.tags))


def evaluation_set(config: PipelineConfig, contest: Contest, work_dir: Path) -> Path:
    """The file both answer: `registry.promotion.eval_file`, else the eval split of the challenger's dataset
    snapshot (restored from the DVC remote when this machine does not have it).

    Raises:
        FileNotFoundError: the configured file does not exist.
        UserInputError: no evaluation set can be found for the challenger.
    """
    configured = config.registry.promotion.eval_file
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"registry.promotion.eval_file: {path} does not exist")
        return path
    eval_file = dataset_snapshot(contest.challenger.tags, config, work_dir) / EVAL_SPLIT
    if not eval_file.is_file():
        raise UserInputError(f"the challenger's dataset snapshot has no {EVAL_SPLIT}: set registry.promotion.eval_file")
    return eval_file


@dataclass
class Decision:
    """What the gate said, with the numbers it said it on."""

    name: str
    challenger: str
    champion: str | None
    metric: str
    min_margin: float
    eval_file: str
    total: int
    challenger_score: float
    champion_score: float | None
    promoted: bool
    reason: str
    counts: dict[str, int] = field(default_factory=dict)
    """Per-record agreement when there is a champion: fixed (challenger right, champion wrong), broken, ..."""

    @property
    def margin(self) -> float | None:
        return None if self.champion_score is None else self.challenger_score - self.champion_score

    @property
    def outcome(self) -> str:
        return "promoted" if self.promoted else "rejected"

    def metrics(self) -> dict[str, float]:
        """The numbers for MLflow."""
        numbers: dict[str, float] = {
            f"challenger_{self.metric}": self.challenger_score,
            "promoted": float(self.promoted),
            "total": self.total,
        }
        if self.champion_score is not None and self.margin is not None:
            numbers[f"champion_{self.metric}"] = self.champion_score
            numbers["margin"] = self.margin
        return numbers | {k: float(v) for k, v in self.counts.items()}

    def table(self) -> list[dict[str, Any]]:
        """The metrics table: one row per version."""
        rows = [{"role": "challenger", "version": self.challenger, self.metric: round(self.challenger_score, 4)}]
        if self.champion is not None and self.champion_score is not None:
            rows.append({"role": "champion", "version": self.champion, self.metric: round(self.champion_score, 4)})
        return rows

    def markdown(self, run_link: str) -> str:
        """A summary for people (the Prefect artifact, the MLflow run's promotion.md)."""
        lines = [
            f"# Promotion of {self.name} version {self.challenger}: **{self.outcome}**",
            "",
            self.reason,
            "",
            f"| role | version | {self.metric} |",
            "| --- | --- | --- |",
            *[f"| {r['role']} | {r['version']} | {r[self.metric]:.4f} |" for r in self.table()],
            "",
            f"Gate: challenger - champion >= {self.min_margin} on {self.total} records of `{self.eval_file}`.",
        ]
        if self.counts:
            lines.append("Per record: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()) + ".")
        lines += ["", f"MLflow run: {run_link}"]
        return "\n".join(lines) + "\n"


def decide(
    contest: Contest,
    challenger: EvalResult,
    champion: EvalResult | None,
    config: PipelineConfig,
    eval_file: Path,
) -> Decision:
    """Apply the gate to the two results (over the same records).

    Raises:
        ValueError: the two results are not over the same records.
    """
    gate = config.registry.promotion
    base = Decision(
        name=contest.challenger.name,
        challenger=contest.challenger.version,
        champion=contest.champion.version if contest.champion else None,
        metric=gate.metric,
        min_margin=gate.min_margin,
        eval_file=str(eval_file),
        total=challenger.total,
        challenger_score=challenger.accuracy,
        champion_score=None,
        promoted=True,
        reason=f"No {CHAMPION} yet: version {contest.challenger.version} becomes the first.",
    )
    if contest.champion is None or champion is None:
        return base
    numbers = compare(champion, challenger)  # raises unless both answered the same records
    margin = challenger.accuracy - champion.accuracy
    # A tiny epsilon: 0.75 - 0.70 is 0.04999..., which must pass a 0.05 gate.
    passed = margin >= gate.min_margin - 1e-9
    verb = "beats" if passed else "does not beat"
    base.champion_score = champion.accuracy
    base.promoted = passed
    base.reason = (
        f"Version {contest.challenger.version} ({gate.metric} {challenger.accuracy:.4f}) {verb} {CHAMPION} version "
        f"{contest.champion.version} ({champion.accuracy:.4f}) by the required {gate.min_margin}: margin {margin:+.4f}."
    )
    base.counts = {k: int(numbers[k]) for k in ("fixed", "broken", "both_correct", "both_wrong")}
    return base


def record_decision(
    tracker: Tracker,
    decision: Decision,
    contest: Contest,
    *,
    tags: dict[str, str] | None = None,
    samples: list[dict[str, Any]] | None = None,
) -> str:
    """The decision as an MLflow run, `promotion.*` tags on both versions, and `champion` moved if it passed.

    Returns the MLflow run id. The alias moves last, inside the run: a failure leaves the run FAILED and the
    old champion in place. It moves only away from the champion the challenger was compared with (RunFailed when
    another promotion moved it meanwhile).
    """
    with tracker.run(
        f"promote-{decision.name}-v{decision.challenger}", tags={**(tags or {}), "promotion": decision.outcome}
    ) as run_id:
        tracker.log_params(
            run_id,
            {
                "model_name": decision.name,
                "challenger": decision.challenger,
                "champion": decision.champion or "none",
                "metric": decision.metric,
                "min_margin": decision.min_margin,
                "eval_file": decision.eval_file,
            },
        )
        tracker.log_metrics(run_id, decision.metrics())
        tracker.log_text(run_id, json.dumps(asdict(decision), indent=2) + "\n", "promotion/decision.json")
        tracker.log_text(run_id, json.dumps(decision.table(), indent=2) + "\n", "promotion/metrics_table.json")
        if samples:
            tracker.log_text(run_id, json.dumps(samples, indent=2) + "\n", "promotion/samples.json")
        link = mlflow_links(tracker.uri, tracker.experiment_id, run_id).run
        tracker.log_text(run_id, decision.markdown(link), "promotion/promotion.md")
        if decision.promoted:
            _refuse_a_moved_champion(tracker, decision)
        common = {"promotion.run_id": run_id, "promotion.metric": decision.metric}
        tracker.set_version_tags(
            decision.name,
            decision.challenger,
            {
                **common,
                "promotion.role": "challenger",
                "promotion.decision": decision.outcome,
                "promotion.against": decision.champion or "none",
                f"promotion.{decision.metric}": f"{decision.challenger_score:.4f}",
            },
        )
        if contest.champion is not None and decision.champion_score is not None:
            tracker.set_version_tags(
                decision.name,
                contest.champion.version,
                {
                    **common,
                    "promotion.role": CHAMPION,
                    "promotion.decision": "replaced" if decision.promoted else "kept",
                    "promotion.against": decision.challenger,
                    f"promotion.{decision.metric}": f"{decision.champion_score:.4f}",
                },
            )
        if decision.promoted:
            tracker.client.set_registered_model_alias(decision.name, CHAMPION, decision.challenger)
            log.info("%s version %s is now @%s", decision.name, decision.challenger, CHAMPION)
        else:
            log.info("%s version %s stays @%s: %s", decision.name, decision.champion, CHAMPION, decision.reason)
    return run_id


def _refuse_a_moved_champion(tracker: Tracker, decision: Decision) -> None:
    """Raise RunFailed when `champion` no longer names the version the challenger was compared with: another
    promotion moved it meanwhile (MLflow has no compare-and-set), and replacing that one would skip the gate."""
    current = tracker.client.get_registered_model(decision.name).aliases.get(CHAMPION)
    current = None if current is None else str(current)
    if current != decision.champion:
        raise RunFailed(
            f"@{CHAMPION} of {decision.name} moved to version {current} while version {decision.challenger} was "
            f"compared with {f'version {decision.champion}' if decision.champion else 'no champion'} (another "
            f"promotion ran meanwhile), so it was left there; run `vlmops promote --challenger "
            f"{decision.challenger}` again to compare with the new {CHAMPION}"
        )
