"""Where a batch inference job stands, and what a run of it did.

What a run did: each shard's stats (`ShardStats`), a finished job (`JobResult`), or a job stopped by
`infer.max_shards` before its last shard (`StoppedJob`). Where a job stands, read from its output alone, with no
model and no input (`job_status`): what `vlmops batch-status` shows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlmops.infer.job_output import (
    PART_PREFIX,
    SHARD_REJECTS,
    RejectTally,
    jsonl_lines,
    part_name,
    pending_shards,
    read_manifest,
    saved_plan,
)
from vlmops.infer.job_plan import JobPlan
from vlmops.infer.output import JOB_FILE, JobOutput
from vlmops.infer.prefetch import HOST_THREADS
from vlmops.infer.shards import Shard
from vlmops.plural import counted_of

if TYPE_CHECKING:
    from vlmops.infer.job_lock import RunGoingOn


@dataclass
class ShardStats:
    """What one shard's run did."""

    shard: int
    results: int
    rejects: int
    generated_tokens: int
    images: int
    seconds: float
    worker: str = ""


def shards_wall_s(ran: Sequence[ShardStats]) -> float:
    """The wall time of shards run by workers side by side: the largest of the workers' sums."""
    per_worker: dict[str, float] = {}
    for stats in ran:
        per_worker[stats.worker] = per_worker.get(stats.worker, 0.0) + stats.seconds
    return max(per_worker.values(), default=0.0)


def shards_rates(ran: Sequence[ShardStats]) -> tuple[float, float]:
    """Generated tokens/s and images/s of shards over their wall time (`shards_wall_s`); 0 where it is 0."""
    seconds = shards_wall_s(ran)
    if not seconds:
        return 0.0, 0.0
    return sum(s.generated_tokens for s in ran) / seconds, sum(s.images for s in ran) / seconds


@dataclass
class JobResult:
    """A finished job: its manifest, and what this run did (shards it ran, their speed)."""

    output: str
    manifest: dict[str, Any]
    ran: list[ShardStats] = field(default_factory=list)
    mlflow_run_id: str | None = None
    startup_s: float | None = None
    """Seconds before the shards began in this process: resolve and hash the model, plan, load it, build the engine
    (None: nothing ran here, or the shards ran in worker processes)."""
    finished_before: bool = False
    """The manifest was there already: this command did nothing."""

    @property
    def records(self) -> int:
        return int(self.manifest["records_read"])

    @property
    def results(self) -> int:
        return int(self.manifest["results"])

    @property
    def rejects(self) -> int:
        return int(self.manifest["rejects"])

    @property
    def seconds(self) -> float:
        """How long the shards took: a worker's shards run one after another (each shard's seconds count from the
        end of its worker's previous one), workers side by side, so the busiest worker's sum."""
        return shards_wall_s(self.ran)

    @property
    def tokens_per_s(self) -> float:
        return shards_rates(self.ran)[0]

    @property
    def images_per_s(self) -> float:
        return shards_rates(self.ran)[1]

    def metrics(self) -> dict[str, float]:
        return {
            "records": self.records,
            "results": self.results,
            "rejects": self.rejects,
            **{f"rejects.{kind}": n["count"] for kind, n in self.manifest.get("rejects_by_reason", {}).items()},
            "generated_tokens": float(self.manifest["generated_tokens"]),
            "shards_run": len(self.ran),
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "images_per_s": self.images_per_s,
            **({"startup_seconds": self.startup_s} if self.startup_s is not None else {}),
            **({"scored": score["scored"], "exact_match": score["accuracy"]} if (score := self.score) else {}),
        }

    @property
    def score(self) -> dict[str, Any] | None:
        """Exact match of the answers against the records' reference answers (None: no record had one, or a
        manifest written before jobs scored)."""
        return self.manifest.get("score")


@dataclass
class StoppedJob:
    """A job stopped by `infer.max_shards` before its last shard: where it stands (read back from its output) and
    what this run did."""

    status: JobStatus
    ran: list[ShardStats]
    startup_s: float | None = None


PACE_PARTS = 10
"""`vlmops batch-status` reads a running job's pace from its last this many parts."""


