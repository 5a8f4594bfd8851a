"""Launching training in a child process: plain Python for one GPU, torchrun for several (as the seed's
`NPROC_PER_NODE=4 swift sft ...`), so the caller (a CLI, a Prefect worker) never holds the GPU itself.

    python -m vlmops.train.launch --config pipeline.yaml --base-model M --dataset D --run-dir R [--set k=v ...]

is the entry point both run; `vlmops sft` (vlmops/cli/sft.py) and the flow's train step call
`launch_training`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import logging
import os
import sys
from pathlib import Path

from vlmops import quiet
from vlmops.config import PipelineConfig, load_config
from vlmops.errors import RunFailed
from vlmops.train.child import die_with_parent, run_child
from vlmops.train.sft import TrainResult

log = logging.getLogger(__name__)

TRAIN_LOG = "train.log"


class TrainingFailed(RunFailed):
    """The training process exited with an error; carries its exit code and the end of its output."""

    def __init__(self, returncode: int, log_tail: str, command: list[str], log_file: Path):
        self.returncode = returncode
        self.log_tail = log_tail
        self.command = command
        self.log_file = log_file
        super().__init__(
            f"training failed (exit code {returncode}); its whole output is in {log_file}; last lines:\n{log_tail}"
        )


def resolve_nproc(config: PipelineConfig, nproc: int | None = None) -> int:
    """Processes (GPUs) per node: the argument, else train.nproc_per_node, else NPROC_PER_NODE, else 1."""
    if nproc is not None:
        return nproc
    if config.train.nproc_per_node is not None:
        return config.train.nproc_per_node
    env = os.environ.get("NPROC_PER_NODE")
    if env is None:
        return 1
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"NPROC_PER_NODE={env!r} must be a positive integer (the number of GPUs to use)")
    return int(env)


def training_command(
    config_file: Path | None,
    base_model: Path,
    dataset: Path,
    run_dir: Path,
    overrides: list[str] | None = None,
    nproc: int = 1,
    deepspeed: bool = False,
) -> list[str]:
    """The command that runs training: `python -m vlmops.train.launch ...`, under torchrun when nproc > 1
    (or with DeepSpeed, which always wants the process-group environment torchrun sets up)."""
    entry = [
        "-m",
        "vlmops.train.launch",
        "--base-model",
        str(base_model),
        "--dataset",
        str(dataset),
        "--run-dir",
        str(run_dir),
    ]
    if config_file is not None:
        entry += ["--config", str(config_file)]
    for item in overrides or []:
        entry += ["--set", item]
    if nproc > 1 or deepspeed:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *entry]
    return [sys.executable, *entry]


def launch_training(
    config_file: Path | None,
    base_model: Path,
    dataset: Path,
    run_dir: Path,
    overrides: list[str] | None = None,
    nproc: int | None = None,
    env: dict[str, str] | None = None,
) -> TrainResult:
    """Train in a child process (torchrun when more than one process), streaming its output.

    `env` adds environment variables for the child (e.g. MLFLOW_RUN_ID and MLFLOW_TRACKING_URI, to log the
    metrics live to that run). The child's output is also appended to RUN_DIR/train.log. Raises
    TrainingFailed on a non-zero exit.
    """
    config = load_config(config_file, overrides)  # fail here, before starting anything, on a bad config
    command = training_command(
        config_file,
        base_model,
        dataset,
        run_dir,
        overrides,
        resolve_nproc(config, nproc),
        config.train.deepspeed is not None,
    )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    returncode, tail = run_child(command, run_dir / TRAIN_LOG, env)
    if returncode != 0:
        raise TrainingFailed(returncode, tail, command, run_dir / TRAIN_LOG)
    return TrainResult.from_run_dir(run_dir)


def default_run_dir(config: PipelineConfig) -> Path:
    """A new run folder, `<output_dir>/runs/<run.name>-<date-time>` like swift's output/<model>/vX-<date-time>,
    created here: a second run started in the same second gets `-2` (the same name made it resume the first
    run's folder, or be refused there for its other settings)."""
    runs = Path(config.run.output_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        folder = runs / (f"{config.run.name}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            folder.mkdir()  # the test and the claim in one step: two runs never get the same folder
        except FileExistsError:
            continue
        return folder
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    """Entry point of one training process (one rank under torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m vlmops.train.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="pipeline.yaml (default: the built-in defaults)")
    parser.add_argument("--base-model", required=True, help="native DeepSeek-VL checkpoint folder")
    parser.add_argument("--dataset", required=True, help="prepared dataset snapshot folder")
    parser.add_argument("--run-dir", required=True, help="run folder to write (or resume)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    if "LOCAL_RANK" in os.environ:  # a torchrun rank: die with its agent, which dies with the caller
        die_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    quiet.child_logging(
        logging.INFO if rank == 0 else logging.WARNING, f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    )
    from vlmops.train.sft import train

    config = load_config(args.config, args.set)
    train(config, Path(args.base_model), Path(args.dataset), Path(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
