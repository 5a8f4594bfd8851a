"""The layout of a training run folder, shared by training, inference, evaluation and export.

    RUN_DIR/
      config.yaml         the resolved pipeline config
      run.json            base model path, dataset snapshot path and hash, mode (paths also relative to RUN_DIR,
                          so a moved or cloned run folder finds what moved with it)
      checkpoint-<step>/  complete checkpoints only (written aside, renamed into place); each holds a copy
                          of config.yaml and run.json, so it can be used on its own
      final/              the trained result: a peft adapter (LoRA) or a full checkpoint (full)
      metrics.jsonl       one JSON line per logged step (loss, learning rate, eval loss)
      result.json         the run's summary (`TrainResult`), written when training ends
      train.log           the training processes' output (when started by `launch_training`)
    RUN_DIR-merged/       `vlmops export --merge-lora`: a plain transformers checkpoint, with config.yaml
                          and run.json (`merged_from` set), usable with --ckpt like the run itself

`vlmops infer --ckpt` and `vlmops eval --ckpt` accept RUN_DIR or one of its checkpoint folders, as the seed's
`--ckpt_dir ... --load_dataset_config true` does.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vlmops.config import PipelineConfig, load_config

RUN_INFO = "run.json"
CONFIG_FILE = "config.yaml"
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
PATH_FIELDS = ("base_model", "dataset", "merged_from")
RELATIVE_KEY = "relative"


@dataclass
class RunInfo:
    """What a run was trained from."""

    base_model: str
    dataset: str
    dataset_hash: str
    mode: str
    merged_from: str | None = None
    """Set in a merged (exported) model folder: the adapter or final/ folder it was made from."""

    def write(self, folder: Path) -> None:
        """run.json in `folder`, with each path also relative to `folder`: `open_run` falls back to those when a
        run (or a copy of it: a git clone with `dvc pull`, another machine) sits at another absolute path."""
        data: dict[str, Any] = asdict(self)
        data[RELATIVE_KEY] = {
            key: os.path.relpath(Path(data[key]).resolve(), folder.resolve()) for key in PATH_FIELDS if data[key]
        }
        (folder / RUN_INFO).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path, root: Path) -> RunInfo:
        """run.json of `folder`; a recorded path that does not exist is taken relative to `root` (the folder the
        file was written in: the run folder for its checkpoints' copies) when it exists there."""
        data = json.loads((folder / RUN_INFO).read_text())
        for key, relative in data.pop(RELATIVE_KEY, {}).items():
            moved = root / relative
            if not Path(data[key]).exists() and moved.exists():
                data[key] = str(moved.resolve())
        return cls(**data)


@dataclass
class TrainedRun:
    """A run folder or checkpoint opened for reuse."""

    root: Path
    weights: Path
    config: PipelineConfig
    info: RunInfo

    @property
    def is_adapter(self) -> bool:
        return (self.weights / "adapter_config.json").is_file()


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def open_run(path: str | os.PathLike[str]) -> TrainedRun:
    """Open RUN_DIR (uses final/, else the latest checkpoint), a checkpoint folder, or a merged model folder."""
    folder = Path(path)
    if not (folder / RUN_INFO).is_file():
        raise FileNotFoundError(
            f"{folder} is not a vlmops run or checkpoint folder (no {RUN_INFO}); pass the folder `vlmops sft` wrote"
        )
    checkpoint = CHECKPOINT_RE.match(folder.name) is not None  # its run.json is a copy of the run folder's
    info = RunInfo.read(folder, folder.parent if checkpoint else folder)
    config = load_config(folder / CONFIG_FILE)
    if checkpoint or (folder / "config.json").is_file():
        weights = folder  # a checkpoint, or a merged model (`vlmops export`) that is itself the weights
    elif (folder / FINAL_DIR).is_dir():
        weights = folder / FINAL_DIR
    else:
        done = checkpoints(folder)
        if not done:
            raise FileNotFoundError(
                f"{folder} has no final/ and no complete checkpoint yet: is training still running?"
            )
        weights = done[-1]
    return TrainedRun(folder, weights, config, info)


def run_config(ckpt: str | None, config_path: str | None, overrides: list[str]) -> PipelineConfig:
    """The config for `--ckpt`/`--config`: the given file, else the run's saved config, else the defaults.

    A run's saved config is what it was trained with (system prompt, data, generation settings), as the
    seed's `--load_dataset_config true`; `overrides` apply on top either way.
    """
    if config_path is not None:
        return load_config(config_path, overrides)
    if ckpt is None:
        return load_config(None, overrides)
    folder = Path(ckpt)
    if not (folder / RUN_INFO).is_file() or not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{ckpt} is not a vlmops run or checkpoint folder (no {RUN_INFO} or {CONFIG_FILE}); "
            "pass the folder `vlmops sft` wrote"
        )
    return load_config(folder / CONFIG_FILE, overrides)
