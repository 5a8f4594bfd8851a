"""The layout of a training run folder, shared by training, inference, evaluation and export.

    RUN_DIR/
      config.yaml         the resolved pipeline config
      run.json            base model path, dataset snapshot path and hash, mode (paths also relative to RUN_DIR,
                          so a moved or cloned run folder finds what moved with it)
      checkpoint-<step>/  checkpoints, written by the HF Trainer; complete once `checkpoint-complete` is in it
                          (written last); each holds a copy of config.yaml and run.json, so it can be used on
                          its own
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
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from vlmops.config import PipelineConfig, dump_config, load_config
from vlmops.errors import UserInputError
from vlmops.staging import STAGING_PREFIX, write_text_atomic

log = logging.getLogger(__name__)

RUN_INFO = "run.json"
CONFIG_FILE = "config.yaml"
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
TRAINER_STATE = "trainer_state.json"
# Written into a checkpoint folder after everything else, by rank 0 once every rank has saved its part
# (`vlmops.train.trainer.CompleteCheckpoints`): a folder without it was cut short and is never resumed from.
COMPLETE_MARKER = "checkpoint-complete"
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
    trained_with: dict[str, Any] | None = None
    """What the run resolved where the settings leave the choice to vlmops (the language model's attention, packing,
    micro-batch, accumulation, recompute): config.yaml keeps the settings as given, `auto` included."""

    def write(self, folder: Path) -> None:
        """run.json in `folder`, with each path also relative to `folder`: `open_run` falls back to those when a
        run (or a copy of it: a git clone with `dvc pull`, another machine) sits at another absolute path."""
        data: dict[str, Any] = asdict(self)
        data[RELATIVE_KEY] = {
            key: os.path.relpath(Path(data[key]).resolve(), folder.resolve()) for key in PATH_FIELDS if data[key]
        }
        write_text_atomic(folder / RUN_INFO, json.dumps(data, indent=2) + "\n")

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


def _checkpoint_folders(run_dir: Path) -> list[Path]:
    """Every checkpoint-N folder of a run, complete or not, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint is complete once its marker is there: written last, after every rank saved its part."""
    return (checkpoint / COMPLETE_MARKER).is_file()


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [p for p in _checkpoint_folders(run_dir) if is_complete(p)]


def incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders without a completion marker: cut short, or not written by this version of vlmops."""
    return [p for p in _checkpoint_folders(run_dir) if not is_complete(p)]


def checkpoint_step(checkpoint: Path) -> int:
    match = CHECKPOINT_RE.match(checkpoint.name)
    if match is None:
        raise ValueError(f"{checkpoint} is not a checkpoint-N folder")
    return int(match.group(1))


def open_run(path: str | os.PathLike[str]) -> TrainedRun:
    """Open RUN_DIR (uses final/, else the latest checkpoint), a checkpoint folder, or a merged model folder."""
    folder = Path(path)
    checkpoint = CHECKPOINT_RE.match(folder.name) is not None  # its run.json is a copy of the run folder's
    if checkpoint and folder.is_dir() and not is_complete(folder):
        raise FileNotFoundError(
            f"{folder} is not a complete checkpoint (no {COMPLETE_MARKER}): its save was cut short, or it was "
            f"written before vlmops marked finished checkpoints; use the run folder {folder.parent} (its final/ "
            "or latest complete checkpoint) or another checkpoint-N"
        )
    if not (folder / RUN_INFO).is_file():
        raise FileNotFoundError(
            f"{folder} is not a vlmops run or checkpoint folder (no {RUN_INFO}); pass the folder `vlmops sft` wrote"
        )
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


# Config keys that may differ between a run and its resumption: where things are written and looked up
# (the base model and the data are compared by path and content hash instead; torch.compile's caches hold only what
# was compiled), what validation reads and writes (the snapshot's hash says what came of it), bookkeeping, the
# GPU count, and the eval loss's batch size (lowered to resume a run whose evaluation ran out of memory). Any other
# change in run/model/data/train makes it a different run.
RESUMABLE_CHANGES = (
    "run.name",
    "run.output_dir",
    "model.source",
    "model.id",
    "model.revision",
    "model.cache_dir",
    "model.compile_cache",
    "model.shared_compile_cache",
    "data.train",
    "data.eval",
    "data.eval_ratio",
    "data.invalid_records",
    "data.rejects_file",
    "data.allowed_roots",
    "data.demo.",
    "data.num_workers",
    "train.resume",
    "train.nproc_per_node",
    "train.save_total_limit",
    "train.logging_steps",
    "train.eval_batch_size",
)
RUN_SECTIONS = ("run", "model", "data", "train")


