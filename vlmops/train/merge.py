"""Merge a LoRA run into a plain transformers checkpoint (swift's `export --merge_lora true`), and prove it.

The merged folder loads with `AutoModelForImageTextToText` / `AutoProcessor` and no peft. Every merge
ends with a parity check: the merged model, loaded back from disk, must give the same logits as the
adapter on its base on a fixed batch (one sample with an image, one text-only), within `atol`;
otherwise `MergeParityError` is raised and nothing is published. A full-mode run has no adapter: its
"merge" exports final/ as the model, checked the same way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vlmops.errors import RunFailed
from vlmops.models.loading import DTYPES, default_device
from vlmops.staging import staged_folder
from vlmops.train.rundir import CONFIG_FILE, TrainedRun, open_run, run_config

log = logging.getLogger(__name__)

PARITY_QUESTION = "What colour is the shape?"
PARITY_TEXT = "Which shapes can appear?"
# Files of a training folder that are not part of a model.
NOT_MODEL_FILES = {"training_args.bin", "optimizer.pt", "scheduler.pt", "trainer_state.json", "README.md"}


class MergeParityError(RunFailed):
    """The merged model's logits differ from the adapter-on-base logits by more than the tolerance."""

    def __init__(self, max_abs_diff: float, atol: float, where: str):
        self.max_abs_diff = max_abs_diff
        self.atol = atol
        super().__init__(
            f"merge parity check failed for {where}: max |merged - adapter-on-base| logit difference "
            f"{max_abs_diff:.3g} > merge.parity_atol {atol:.3g}. The merged weights do not reproduce the trained "
            "model; nothing was published. Check the base model matches run.json, or merge in float32 (dtype)."
        )


@dataclass
class MergeResult:
    path: Path
    max_abs_diff: float
    atol: float
    adapter: bool
    """True when a LoRA adapter was merged; False for a full-mode run exported as is."""


def default_atol(dtype: torch.dtype) -> float:
    """1e-3 for float32 weights, 5e-2 for 16-bit ones."""
    return 1e-3 if dtype == torch.float32 else 5e-2


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a checkpoint's weights were saved in (config.json), float32 when it does not say."""
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name), torch.float32)


def parity_batch(processor: Any) -> dict[str, torch.Tensor]:
    """A fixed batch: one prompt with an image (a deterministic pattern) and one text-only prompt."""
    import numpy as np
    from PIL import Image

    from vlmops.data.conversation import ImageRef, Message
    from vlmops.models.template import encode
    from vlmops.train.data import VisionLanguageCollator

    pixels = np.random.default_rng(0).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    tokenizer, n = processor.tokenizer, int(processor.num_image_tokens)
    with_image = encode(
        [Message("user", [ImageRef("parity"), PARITY_QUESTION])], tokenizer, n, add_generation_prompt=True
    )
    text_only = encode([Message("user", [PARITY_TEXT])], tokenizer, n, add_generation_prompt=True)
    features = processor.image_processor([image], return_tensors="pt")
    samples: list[dict[str, torch.Tensor]] = [
        {"input_ids": torch.tensor(with_image.input_ids), "labels": torch.tensor(with_image.labels)},
        {"input_ids": torch.tensor(text_only.input_ids), "labels": torch.tensor(text_only.labels)},
    ]
    samples[0].update({k: v for k, v in features.items() if k.endswith("pixel_values")})
    batch = VisionLanguageCollator(pad_token_id=tokenizer.pad_token_id)(samples)
    batch.pop("labels")
    return batch


