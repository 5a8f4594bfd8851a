"""Convert an original DeepSeek-VL release checkpoint to transformers' native classes, once.

The release (ModelScope `deepseek-ai/deepseek-vl-*`, `config.json` with `model_type: multi_modality`, see
`original_layout`) becomes a folder that `DeepseekVLForConditionalGeneration` (1.3b) or
`DeepseekVLHybridForConditionalGeneration` (7b) loads with no missing or unexpected keys, plus its processor
(tokenizer, image processor, the `deepseek` chat template). Key mapping: DESIGN.md §5.

Tensors are streamed one at a time from the input shards into output shards of `max_shard_bytes`, so a 7b
conversion holds one output shard in RAM, not the model twice. Everything is written into a staging folder
beside `dst` and renamed into place at the end: a crash leaves no folder a rerun would trust.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmops.models.convert_config import native_config, release_arch, write_generation_config
from vlmops.models.convert_keys import DROPPED_KEYS, convert_tensor, map_original_key
from vlmops.models.convert_processor import CHAT_TEMPLATE, build_processor, build_tokenizer
from vlmops.models.convert_weights import ShardWriter, iter_tensors, weight_files
from vlmops.models.diskspace import check_free_space, raise_if_disk_full
from vlmops.models.layout import Arch, ConversionError, detect_layout, read_json
from vlmops.models.loading import safe_weights
from vlmops.plural import counted
from vlmops.staging import staged_folder

# Callers import the conversion's public names from here, wherever they live.
__all__ = [
    "CHAT_TEMPLATE",
    "DROPPED_KEYS",
    "ConversionError",
    "ConversionReport",
    "OutputExistsError",
    "convert_checkpoint",
    "convert_tensor",
    "detect_layout",
    "map_original_key",
    "verify_native_checkpoint",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3


class OutputExistsError(ConversionError, FileExistsError):
    """The output folder of a conversion exists already (a FileExistsError too, as a rename race raises)."""


@dataclass
class ConversionReport:
    """What a conversion did."""

    src: Path
    dst: Path
    arch: Arch
    tensors_in: int = 0
    tensors_out: int = 0
    dropped: list[str] = field(default_factory=list)
    shards: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    verify: bool = True,
    allow_pickle: bool = False,
) -> ConversionReport:
    """Convert an original-layout checkpoint folder `src` into a new native folder `dst`.

    Args:
        max_shard_bytes: largest output shard; a model above it is written sharded with an index.
        verify: load the result with the native class and refuse it unless no key is missing or unexpected.

    Raises:
        OutputExistsError: `dst` exists (delete it or pick another folder).
        ConversionError: the checkpoint does not fit the release layout; the message names the file/key.
        DiskFullError: not enough disk space (an OSError, errno ENOSPC; the message says how much).
    """
    src_dir, dst_dir = Path(src), Path(dst)
    started = time.perf_counter()
    if detect_layout(src_dir) != "original":
        raise ConversionError(f"{src_dir} is already a native transformers checkpoint: load it as is")
    if dst_dir.exists():
        raise OutputExistsError(f"{dst_dir} already exists: delete it or choose another output folder")
    original = read_json(src_dir / "config.json")
    arch = release_arch(original, src_dir / "config.json")
    weights = weight_files(src_dir, allow_pickle)
    check_free_space(dst_dir.parent, sum(f.stat().st_size for f in weights), f"converting into {dst_dir}")

    # Config and tokenizer first: a config the native classes cannot hold fails before any weight is read.
    tokenizer = build_tokenizer(src_dir, original)
    config = native_config(original, tokenizer, arch, src_dir / "config.json")

    report = ConversionReport(src=src_dir, dst=dst_dir, arch=arch)
    try:
        with staged_folder(dst_dir) as staging:
            writer = ShardWriter(staging, max_shard_bytes)
            dtype: torch.dtype | None = None
            for key, tensor in iter_tensors(weights):
                report.tensors_in += 1
                converted = convert_tensor(key, tensor, arch)
                if not converted:
                    report.dropped.append(key)
                for name, value in converted:
                    dtype = dtype or value.dtype
                    writer.add(name, value)
            report.tensors_out, report.shards, report.bytes_written = writer.finish()
            config.dtype = dtype or torch.float32  # as stored: bf16 for the release, never silently widened
            config.save_pretrained(staging)
            write_generation_config(staging, tokenizer)
            build_processor(src_dir, original, tokenizer, arch).save_pretrained(staging)
            (staging / "vlmops_model.json").write_text(
                json.dumps({"kind": "converted", "arch": arch, "source_layout": "multi_modality"}, indent=2) + "\n"
            )
            if verify:
                verify_native_checkpoint(staging, arch)
    except OSError as err:
        raise_if_disk_full(err, dst_dir.parent, "converting")
        raise
    report.seconds = time.perf_counter() - started
    log.info(
        "converted %s -> %s: %d tensors in, %d out, %d dropped, %s, %.1fs",
        src_dir,
        dst_dir,
        report.tensors_in,
        report.tensors_out,
        len(report.dropped),
        counted(report.shards, "shard"),
        report.seconds,
    )
    return report


def verify_native_checkpoint(path: str | os.PathLike[str], arch: Arch) -> None:
    """Load `path` with the native class; raise unless every key matched exactly."""
    from transformers import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration

    model_cls = (
        DeepseekVLForConditionalGeneration if arch == "deepseek_vl" else DeepseekVLHybridForConditionalGeneration
    )
    try:
        # output_loading_info=True makes it return (model, info)
        model, info = model_cls.from_pretrained(  # type: ignore[misc]
            path, output_loading_info=True, dtype="auto", **safe_weights(path)
        )
    except RuntimeError as err:  # shape mismatches
        raise ConversionError(f"the converted checkpoint does not load into {model_cls.__name__}: {err}") from err
    del model
    problems = {
        k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if problems:
        detail = "; ".join(
            f"{k}: {', '.join(map(str, v[:8]))}{' ...' if len(v) > 8 else ''}" for k, v in problems.items()
        )
        raise ConversionError(
            f"the converted checkpoint does not match {model_cls.__name__} ({detail}). "
            "The source config.json and its weights disagree, or this transformers version changed the "
            "layout; report it with both."
        )
