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
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlmops.config import DataConfig, PipelineConfig, StorageConfig
from vlmops.conversation import Conversation
from vlmops.data.demo import write_demo_dataset
from vlmops.data.formats import DatasetError, RecordProblem, read_dataset, write_conversations
from vlmops.data.images import ImageLoadError, open_image_bytes, read_image_bytes
from vlmops.data.length import LENGTHS_FILE, MaxLength, length_fingerprint, write_lengths
from vlmops.hashing import sha256_file
from vlmops.models.template import Tokenizer, encode
from vlmops.staging import staging_in

log = logging.getLogger(__name__)


@dataclass
class SplitStats:
    """Counts and token-length statistics of one split (lengths include the image tokens)."""

    records: int = 0
    turns: int = 0
    images: int = 0
    text_only_records: int = 0
    multi_turn_records: int = 0
    multi_image_records: int = 0
    image_tokens: int = 0
    tokens_min: int = 0
    tokens_mean: float = 0.0
    tokens_p50: int = 0
    tokens_p95: int = 0
    tokens_max: int = 0
    over_max_length: int = 0


@dataclass
class ValidationReport:
    """What validation found; written as report.json beside the snapshot and logged to MLflow."""

    sources: dict[str, str]
    max_length: int
    max_length_policy: str
    num_image_tokens: int
    splits: dict[str, SplitStats] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    dropped_too_long: list[str] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("lengths")
        return data

    def summary(self) -> str:
        lines = []
        for name, s in self.splits.items():
            lines.append(
                f"{name}: {s.records} records ({s.multi_turn_records} multi-turn, {s.multi_image_records} multi-image, "
                f"{s.text_only_records} text-only), {s.images} images; tokens min/p50/p95/max "
                f"{s.tokens_min}/{s.tokens_p50}/{s.tokens_p95}/{s.tokens_max} (incl. {self.num_image_tokens} per image)"
            )
        if self.rejected:
            lines.append(f"rejected: {len(self.rejected)} record(s), listed in report.json")
        if self.dropped_too_long:
            lines.append(f"dropped (longer than {self.max_length} tokens): {len(self.dropped_too_long)}")
        return "\n".join(lines)


@dataclass
class PreparedDataset:
    """A dataset snapshot on disk."""

    path: Path
    content_hash: str
    report: ValidationReport

    @property
    def train_file(self) -> Path:
        return self.path / "train.jsonl"

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

    Raises DatasetError listing every rejected record (unless `data.invalid_records` is `skip`) and every
    too-long record (when `data.max_length_policy` is `error`).
    """
    sources = {"train": str(Path(train_file).resolve())}
    train_read = read_dataset(train_file)
    problems = list(train_read.problems)
    train = train_read.conversations
    if eval_file is not None:
        sources["eval"] = str(Path(eval_file).resolve())
        eval_read = read_dataset(eval_file)
        problems += eval_read.problems
        evals = eval_read.conversations
    else:
        train, evals = split_by_ratio(train, data.eval_ratio, seed)
        sources["eval"] = f"{data.eval_ratio:.0%} of train, seed {seed}"
    report = ValidationReport(sources, data.max_length, data.max_length_policy, num_image_tokens)
    image_names: dict[str, str] = {}
    # The snapshot's name is its content hash, known only once everything is written: build it aside and
    # name it at the end. An existing snapshot with that hash is the same bytes and stays as it is.
    with staging_in(Path(out_root), "dataset") as stage:
        (stage.path / "images").mkdir()
        splits = {}
        for name, conversations in (("train", train), ("eval", evals)):
            splits[name] = _check_records(
                name,
                conversations,
                problems,
                report,
                tokenizer,
                num_image_tokens,
                system_prompt,
                data,
                stage.path / "images",
                image_names,
                storage,
            )
        if problems:
            report.rejected = [asdict(p) for p in problems]
            if data.invalid_records == "error":
                raise DatasetError(problems, "fix these records, or set data.invalid_records: skip to leave them out")
            log.warning("left out %d invalid record(s); see report.json", len(problems))
        if not splits["train"] or not splits["eval"]:
            empty = "train" if not splits["train"] else "eval"
            raise ValueError(f"the {empty} split has no usable records ({sources[empty]})")
        write_conversations(stage.path / "train.jsonl", splits["train"], image_names)
        write_conversations(stage.path / "eval.jsonl", splits["eval"], image_names)
        content_hash = snapshot_hash(stage.path)
        (stage.path / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
        write_lengths(stage.path, length_fingerprint(tokenizer, num_image_tokens, system_prompt), report.lengths)
        final = stage.name(content_hash[:16], replace=False)
    log.info("dataset snapshot %s\n%s", final, report.summary())
    return PreparedDataset(final, content_hash, report)


def split_by_ratio(
    conversations: list[Conversation], ratio: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """A seeded split: the same records land in eval for the same seed and input order."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(conversations) * ratio)) if ratio > 0 else 0
    eval_ids = set(order[:n_eval])
    train = [c for i, c in enumerate(conversations) if i not in eval_ids]
    evals = [c for i, c in enumerate(conversations) if i in eval_ids]
    return train, evals