@torch.no_grad()
def batch_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 logits at the batch's real (non-padding) positions."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(device) for k, v in batch.items()}
    for key in ("pixel_values", "high_res_pixel_values"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    logits = model(**inputs).logits.float()
    return logits[inputs["attention_mask"].bool()].cpu()


def load_plain(model_dir: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """A checkpoint through transformers alone (no peft), as a user of the merged model would load it."""
    from transformers import AutoModelForImageTextToText

    model: Any = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
    return model.to(device)


def adapter_on_base(run: TrainedRun, dtype: torch.dtype, device: torch.device) -> Any:
    """The trained model as training left it: the base checkpoint with the run's adapter applied."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_plain(Path(run.info.base_model), dtype, device), str(run.weights))


def check_parity(
    merged_dir: Path, reference: torch.Tensor, batch: dict[str, torch.Tensor], atol: float, device: torch.device
) -> float:
    """Load the merged folder with transformers alone and compare its logits with `reference`.

    Returns the max abs difference; raises MergeParityError above `atol`.
    """
    merged = load_plain(merged_dir, checkpoint_dtype(merged_dir), device)
    diff = float((batch_logits(merged, batch) - reference).abs().max())
    del merged
    log.info("merge parity: max |merged - reference| = %.3g (atol %.3g)", diff, atol)
    if not diff <= atol:  # NaN fails too
        raise MergeParityError(diff, atol, str(merged_dir))
    return diff


def merge_run(run_dir_or_ckpt: Path, out_dir: Path, atol: float | None = None, dtype: str = "auto") -> MergeResult:
    """Merge a run's adapter (final/, or the given checkpoint) into its base; write `out_dir`; check parity.

    `dtype` "auto" keeps the base checkpoint's dtype. `atol` None: the run's merge.parity_atol, else
    1e-3 for float32 and 5e-2 for 16-bit weights.
    """
    from transformers import AutoProcessor

    run = open_run(run_dir_or_ckpt)
    out_dir = Path(out_dir).resolve()
    base = Path(run.info.base_model)
    torch_dtype = checkpoint_dtype(base) if dtype == "auto" else DTYPES[dtype]
    tolerance = atol if atol is not None else run.config.merge.parity_atol
    tolerance = tolerance if tolerance is not None else default_atol(torch_dtype)
    device = default_device()
    has_processor = (run.weights / "processor_config.json").is_file()
    processor = AutoProcessor.from_pretrained(run.weights if has_processor else base)
    batch = parity_batch(processor)

    with staged_folder(out_dir) as staging:
        if run.is_adapter:
            model = adapter_on_base(run, torch_dtype, device)
            reference = batch_logits(model, batch)
            merged = model.merge_and_unload()
            merged.save_pretrained(staging)
            del model, merged
        else:
            model = load_plain(run.weights, torch_dtype, device)
            reference = batch_logits(model, batch)
            model.save_pretrained(staging)
            del model
        processor.save_pretrained(staging)
        shutil.copy2(run.root / CONFIG_FILE, staging / CONFIG_FILE)
        replace(run.info, merged_from=str(run.weights.resolve())).write(staging)
        diff = check_parity(staging, reference, batch, tolerance, device)
    log.info("merged %s into %s (max logit difference %.3g)", run.weights, out_dir, diff)
    return MergeResult(out_dir, diff, tolerance, run.is_adapter)


def verify_merged(
    merged_dir: Path, run_dir_or_ckpt: Path, atol: float | None = None, device: torch.device | None = None
) -> float:
    """Check an existing merged folder against the run it came from (adapter on base, or final/)."""
    from transformers import AutoProcessor

    run = open_run(run_dir_or_ckpt)
    merged_dir = Path(merged_dir)
    dev = device or default_device()
    dtype = checkpoint_dtype(merged_dir)
    batch = parity_batch(AutoProcessor.from_pretrained(merged_dir))
    model = adapter_on_base(run, dtype, dev) if run.is_adapter else load_plain(run.weights, dtype, dev)
    reference = batch_logits(model, batch)
    del model
    tolerance = atol if atol is not None else run.config.merge.parity_atol or default_atol(dtype)
    return check_parity(merged_dir, reference, batch, tolerance, dev)


def default_export_dir(ckpt: Path) -> Path:
    """`RUN_DIR-merged` / `checkpoint-N-merged`, beside the source, as swift names it."""
    source = ckpt.resolve()
    return source.with_name(f"{source.name}-merged")


def export_command(
    ckpt: str,
    merge_lora: bool,
    out: str | None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
) -> int:
    """`vlmops export --ckpt RUN_DIR [--merge-lora] [--out DIR] [--config FILE] [--set k=v]`; prints a summary.

    The merge settings (merge.parity_atol, model.dtype) come from `--config`, else the run's saved config,
    as the retrain flow takes them from its config.
    """
    try:
        run = open_run(ckpt)
        if run.is_adapter and not merge_lora:
            print(
                f"error: {run.weights} is a LoRA adapter; pass --merge-lora to merge it into its base model",
                file=sys.stderr,
            )
            return 2
        config = run_config(ckpt, config_path, overrides or [])
        target = Path(out) if out else default_export_dir(Path(ckpt))
        result = merge_run(Path(ckpt), target, atol=config.merge.parity_atol, dtype=config.model.dtype)
    except MergeParityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    what = "merged LoRA adapter into" if result.adapter else "exported full model to"
    print(f"{what} {result.path}")
    print(f"parity: max |logit difference| {result.max_abs_diff:.3g} (tolerance {result.atol:.3g})")
    print(
        f"load it with AutoModelForImageTextToText.from_pretrained({os.fspath(result.path)!r}), or vlmops infer --ckpt"
    )
    return 0
