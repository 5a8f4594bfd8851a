"""Validate a dataset and freeze it into a self-contained, content-addressed snapshot folder.

The snapshot (`<output_dir>/datasets/<hash>/`) holds `train.jsonl`, `eval.jsonl` in the seed's
`conversations` format, every image they use under `images/` (named by content hash, remote images
downloaded once), and `report.json`. Training, evaluation and DVC all read this folder, so a model can
always be traced to the exact bytes it saw.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vlmops.config import DataConfig, PipelineConfig, StorageConfig
from vlmops.data.demo import write_demo_dataset
from vlmops.data.length import LENGTHS_FILE, length_fingerprint, write_lengths
from vlmops.data.validation import (
    RecordChecker,
    SplitStats,
    Tally,
    ValidationReport,
    rejects_path,
    rejects_writer,
)
from vlmops.errors import UserInputError
from vlmops.folders import files_under
from vlmops.hashing import sha256_file
from vlmops.models.template import Tokenizer
from vlmops.plural import counted
from vlmops.staging import build_lock, staging_in

log = logging.getLogger(__name__)
T = TypeVar("T")

DATASETS_DIR = "datasets"
"""The folder of `run.output_dir` that holds the dataset snapshots (and, by default, the rejects file)."""


@dataclass
class PreparedDataset:
    """A dataset snapshot on disk."""

    path: Path
    content_hash: str
    report: ValidationReport

    @property
    def train_file(self) -> Path:
        return self.path / "train.jsonl"

    def outputs(self) -> list[Path]:
        """The snapshot's folder."""
        return [self.path]

    @property
    def eval_file(self) -> Path:
        return self.path / "eval.jsonl"


def prepare_dataset(
    data: DataConfig,
    train_file: str | os.PathLike[str],
    eval_file: str | os.PathLike[str] | None,
    out_root: str | os.PathLike[str],
    tokenizer: Tokenizer,
    num_image_tokens: int,
    system_prompt: str | None = None,
    storage: StorageConfig | None = None,
    seed: int = 0,
) -> PreparedDataset:
    """Validate the dataset files and write their snapshot under `out_root/<hash>` (reused if present).

    Records stream through (RecordChecker): each kept one is written to the snapshot as it is checked, each
    rejected one to the rejects file (`data.rejects_file`, default `out_root/rejects.jsonl`).

    Raises:
        DatasetError: every rejected record (unless `data.invalid_records` is `skip`) and every too-long one
            (when `data.max_length_policy` is `error`), all of them, not just the first.
        UserInputError: a split that would be empty; `eval_file` the training file itself (by any name).
    """
    _refuse_eval_is_train(Path(train_file), None if eval_file is None else Path(eval_file))
    sources = {"train": str(Path(train_file).resolve())}
    if eval_file is not None:
        sources["eval"] = str(Path(eval_file).resolve())
    else:
        sources["eval"] = f"{data.eval_ratio:.0%} of train, seed {seed}"
    report = ValidationReport(sources, data.max_length, data.max_length_policy, num_image_tokens)
    rejects_file = rejects_path(data, out_root)
    # The snapshot's name is its content hash, known only once everything is written: build it aside and
    # name it at the end. An existing snapshot with that hash is the same bytes and stays as it is.
    with staging_in(Path(out_root), "dataset") as stage, rejects_writer(rejects_file) as rejects:
        (stage.path / "images").mkdir()
        checker = RecordChecker(
            data, tokenizer, num_image_tokens, system_prompt, storage, rejects, stage.path / "images"
        )
        train_out, eval_out = stage.path / "train.jsonl", stage.path / "eval.jsonl"
        if eval_file is not None:
            with train_out.open("w", encoding="utf-8") as out:
                train = checker.check_file(Path(train_file), out)
            with eval_out.open("w", encoding="utf-8") as out:
                evals = checker.check_file(Path(eval_file), out)
            checker.raise_problems(report)
        else:
            everything = stage.path / "all.jsonl"
            with everything.open("w", encoding="utf-8") as out:
                kept = checker.check_file(Path(train_file), out)
            checker.raise_problems(report)
            if not len(kept):
                raise UserInputError(f"the train split has no usable records ({sources['train']})")
            train, evals = _split_file(everything, kept, data.eval_ratio, seed, train_out, eval_out)
        for name, part in (("train", train), ("eval", evals)):
            if not len(part):
                raise UserInputError(f"the {name} split has no usable records ({sources[name]})")
            report.splits[name] = part.stats(num_image_tokens, data.max_length)
            report.lengths[name] = list(part.lengths)
        content_hash = snapshot_hash(stage.path)
        (stage.path / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
        write_lengths(stage.path, length_fingerprint(tokenizer, num_image_tokens, system_prompt), report.lengths)
        final = stage.name(content_hash[:16], replace=False)
    log.info("dataset snapshot %s", final)
    log.debug("%s", report.summary())  # the caller shows the summary: logged at INFO it would show twice
    return PreparedDataset(final, content_hash, report)


def _refuse_eval_is_train(train_file: Path, eval_file: Path | None) -> None:
    """Refuse an eval file that is the training file (the same file by its links): its records would be read twice,
    trained on and then scored as held out, so the eval would measure nothing the model had not seen.

    Raises:
        UserInputError: naming data.train and data.eval as given and the fix.
    """
    if eval_file is None or train_file.resolve() != eval_file.resolve():
        return
    named = f"both {train_file}" if train_file == eval_file else f"{train_file} and {eval_file}, the same file"
    raise UserInputError(
        f"data.train and data.eval are {named}: its records would be trained on and then evaluated as held out; give "
        "data.eval a file of its own, or set it to null to hold out data.eval_ratio of data.train"
    )


def split_by_ratio(items: Sequence[T], ratio: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded split: the same items land in eval for the same seed and input order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(items) * ratio)) if ratio > 0 else 0
    eval_ids = set(order[:n_eval])
    train = [c for i, c in enumerate(items) if i not in eval_ids]
    evals = [c for i, c in enumerate(items) if i in eval_ids]
    return train, evals