@dataclass
class ResumePlan:
    """Where a training run in a run folder starts."""

    checkpoint: Path | None
    """The checkpoint to resume from; None: from the base model."""
    start_over: bool
    """True when what an earlier run wrote in the folder is to be deleted (train.resume never)."""


def plan_resume(run_dir: Path, config: PipelineConfig, info: RunInfo) -> ResumePlan:
    """Check a reused run folder belongs to this run and pick the resume point (reads only; every rank calls it)."""
    resume_value = config.train.resume
    if resume_value == "unfinished":
        # `dvc repro` reruns a finished stage only because its inputs changed: that is a new run, not more of
        # the old one (which DVC keeps in its cache). A stopped run has no result.json yet and is continued.
        resume_value = "never" if (run_dir / RESULT_FILE).is_file() else "auto"
    if resume_value != "never" and (run_dir / CONFIG_FILE).is_file():
        check_same_run(run_dir, config, info)
    if resume_value == "auto":
        done = checkpoints(run_dir)
        plan = ResumePlan(done[-1] if done else None, start_over=False)
        unfinished_after(run_dir, plan.checkpoint)  # raises when it is not one interrupted save
        return plan
    if resume_value == "never":
        return ResumePlan(None, start_over=True)
    resume = Path(resume_value).expanduser().resolve()
    if not is_complete(resume):
        raise FileNotFoundError(
            f"train.resume: {resume} is not a complete checkpoint (no {TRAINER_STATE} or {COMPLETE_MARKER}); "
            "use auto, never, or a checkpoint-N folder"
        )
    # Its own copies of config.yaml and run.json say what it was trained with (another run folder's, maybe): the
    # optimizer and scheduler states it holds would otherwise carry the old settings (its lr, for one) on unseen.
    check_same_run(resume, config, info)
    plan = ResumePlan(resume, start_over=False)
    unfinished_after(run_dir, plan.checkpoint)
    return plan


def unfinished_after(run_dir: Path, resume: Path | None) -> list[Path]:
    """The unmarked checkpoint folders past the resume point: the save a kill interrupted, which the resumed
    run writes again (it is removed first, so no stale file of it survives into the new one).

    Checkpoints are saved one at a time and each is marked before training goes on, so a kill leaves at most
    one unmarked folder, the newest. Several past the resume point were not left by an interrupted save (an
    older vlmops wrote no markers, or they were copied in): deleting them would lose work, and the resumed
    run would overwrite them, so that is refused. Unmarked folders before the resume point are left alone
    (never resumed from, never deleted).
    """
    start = checkpoint_step(resume) if resume is not None and CHECKPOINT_RE.match(resume.name) else 0
    after = [p for p in incomplete_checkpoints(run_dir) if checkpoint_step(p) > start]
    if len(after) > 1:
        raise UserInputError(
            f"{run_dir} holds {len(after)} checkpoints without the {COMPLETE_MARKER} marker "
            f"({', '.join(p.name for p in after)}) after the resume point: a stopped run leaves at most one. They "
            "were written by an older vlmops or copied in, and the resumed run would overwrite them; move them "
            "out of the folder, resume from one of them explicitly (train.resume: PATH, after checking it), or "
            "start over with train.resume: never"
        )
    return after


