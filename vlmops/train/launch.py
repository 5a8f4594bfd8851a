"""Launching training in a child process: plain Python for one GPU, torchrun for several (as the seed's
`NPROC_PER_NODE=4 swift sft ...`), so the caller (a CLI, a Prefect worker) never holds the GPU itself.

    python -m vlmops.train.launch --config pipeline.yaml --base-model M --dataset D --run-dir R [--set k=v ...]

is the entry point both run; `vlmops sft` goes through `sft_command`, the flow's train step through
`launch_training`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

from vlmops.config import ConfigError, PipelineConfig, load_config
from vlmops.data.formats import DatasetError
from vlmops.errors import RunFailed
from vlmops.multigpu import NO_MULTICAST_ENV
from vlmops.train.sft import TrainResult

log = logging.getLogger(__name__)

TRAIN_LOG = "train.log"
TAIL_LINES = 60


class TrainingFailed(RunFailed):
    """The training process exited with an error; carries its exit code and the end of its output."""

    def __init__(self, returncode: int, log_tail: str, command: list[str]):
        self.returncode = returncode
        self.log_tail = log_tail
        self.command = command
        super().__init__(f"training failed (exit code {returncode}); last lines of its output:\n{log_tail}")


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
    log.info("launching: %s", " ".join(command))
    returncode, tail = _run_streaming(command, child_environment(env), run_dir / TRAIN_LOG)
    if returncode != 0:
        raise TrainingFailed(returncode, tail, command)
    return TrainResult.from_run_dir(run_dir)


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The training child's environment: ours, NVLink multicast off, `extra`, and this package importable."""
    child = {**os.environ, **NO_MULTICAST_ENV, **(extra or {})}
    package_root = str(Path(__file__).resolve().parents[2])
    child["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, child.get("PYTHONPATH")) if p)
    return child


def _run_streaming(command: list[str], env: dict[str, str], log_file: Path) -> tuple[int, str]:
    """Run a command, copying its output to our stderr (progress bars included) and to `log_file`."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    partial = b""
    out = getattr(sys.stderr, "buffer", None)
    # A session of its own, so stopping the launcher stops every rank torchrun started.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    assert proc.stdout is not None
    try:
        with log_file.open("ab") as saved:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                saved.write(chunk)
                if out is not None:
                    out.write(chunk)
                    out.flush()
                else:
                    sys.stderr.write(chunk.decode("utf-8", "replace"))
                lines = (partial + chunk).replace(b"\r", b"\n").split(b"\n")
                partial = lines.pop()
                tail.extend(line.decode("utf-8", "replace") for line in lines if line.strip())
        returncode = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    if partial.strip():
        tail.append(partial.decode("utf-8", "replace"))
    return returncode, "\n".join(tail)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the training process group: SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def default_run_dir(config: PipelineConfig) -> Path:
    """`<output_dir>/runs/<run.name>-<date-time>`, like swift's output/<model>/vX-<date-time>."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(config.run.output_dir) / "runs" / f"{config.run.name}-{stamp}"


def sft_command(config_path: str | None, overrides: list[str], run_dir: str | None) -> int:
    """`vlmops sft`: fetch the base model, validate the data, then train in a child process; prints a summary."""
    from transformers import AutoProcessor

    from vlmops.data.prepare import prepare_from_config
    from vlmops.models.download import download_model
    from vlmops.models.template import token_counter

    try:
        config = load_config(config_path, overrides)
        base_model = download_model(config.model, config.storage, config.run.output_dir).path
        processor = AutoProcessor.from_pretrained(base_model)
        num_image_tokens = int(processor.num_image_tokens)
        count = token_counter(processor.tokenizer, num_image_tokens, config.model.system_prompt)
        prepared = prepare_from_config(config, count, num_image_tokens)
        folder = Path(run_dir) if run_dir else default_run_dir(config)
        print(f"run folder: {folder} (resume a stopped run with --run-dir {folder})", file=sys.stderr)
        result = launch_training(
            Path(config_path) if config_path else None, base_model, prepared.path, folder, overrides
        )
    except TrainingFailed as err:
        print(
            f"error: training failed (exit code {err.returncode}); see {TRAIN_LOG} in the run folder", file=sys.stderr
        )
        return 1
    except (ConfigError, DatasetError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


def summary(result: TrainResult) -> str:
    """A few lines a person can read at the end of a run."""

    lines = [
        f"trained {result.steps} steps: train loss {result.train_loss:.4f}, best eval loss {result.eval_loss:.4f}",
        f"trainable params {result.trainable_params:,} of {result.total_params:,}; "
        f"{result.tokens_per_s:,.0f} tokens/s, {result.samples_per_s:.1f} samples/s",
        f"result: {result.final_dir}",
        f"best checkpoint: {result.best_checkpoint}; last: {result.last_checkpoint}",
    ]
    if result.dropped_records or result.truncated_records:
        lines.append(
            f"data.max_length: {len(result.dropped_records)} record(s) dropped, {len(result.truncated_records)} truncated"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of one training process (one rank under torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m vlmops.train.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="pipeline.yaml (default: the built-in defaults)")
    parser.add_argument("--base-model", required=True, help="native DeepSeek-VL checkpoint folder")
    parser.add_argument("--dataset", required=True, help="prepared dataset snapshot folder")
    parser.add_argument("--run-dir", required=True, help="run folder to write (or resume)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    from vlmops.train.sft import train

    config = load_config(args.config, args.set)
    train(config, Path(args.base_model), Path(args.dataset), Path(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
