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
from typing import IO, Any, TypeVar

from vlmops.config import DataConfig, PipelineConfig, StorageConfig
from vlmops.data.demo import write_demo_dataset
from vlmops.data.formats import DATASET_SUFFIXES, DatasetPath, dataset_files, dataset_path
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
from vlmops.folders import NAMED, files_under
from vlmops.hashing import sha256_file
from vlmops.models.template import Tokenizer
from vlmops.plural import counted
from vlmops.staging import build_lock, staging_in
from vlmops.storage import parse_s3_uri

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
    train_path: str | os.PathLike[str],
    eval_path: str | os.PathLike[str] | None,
    out_root: str | os.PathLike[str],
    tokenizer: Tokenizer,
    num_image_tokens: int,
    system_prompt: str | None = None,
    storage: StorageConfig | None = None,
    seed: int = 0,
) -> PreparedDataset:
    """Validate the dataset (`train_path`, `eval_path`: each a .json/.jsonl file or a folder of them, or an `s3://`
    object or prefix of them, whose files are read in the order `vlmops validate PATH` reads them: `dataset_files`) and
    write its snapshot under `out_root/<hash>` (reused if present). The snapshot is named by its content: the same
    records and images read from S3 or from a local copy make the same snapshot.

    Records stream through (RecordChecker): each kept one is written to the snapshot as it is checked, each
    rejected one to the rejects file (`data.rejects_file`, default `out_root/rejects.jsonl`).

    Raises:
        DatasetError: every rejected record (unless `data.invalid_records` is `skip`) and every too-long one
            (when `data.max_length_policy` is `error`), all of them, not just the first.
        FileNotFoundError: a path that does not exist, or a folder without dataset files (named by its key); an S3
            bucket or prefix that does not exist, or holds no dataset files.
        UserInputError: a split that would be empty; eval data that is (or shares files with) the training data;
            a dataset file that is a broken link; S3 credentials refused.
    """
    train, evals = dataset_path(train_path), None if eval_path is None else dataset_path(eval_path)
    train_files = _files_of("data.train", train, storage)
    eval_files = None if evals is None else _files_of("data.eval", evals, storage)
    _refuse_eval_is_train(train, train_files, evals, eval_files)
    where = {"train": str(_real(train))}  # for messages; report.json's sources list a folder's files
    sources = {"train": _source(train, train_files)}
    if evals is not None and eval_files is not None:
        where["eval"] = str(_real(evals))
        sources["eval"] = _source(evals, eval_files)
    else:
        where["eval"] = sources["eval"] = f"{data.eval_ratio:.0%} of train, seed {seed}"
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
        if eval_files is not None:
            with train_out.open("w", encoding="utf-8") as out:
                train_kept = _check_files(checker, train_files, out)
            with eval_out.open("w", encoding="utf-8") as out:
                eval_kept = _check_files(checker, eval_files, out)
            checker.raise_problems(report)
        else:
            everything = stage.path / "all.jsonl"
            with everything.open("w", encoding="utf-8") as out:
                kept = _check_files(checker, train_files, out)
            checker.raise_problems(report)
            if not len(kept):
                raise UserInputError(f"the train split has no usable records ({where['train']})")
            train_kept, eval_kept = _split_file(everything, kept, data.eval_ratio, seed, train_out, eval_out)
        for name, part in (("train", train_kept), ("eval", eval_kept)):
            if not len(part):
                raise UserInputError(f"the {name} split has no usable records ({where[name]})")
            report.splits[name] = part.stats(num_image_tokens, data.max_length)
            report.lengths[name] = list(part.lengths)
        content_hash = snapshot_hash(stage.path)
        (stage.path / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
        write_lengths(stage.path, length_fingerprint(tokenizer, num_image_tokens, system_prompt), report.lengths)
        final = stage.name(content_hash[:16], replace=False)
    log.info("dataset snapshot %s", final)
    log.debug("%s", report.summary())  # the caller shows the summary: logged at INFO it would show twice
    return PreparedDataset(final, content_hash, report)


def _files_of(key: str, path: DatasetPath, storage: StorageConfig | None) -> list[DatasetPath]:
    """The dataset files of one split's path (itself, or those its folder or prefix holds), as `vlmops validate PATH`
    reads them.

    Raises:
        FileNotFoundError, UserInputError: `dataset_files`' errors, led by the config key.
    """
    try:
        return dataset_files([path], storage)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{key}: {err}") from err
    except UserInputError as err:
        raise UserInputError(f"{key}: {err}") from err


def _real(path: DatasetPath) -> DatasetPath:
    """What a dataset path names, to compare two by: a local one with its links followed, an `s3://` one as
    `s3://bucket/key` (a trailing slash, which names the same prefix, left off)."""
    if isinstance(path, Path):
        return path.resolve()
    bucket, key = parse_s3_uri(path)
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def _is_folder(path: DatasetPath, files: list[DatasetPath]) -> bool:
    """Whether a split's path is a folder (or an S3 prefix) of files, not one file (or object)."""
    return path.is_dir() if isinstance(path, Path) else files != [_real(path)]


def _source(path: DatasetPath, files: list[DatasetPath]) -> str:
    """What report.json records as a split's source: the file, or the folder with each of its files in read order."""
    real = str(_real(path))
    if not _is_folder(path, files):
        return real  # as snapshots of a single file always said
    if isinstance(path, Path):  # by the names the folder gives them (a linked subfolder's files lead elsewhere)
        names = ", ".join(Path(file).relative_to(path).as_posix() for file in files)
    else:
        names = ", ".join(str(file)[len(real) + 1 :] for file in files)  # keys below the prefix
    return f"{real} ({counted(len(files), 'file')}: {names})"


def _check_files(checker: RecordChecker, files: list[DatasetPath], out: IO[str]) -> Tally:
    """Check the files in order into one output and one tally: a split read from a folder is one split."""
    tally = Tally()
    for file in files:
        checker.check_file(file, out, tally)
    return tally


def _refuse_eval_is_train(
    train_path: DatasetPath,
    train_files: list[DatasetPath],
    eval_path: DatasetPath | None,
    eval_files: list[DatasetPath] | None,
) -> None:
    """Refuse eval data that is the training data (the same file or folder by its links, the same S3 object or prefix
    by its bucket and key) or shares files with it (a file in both folders, the eval file inside the training folder):
    those records would be read twice, trained on and then scored as held out, so the eval would measure nothing the
    model had not seen.

    Raises:
        UserInputError: naming data.train and data.eval as given (and the files they share) and the fix.
    """
    if eval_path is None or eval_files is None:
        return
    s3 = isinstance(train_path, str)
    if _real(train_path) == _real(eval_path):
        whole = _is_folder(train_path, train_files)
        kind = ("prefix" if whole else "object") if s3 else ("folder" if whole else "file")
        named = f"both {train_path}" if train_path == eval_path else f"{train_path} and {eval_path}, the same {kind}"
        raise UserInputError(
            f"data.train and data.eval are {named}: its records would be trained on and then evaluated as held out; "
            f"give data.eval {'an' if kind == 'object' else 'a'} {kind} of its own, or set it to null to hold out "
            "data.eval_ratio of data.train"
        )
    in_train = {_real(file): file for file in train_files}
    shared = [(in_train[real], file) for file in eval_files if (real := _real(file)) in in_train]
    if not shared:
        return
    shown = ", ".join(str(e) if t == e else f"{e} (as {t})" for t, e in shared[:NAMED])
    more = f" and {len(shared) - NAMED} more" if len(shared) > NAMED else ""
    folder = "prefix" if s3 else "folder"  # files shared: both S3 objects, or both local
    if len(shared) == len(eval_files):
        fix = "give data.eval files of its own, or set it to null to hold out data.eval_ratio of data.train"
        if len(shared) < len(train_files):
            fix = f"move them out of data.train's {folder} ({train_path}), or {fix}"
    elif len(shared) == len(train_files):
        fix = f"move them out of data.eval's {folder} ({eval_path})"
    else:
        fix = f"move the shared files out of one of the two {'prefixes' if s3 else 'folders'}"
    raise UserInputError(
        f"data.train ({train_path}) and data.eval ({eval_path}) both name {counted(len(shared), 'file')}, whose records "
        f"would be trained on and then evaluated as held out: {shown}{more}; {fix}"
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


def dataset_inputs(config: PipelineConfig) -> tuple[DatasetPath, DatasetPath | None]:
    """The train and eval data the config names (each a file or a folder of them, or an `s3://` object or prefix); the
    demo dataset (written once) when data.train is null.

    Raises:
        UserInputError: data.train or data.eval a folder that holds run.output_dir or data.rejects_file.
    """
    data = config.data
    if data.train is not None:
        train, evals = dataset_path(data.train), dataset_path(data.eval) if data.eval else None
        _refuse_reading_own_writes(config, "data.train", train)
        if evals is not None:
            _refuse_reading_own_writes(config, "data.eval", evals)
        return train, evals
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
    train_path, eval_path = dataset_inputs(config)
    return prepare_dataset(
        config.data,
        train_path,
        eval_path,
        Path(config.run.output_dir) / DATASETS_DIR,
        processor.tokenizer,
        int(processor.num_image_tokens),
        system_prompt=config.model.system_prompt,
        storage=config.storage,
        seed=config.run.seed,
    )


def _refuse_reading_own_writes(config: PipelineConfig, key: str, path: DatasetPath) -> None:
    """Refuse a dataset folder that holds what the runs write: each run's snapshot (a train.jsonl), the rejects file and
    the run folders' predictions would be read back as data by the next run, growing it with copies of itself.

    Raises:
        UserInputError: naming the key, the folder, what it holds and the fix.
    """
    if isinstance(path, str) or not path.is_dir():  # an S3 prefix: the runs write to local folders
        return
    folder = path.resolve()
    output_dir = Path(config.run.output_dir).expanduser()
    rejects = rejects_path(config.data, output_dir / DATASETS_DIR)
    writes = [("run.output_dir", output_dir)]
    if rejects.suffix.lower() in DATASET_SUFFIXES:  # read as a dataset file only by its name
        writes.append(("data.rejects_file", rejects))
    for setting, written in writes:
        if written.resolve().is_relative_to(folder):
            raise UserInputError(
                f"{key} ({path}) is a folder that holds {setting} ({written}): what the runs write there would be "
                f"read back as dataset files by the next run; set {setting} outside it, or {key} to a folder that holds "
                "only the dataset"
            )