def start_run_folder(run_dir: Path, config: PipelineConfig, info: RunInfo, plan: ResumePlan) -> None:
    """Write config.yaml and run.json; first clear what a run started over leaves, and unfinished writes (rank 0)."""
    if plan.start_over and run_dir.exists():
        _clear_run(run_dir, config.train.resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_unfinished(run_dir, plan.checkpoint)
    remove_superseded(run_dir, plan.checkpoint)
    write_text_atomic(run_dir / CONFIG_FILE, dump_config(config))
    info.write(run_dir)


def check_same_run(run_dir: Path, config: PipelineConfig, info: RunInfo) -> None:
    """Raise ValueError listing what differs when `run_dir` (a run folder, or a checkpoint to resume from) holds a
    run with another setup."""
    checkpoint = CHECKPOINT_RE.match(run_dir.name) is not None
    old_config = PipelineConfig.model_validate(yaml.safe_load((run_dir / CONFIG_FILE).read_text()))
    old = {k: v for k, v in old_config.to_flat_dict().items() if k.split(".")[0] in RUN_SECTIONS}
    new = {k: v for k, v in config.to_flat_dict().items() if k.split(".")[0] in RUN_SECTIONS}
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if not k.startswith(RESUMABLE_CHANGES) and old.get(k) != new.get(k)
    ]
    if (run_dir / RUN_INFO).is_file():
        # a moved run folder finds a base model that moved with it
        old_info = RunInfo.read(run_dir, run_dir.parent if checkpoint else run_dir)
        if Path(old_info.base_model).resolve() != Path(info.base_model).resolve():
            changed.append(f"base model: {old_info.base_model} -> {info.base_model}")
        if old_info.dataset_hash != info.dataset_hash:
            changed.append(f"dataset: {old_info.dataset} -> {info.dataset} (different content)")
    if not changed:
        return
    if checkpoint:
        raise ValueError(
            f"train.resume: {run_dir} was trained with a different setup, so it cannot be resumed:\n"
            + "\n".join(f"  - {c}" for c in changed)
            + "\nresume from a checkpoint of this setup, or set train.resume: auto (this run folder's own checkpoints) or "
            "never (from the base model)"
        )
    raise ValueError(
        f"{run_dir} holds a run with a different setup, so it cannot be resumed:\n"
        + "\n".join(f"  - {c}" for c in changed)
        + "\nuse a new run folder (--run-dir), or start this one over: set train.resume: never, or delete the "
        "folder (the DVC sft stage, which sets train.resume: unfinished)"
    )


def is_last_step(checkpoint: Path) -> bool:
    """Whether a checkpoint was written at the run's last step (max_steps)."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    return bool(state.get("max_steps")) and int(state["global_step"]) >= int(state["max_steps"])


def remove_unfinished(run_dir: Path, resume: Path | None) -> list[Path]:
    """Delete what a stopped run left half-written (`.staging-` folders, and files of that name; the checkpoint whose
    save was cut short: see `unfinished_after`); returns it. Older unmarked checkpoints are kept, with a warning."""
    # Every `.staging-` folder, held or not, unlike `staging.remove_abandoned_staging`: a run folder is one run's, so
    # none is live when the run starts, and `.staging-final` (written by every rank) is held by no single process.
    removed = [*sorted(run_dir.glob(f"{STAGING_PREFIX}*")), *unfinished_after(run_dir, resume)]
    for path in removed:
        # A file (or link) of that name too: the name says it is no result, and rmtree raised on it, so no run started.
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        log.warning("removed %s: a stopped run did not finish writing it", path)
    for path in incomplete_checkpoints(run_dir):
        if path not in removed:
            log.warning("%s has no %s: kept, but never resumed from", path, COMPLETE_MARKER)
    return removed


def remove_superseded(run_dir: Path, resume: Path | None) -> list[Path]:
    """Resumed from an earlier checkpoint than the latest (train.resume: PATH): delete what the part of the run after
    it wrote, its later checkpoints, final/ and result.json (rank 0); returns them. The resumed run writes them again:
    a later checkpoint kept would be rewritten in place, its completion marker there all along (a kill mid-save left
    it looking complete), and resumed from by `auto` after a kill before it; final/ and result.json would stand for
    this run meanwhile."""
    if resume is None or not CHECKPOINT_RE.match(resume.name):
        return []
    later = [p for p in checkpoints(run_dir) if checkpoint_step(p) > checkpoint_step(resume)]
    if not later:
        return []
    removed = [*later, *(p for p in (run_dir / FINAL_DIR, run_dir / RESULT_FILE) if p.exists())]
    for path in removed:
        log.warning(
            "resuming from %s: deleting %s, written after it by the part of the run that is redone", resume, path
        )
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def _clear_run(run_dir: Path, resume: str) -> None:
    """Starting a run folder over: remove what an earlier run in it wrote."""
    for path in [*_checkpoint_folders(run_dir), run_dir / FINAL_DIR, *run_dir.glob(f"{STAGING_PREFIX}*")]:
        log.warning("train.resume is %s: starting over, deleting %s", resume, path)
        shutil.rmtree(path, ignore_errors=True)
    for name in (METRICS_FILE, RESULT_FILE):
        (run_dir / name).unlink(missing_ok=True)