def _split_file(
    everything: Path, kept: Tally, ratio: float, seed: int, train_out: Path, eval_out: Path
) -> tuple[Tally, Tally]:
    """Deal the checked records of `everything` into train and eval files by `split_by_ratio`; remove it."""
    train_ids, eval_ids = split_by_ratio(range(len(kept)), ratio, seed)
    if ratio > 0 and not train_ids:
        raise UserInputError(
            f"{counted(len(kept), 'valid record')}, and holding out data.eval_ratio {ratio:g} for eval leaves none "
            "to train on; add records, give data.eval a file of its own, or lower data.eval_ratio"
        )
    if not eval_ids:
        raise UserInputError(
            "the eval split is empty (data.eval_ratio is 0): give data.eval a file, or set data.eval_ratio > 0"
        )
    in_eval = set(eval_ids)
    with (
        everything.open(encoding="utf-8") as f,
        train_out.open("w", encoding="utf-8") as train,
        eval_out.open("w", encoding="utf-8") as evals,
    ):
        for index, line in enumerate(f):
            (evals if index in in_eval else train).write(line)
    everything.unlink()
    return kept.subset(train_ids), kept.subset(eval_ids)


def snapshot_hash(folder: Path) -> str:
    """Hash of every file's relative path and content (images are already named by their content hash)."""
    h = hashlib.sha256()
    derived = ("report.json", LENGTHS_FILE)  # written from the content, not part of it
    for path in files_under(folder, reads=lambda p: p.name not in derived):
        rel = path.relative_to(folder).as_posix()
        h.update(rel.encode())
        h.update(b"\0")
        h.update(path.name.encode() if rel.startswith("images/") else sha256_file(path).encode())
    return h.hexdigest()


def load_prepared(path: str | os.PathLike[str]) -> PreparedDataset:
    """Open an existing snapshot folder (e.g. the one a training run recorded)."""
    folder = Path(path)
    report_file = folder / "report.json"
    if not report_file.is_file():
        raise FileNotFoundError(f"{folder} is not a prepared dataset (no report.json); run `vlmops validate` first")
    data = json.loads(report_file.read_text())
    splits = {k: SplitStats(**v) for k, v in data.pop("splits").items()}
    report = ValidationReport(**data, splits=splits)
    return PreparedDataset(folder, snapshot_hash(folder), report)


def dataset_inputs(config: PipelineConfig) -> tuple[Path, Path | None]:
    """The train and eval files the config names; the demo dataset (written once) when data.train is null."""
    data = config.data
    if data.train is not None:
        return Path(data.train).expanduser(), Path(data.eval).expanduser() if data.eval else None
    demo = data.demo
    folder = Path(config.run.output_dir) / "demo-data"
    params = {
        "num_train": demo.num_train,
        "num_eval": demo.num_eval,
        "image_size": demo.image_size,
        "seed": config.run.seed,
    }
    marker = folder / "params.json"
    # Two runs starting at once on one output folder: one writes it, the other waits and reads it (a rewrite
    # swaps the folder, and a run reading it at that moment would find its files gone).
    with build_lock(folder):
        if not (marker.is_file() and json.loads(marker.read_text()) == params):
            write_demo_dataset(folder, **params)
            marker.write_text(json.dumps(params) + "\n")
    return folder / "train.jsonl", folder / "eval.jsonl"


def prepare_from_config(config: PipelineConfig, processor: Any) -> PreparedDataset:
    """Validate the configured dataset with the model's tokenizer and write its snapshot."""
    train_file, eval_file = dataset_inputs(config)
    return prepare_dataset(
        config.data,
        train_file,
        eval_file,
        Path(config.run.output_dir) / DATASETS_DIR,
        processor.tokenizer,
        int(processor.num_image_tokens),
        system_prompt=config.model.system_prompt,
        storage=config.storage,
        seed=config.run.seed,
    )