def _check_records(
    split: str,
    conversations: list[Conversation],
    problems: list[RecordProblem],
    report: ValidationReport,
    tokenizer: Tokenizer,
    num_image_tokens: int,
    system_prompt: str | None,
    data: DataConfig,
    image_dir: Path,
    image_names: dict[str, str],
    storage: StorageConfig | None,
) -> list[Conversation]:
    stats = SplitStats()
    policy = MaxLength.for_tokenizer(data.max_length, data.max_length_policy, tokenizer, num_image_tokens)
    lengths: list[int] = []
    kept: list[Conversation] = []
    too_long: list[RecordProblem] = []
    for conv in tqdm(conversations, desc=f"validate {split}", unit="rec", leave=False):
        try:
            for image in conv.images:
                if image.uri not in image_names:
                    image_names[image.uri] = _store_image(image.uri, image_dir, storage)
        except ImageLoadError as err:
            problems.append(RecordProblem(conv.source, "image", str(err)))
            continue
        enc = encode(conv.messages, tokenizer, num_image_tokens, system_prompt)
        length = len(enc)
        check = policy.check(length, enc)
        if length > data.max_length:
            stats.over_max_length += 1
        if check.problem is not None:
            too_long.append(RecordProblem(conv.source, "(length)", check.problem))
            continue
        if check.dropped:
            report.dropped_too_long.append(conv.source)
            continue
        kept.append(conv)
        lengths.append(length)
        n_images = len(conv.images)
        stats.records += 1
        stats.turns += sum(1 for m in conv.messages if m.role == "user")
        stats.images += n_images
        stats.image_tokens += n_images * num_image_tokens
        stats.text_only_records += n_images == 0
        stats.multi_image_records += n_images > 1
        stats.multi_turn_records += sum(1 for m in conv.messages if m.role == "user") > 1
    if too_long:
        raise DatasetError(too_long, policy.hint())
    if lengths:
        ordered = sorted(lengths)
        stats.tokens_min, stats.tokens_max = ordered[0], ordered[-1]
        stats.tokens_mean = round(statistics.fmean(ordered), 1)
        stats.tokens_p50 = ordered[len(ordered) // 2]
        stats.tokens_p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    report.splits[split] = stats
    report.lengths[split] = lengths
    return kept


def _store_image(uri: str, image_dir: Path, storage: StorageConfig | None) -> str:
    """Check the image opens; keep its bytes under a content-hash name; return its snapshot-relative path."""
    data = read_image_bytes(uri, storage)
    open_image_bytes(data, uri)
    digest = hashlib.sha256(data).hexdigest()
    if uri.startswith("data:"):
        suffix = "." + uri[len("data:image/") : uri.index(";")] if uri.startswith("data:image/") else ".img"
    else:
        suffix = Path(uri.split("?")[0]).suffix.lower() or ".img"
    target = image_dir / f"{digest[:24]}{suffix}"
    if not target.exists():
        # A copy, never a hardlink to the user's file: an edit to that file would change a snapshot named by
        # its content, and DVC (which hardlinks the snapshot into its cache) makes cached files read-only.
        target.write_bytes(data)
    return f"images/{target.name}"


def snapshot_hash(folder: Path) -> str:
    """Hash of every file's relative path and content (images are already named by their content hash)."""
    h = hashlib.sha256()
    derived = ("report.json", LENGTHS_FILE)  # written from the content, not part of it
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in derived):
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
        Path(config.run.output_dir) / "datasets",
        processor.tokenizer,
        int(processor.num_image_tokens),
        system_prompt=config.model.system_prompt,
        storage=config.storage,
        seed=config.run.seed,
    )