@dataclass
class JobStatus:
    """Where a job in an output folder stands, read from the folder alone (no model, no input needed)."""

    output: str
    plan: JobPlan
    done: list[Shard]
    pending: list[Shard]
    rejects: int
    """Records rejected in the done shards."""
    manifest: dict[str, Any] | None
    """The manifest once the job is finished (every shard done and gathered), else None."""
    rejects_by_reason: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The done shards' rejects by kind (`rejects_by_reason`)."""
    published: list[tuple[float, int]] = field(default_factory=list)
    """(when, records) of each done shard's part, in the order they were written (seconds since the epoch)."""
    run: RunGoingOn | None = None
    """Whether a run of the job holds the output now, and who, where that was read (`job_status(who_runs=True)`)."""

    @property
    def state(self) -> str:
        """finished, running, stopped; `running or stopped` where the output's hold was not read or could not be."""
        if self.manifest:
            return "finished"
        if self.run is None or self.run.running is None:
            return "running or stopped"
        return "running" if self.run.running else "stopped"

    @property
    def last_part_at(self) -> float | None:
        return self.published[-1][0] if self.published else None

    @property
    def records_done(self) -> int:
        return sum(s.count for s in self.done)

    @property
    def pace_parts(self) -> int:
        """How many parts the pace is read from: the last PACE_PARTS, after the one before them."""
        return min(len(self.published) - 1, PACE_PARTS) if self.published else 0

    @property
    def records_per_s(self) -> float | None:
        """The recent pace: the records of the last `pace_parts` parts over the time since the part before them
        (None below two parts, or parts written in the same instant)."""
        recent = self.published[-(self.pace_parts + 1) :]
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return None
        return sum(records for _, records in recent[1:]) / (recent[-1][0] - recent[0][0])

    @property
    def eta_s(self) -> float | None:
        """Seconds until the pending records are answered at the recent pace (None when finished or unknown)."""
        pace = self.records_per_s
        if self.manifest is not None or not pace:
            return None
        return sum(s.count for s in self.pending) / pace

    def as_dict(self) -> dict[str, Any]:
        plan = self.plan
        last = self.last_part_at
        return {
            "output": self.output,
            "job_id": plan.job_id,
            "state": self.state,
            "run": self.run.as_dict() if self.run is not None and self.run.running else None,
            "model": plan.model.as_dict(),
            "input": plan.input,
            "retry_of": plan.retry_of,
            "files": len(plan.files),
            "records": plan.records,
            "settings": plan.settings,
            "shards": len(plan.shards),
            "shards_done": len(self.done),
            "records_done": self.records_done,
            "rejects_done": self.rejects,
            "rejects_by_reason": self.rejects_by_reason,
            "pending_shards": [s.name for s in self.pending],
            "finished_at": self.manifest.get("finished_at") if self.manifest else None,
            "score": self.manifest.get("score") if self.manifest else None,
            "last_part_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)) if last is not None else None,
            "records_per_s": self.records_per_s,
            "eta_s": self.eta_s,
        }


def job_status(output: JobOutput, who_runs: bool = False) -> JobStatus:
    """The job in `output`: its plan, the shards whose part is there and the rejects in them; with `who_runs`, whether
    a run of it holds the output now, and who (`job_lock.run_going_on`: not from the process that holds it).

    Raises:
        UserInputError: the folder holds no job (no `_job/job.json`).
    """
    plan = saved_plan(output)
    manifest = read_manifest(plan, output)
    parts = output.modified(PART_PREFIX)
    done = [s for s in plan.shards if part_name(s) in parts]
    pending = [s for s in plan.shards if part_name(s) not in parts]
    published = sorted((parts[part_name(s)], s.count) for s in done)
    if manifest is not None and "rejects_by_reason" in manifest:
        rejects, by_reason = int(manifest["rejects"]), manifest["rejects_by_reason"]
    else:  # each done shard's rejects file, a read each (a GET on S3: in threads)
        tally = RejectTally()
        with ThreadPoolExecutor(HOST_THREADS) as pool:
            for text in pool.map(lambda s: output.read_text(f"{SHARD_REJECTS}{s.name}.jsonl") or "", done):
                tally.add(jsonl_lines(text))
        by_reason = tally.by_reason()
        rejects = sum(n["count"] for n in by_reason.values())
    run = None
    if who_runs and manifest is None:
        from vlmops.infer.job_lock import run_going_on

        run = run_going_on(output)
    return JobStatus(output.uri, plan, done, pending, rejects, manifest, by_reason, published, run)


def where_it_stopped(output: JobOutput) -> tuple[str, str]:
    """A job stopped mid-way, read back from its output for the line that says so: its name (`job ID`; `job` before
    it was planned) and how far it got (`2 of 6 shards done in OUT`). A read that fails is said in the second rather
    than raised: the line that a stop prints must not fail (the output may be why the job stopped)."""
    job, done = "job", f"nothing written to {output.uri} yet"
    try:
        saved = output.read_text(JOB_FILE)
        if saved is not None:
            plan = JobPlan.from_json(saved)
            job = f"job {plan.job_id}"
            finished = len(plan.shards) - len(pending_shards(plan, output))
            done = f"{counted_of(finished, len(plan.shards), 'shard')} done in {output.uri}"
    except Exception as err:
        done = f"the shards done in {output.uri} could not be read ({err})"
    return job, done
