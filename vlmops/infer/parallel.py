"""Processes for batch inference: a worker per GPU of this machine, and jobs run in a child process group.

Workers: the coordinating process (`run_batch_job`) has planned the job in the output; each worker sees one
GPU (`CUDA_VISIBLE_DEVICES`), loads the model once and answers the shards it is given (the pending ones dealt
out round-robin) as one stream through its engine, publishing each part as it goes. Workers need no collective communication, so no NCCL;
NVLink multicast is switched off in their environment all the same. The coordinator follows their progress
through a stats file each worker appends to after every shard, and a failed worker's error through its last lines
(a server it could not reach is named there: `vlmops.outages`).

Process groups: a step that must not keep a model in its own process (a Prefect task: the worker process
lives on and would hold the GPU memory) runs the job as a child in a new process group, and on any failure
or interrupt stops the whole group: the child and the per-GPU workers it started.

A worker stopped by SIGTERM (its coordinator's, as the coordinator stops) or Ctrl-C removes the part it was writing
and its scratch folder and ends at once (`vlmops.stopping`), without waiting on its image reads. A starter killed
outright (SIGKILL: the OOM killer, a cancellation past its grace period, an evicted pod) stops nothing, so each process
here is started tied to its starter (`tied_to_this_process`): the kernel kills the job's child with the step that
started it, and each worker with the job. An orphan would hold its GPU's memory and go on writing the output folder
that the rerun resumes from.

    python -m vlmops.infer.parallel --checkpoint DIR --output OUT --config CFG --shards 0,2,4 --stats FILE
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vlmops import quiet
from vlmops.config import PipelineConfig, dump_config, load_config
from vlmops.errors import RunFailed
from vlmops.infer.job_plan import JobPlan
from vlmops.infer.job_status import ShardStats
from vlmops.infer.output import JOB_FILE
from vlmops.infer.resolve import ModelSource
from vlmops.infer.shards import Shard
from vlmops.multigpu import NO_MULTICAST_ENV
from vlmops.outages import PARENT_ADVISES_ENV, ServiceUnavailable, unreachable_service
from vlmops.plural import counted
from vlmops.scratch import held_folder
from vlmops.stopping import StopSignal, exit_now, exit_status, stop_signals_raised
from vlmops.train.child import copy_output, tied_to_this_process

log = logging.getLogger(__name__)

POLL_S = 0.5
STOP_GRACE_S = 10.0
ERROR_TAIL_LINES = 12  # of a failed child's stderr, in its RunFailed
WORKERS_STEM = "vlmops-workers-"
"""The temp dir's folder of a multi-GPU job's coordinator (its config and the workers' stats files): `held_folder`."""
CHILD_CONFIG_STEM = "vlmops-child-config-"
"""The temp dir's folder of the config a job run in a child reads (`run_job_in_child`): `held_folder`."""


def default_workers() -> int:
    """Every visible GPU; one process on a machine without CUDA."""
    return max(torch.cuda.device_count(), 1)


def run_on_workers(
    source: ModelSource,
    output_uri: str,
    config: PipelineConfig,
    shards: list[Shard],
    workers: int,
    on_records: Callable[[int], object],
    on_shard: Callable[[ShardStats], None],
) -> None:
    """Answer `shards` with `workers` processes (one per GPU), dealt out round-robin; return when all are done.

    Raises:
        ValueError: more workers than visible GPUs.
        RunFailed: a worker failed (the others are stopped).
    """
    gpus = torch.cuda.device_count()
    if gpus and workers > gpus:
        raise ValueError(f"infer.workers={workers} but this machine shows only {counted(gpus, 'GPU')}")
    sizes = {s.index: s.count for s in shards}
    # Held while the job runs: the next multi-GPU job on this machine removes the folders of jobs killed outright.
    with held_folder(WORKERS_STEM) as tmp:
        config_file = tmp / "config.yaml"
        config_file.write_text(dump_config(config))
        procs: list[subprocess.Popen[bytes]] = []
        tails: list[deque[str]] = []  # each worker's last lines: a failure's error quotes them
        copiers: list[threading.Thread] = []
        stats_files = [tmp / f"stats-{rank}.jsonl" for rank in range(workers)]
        seen = [0] * workers
        try:
            for rank in range(workers):
                env = {**os.environ, **NO_MULTICAST_ENV}
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = _visible_device(rank)
                cmd = [
                    sys.executable, "-m", "vlmops.infer.parallel", "--checkpoint", str(source.checkpoint),
                    "--output", output_uri, "--config", str(config_file), "--stats", str(stats_files[rank]),
                    "--shards", ",".join(str(s.index) for s in shards[rank::workers]),
                ] + (["--adapter", str(source.adapter)] if source.adapter else [])  # fmt: skip
                if rank:  # the workers compile the same kernels: the first writes model.shared_compile_cache
                    cmd.append("--no-publish-compiles")
                # Tied to this thread, not only this process (PR_SET_PDEATHSIG): it returns only once every worker
                # has ended or been killed, so no worker outlives it unless the whole job dies.
                procs.append(subprocess.Popen(tied_to_this_process(cmd), env=env, stderr=subprocess.PIPE))
                tails.append(deque(maxlen=ERROR_TAIL_LINES))
                copiers.append(_copying(procs[-1], tails[-1]))
            while True:
                codes = [p.poll() for p in procs]
                for rank, path in enumerate(stats_files):
                    lines = complete_lines(path)
                    for line in lines[seen[rank] :]:
                        stats = ShardStats(**json.loads(line))
                        on_records(sizes[stats.shard])
                        on_shard(stats)
                    seen[rank] = len(lines)
                failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    rank = failed[0][0]
                    copiers[rank].join(timeout=POLL_S)  # done once the worker (and all it started) closed its stderr
                    last = "\n".join(f"  {line}" for line in tails[rank])
                    raise RunFailed(
                        f"{counted(len(failed), 'batch inference worker')} failed (rank, exit code): {failed}; "
                        "see their output above" + (f"; the last lines of rank {rank}:\n{last}" if last else "")
                    )
                if all(c == 0 for c in codes):
                    return
                time.sleep(POLL_S)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
            for copier in copiers:
                copier.join(timeout=POLL_S)


def _copying(proc: subprocess.Popen[bytes], tail: deque[str]) -> threading.Thread:
    """A thread that copies `proc`'s stderr to ours as it comes, keeping its last lines in `tail`.

    It runs in a copy of the caller's context: the handlers on the lines it logs (`copy_output`) find the caller's
    flow or task run there (Prefect keeps it in context variables, which a new thread does not inherit)."""
    assert proc.stderr is not None
    run_in_context = contextvars.copy_context().run
    copier = threading.Thread(target=run_in_context, args=(copy_output, proc.stderr.fileno(), tail), daemon=True)
    copier.start()
    return copier


def complete_lines(path: Path) -> list[str]:
    """The lines of a file another process appends to, up to its last newline: a line being written is read on a
    later poll, whole (not parsed half-written, which failed the job)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    return text.split("\n")[:-1]


def _visible_device(rank: int) -> str:
    """The rank-th GPU of those this process may use (respects an outer CUDA_VISIBLE_DEVICES)."""
    outer = os.environ.get("CUDA_VISIBLE_DEVICES")
    return outer.split(",")[rank] if outer else str(rank)


def run_in_process_group(
    cmd: Sequence[str], env: dict[str, str] | None = None, poll: Callable[[], None] | None = None
) -> None:
    """Run `cmd` in a new process group and wait; `poll` is called every half second meanwhile. The child's stderr
    is copied to ours as it comes, and its last lines end the error when it fails: a flow's log shows why.

    On a failure of `poll`, an interrupt or any other exception here, the whole group (the child and every
    process it started) is stopped: SIGTERM, then SIGKILL after a grace period. Killed outright, this process takes
    the child with it (`tied_to_this_process`), and the child its workers (`run_on_workers`).

    Raises:
        RunFailed: the command exited with a non-zero status.
    """
    tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)
    # Tied to this thread, not only this process (PR_SET_PDEATHSIG): it returns only once the child has ended or been
    # stopped, so the child does not outlive it unless this whole process dies.
    tied = tied_to_this_process(list(cmd))
    proc = subprocess.Popen(tied, env=env, stderr=subprocess.PIPE, start_new_session=True)
    copier = _copying(proc, tail)
    try:
        while proc.poll() is None:
            if poll is not None:
                poll()
            time.sleep(POLL_S)
        if poll is not None:
            poll()
    except BaseException:
        _stop_group(proc)
        raise
    finally:
        copier.join(timeout=POLL_S)  # done once every process of the group closed its stderr
    if proc.returncode != 0:
        last = "\n".join(f"  {line}" for line in tail)
        raise RunFailed(
            f"{' '.join(cmd[:6])} ... exited with status {proc.returncode}"
            + (f"; its last lines:\n{last}" if last else "")
        )


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def _worker(args: argparse.Namespace) -> int:
    from vlmops.infer.batch_job import load_runner
    from vlmops.infer.output import open_output

    config = load_config(args.config)
    output = open_output(args.output, config.storage)
    try:
        plan = JobPlan.from_json(output.read_text(JOB_FILE) or "")
        source = ModelSource(Path(args.checkpoint), Path(args.adapter) if args.adapter else None)
        shards = [plan.shards[int(i)] for i in args.shards.split(",") if i]
        worker = f"{os.uname().nodename}:{os.getpid()}"
        share = sum(s.count for s in shards)  # what this worker answers picks its engine
        runner = load_runner(source, config, plan.longest_prompt, worker, not args.no_publish_compiles, records=share)
        # One stream through the engine, as a job in one process runs: the next shard's prompts fill the slots the
        # last one's free, rather than the engine draining at every shard's end. Each shard's stats as it is published.
        for stats in runner.run_many(plan, shards, output):
            with open(args.stats, "a", encoding="utf-8") as f:
                f.write(json.dumps(stats.__dict__) + "\n")
    finally:
        output.close()  # its scratch folder (S3), before a stop's exit_now
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmops.infer.parallel", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="native checkpoint folder (resolved by the coordinator)")
    parser.add_argument("--adapter", help="peft adapter folder to apply")
    parser.add_argument("--output", required=True, help="the job's output folder or s3:// prefix")
    parser.add_argument("--config", required=True, help="the job's pipeline config")
    parser.add_argument("--shards", required=True, help="comma-separated shard indexes to answer")
    parser.add_argument("--stats", required=True, help="file to append each shard's stats to")
    parser.add_argument(
        "--no-publish-compiles",
        action="store_true",
        help="fetch model.shared_compile_cache but leave writing it to another worker of this machine",
    )
    args = parser.parse_args(argv)
    quiet.child_logging()
    try:
        with stop_signals_raised():
            return _worker(args)
    except (KeyboardInterrupt, StopSignal) as stop:
        # Stopped with the job (its coordinator's SIGTERM, Ctrl-C in the job's terminal): the part being written is
        # removed, the rest is the coordinator's to say.
        exit_now(exit_status(stop))
    except Exception as err:
        outage = unreachable_service(err)
        if outage is None:
            raise
        # The last line of this worker's traceback: the coordinator reads the outage off it and names it, with what
        # to run once the server is back (its own command, which keeps the parts this worker published).
        raise ServiceUnavailable(outage) from err


if __name__ == "__main__":
    sys.exit(main())


def job_command(
    model_ref: str, input_spec: str, output_uri: str, config_file: Path, named_as: str | None = None
) -> list[str]:
    """`vlmops batch-infer` for this job, as a child process runs it."""
    return [
        sys.executable, "-m", "vlmops.cli", "batch-infer", "--model", model_ref, "--input", input_spec,
        "--output", output_uri, "--config", str(config_file),
    ] + (["--model-named-as", named_as] if named_as else [])  # fmt: skip


def run_job_in_child(
    model_ref: str,
    input_spec: str,
    output_uri: str,
    config: PipelineConfig,
    poll: Callable[[], None] | None = None,
    named_as: str | None = None,
) -> None:
    """Run the whole job (`vlmops batch-infer`) in a child process group: the model never loads here, so this
    process holds no GPU memory afterwards; a failure or interrupt stops the child and its workers. `named_as`: the
    alias a pinned `model_ref` was resolved from, which the job records as its model (`prepare_job`).

    The child names an outage without advice (PARENT_ADVISES_ENV): its command line names a temporary config, gone
    once this returns; the caller (a flow) says what to run instead.

    Raises:
        RunFailed: the job failed (its output says why; a rerun resumes it).
    """
    env = {**os.environ, PARENT_ADVISES_ENV: "1"}
    with held_folder(CHILD_CONFIG_STEM) as tmp:  # a step killed outright leaves it to the next one's sweep
        config_file = tmp / "config.yaml"
        config_file.write_text(dump_config(config))
        command = job_command(model_ref, input_spec, output_uri, config_file, named_as)
        run_in_process_group(command, env=env, poll=poll)
