"""Merge a LoRA run into a plain transformers checkpoint (swift's `export --merge_lora true`), and prove it.

`merge_run` merges in this process (`vlmops export`); `launch_merge` runs it in a child process
(`python -m vlmops.train.merge`), as the flow's merge step does, so a worker frees the GPU memory after.

The merged folder loads with `AutoModelForImageTextToText` / `AutoProcessor` and no peft. Every merge
is proved on a fixed batch (one sample with an image, one text-only), in float32, where merging is exact:
the merged model must give the adapter-on-base logits (the merge itself), and the folder written, loaded back
from disk, the merged model's logits once its weights are rounded to the dtype written (what was written),
each within `atol`; otherwise `MergeParityError` is raised and nothing is published. A full-mode run has no
adapter: its "merge" exports final/ as the model, with the second check.

Why not compare in 16 bits: in bfloat16 a correct merge moves a real-size model's logits by a few percent of their
range, the same order as losing the whole adapter (`bench/merge_parity_probe.py`, the 1.3b architecture with random
weights and a trained-size adapter, on the CPU: 0.156 against 0.434, where the logits reach ~5; the old 16-bit
tolerance was 5e-2), so no tolerance passes a good merge and still catches a wrong one. In float32 the merge shows
1.2e-5 and the folder written in bf16, loaded back, exactly the merged weights rounded to bf16.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vlmops import quiet
from vlmops.errors import RunFailed, UserInputError
from vlmops.models.loading import default_device, load_processor, resolve_dtype, safe_weights
from vlmops.scratch import held_folder
from vlmops.staging import staged_folder
from vlmops.train.child import run_child
from vlmops.train.rundir import CONFIG_FILE, RUN_INFO, TrainedRun, open_run

log = logging.getLogger(__name__)

PARITY_QUESTION = "What colour is the shape?"
PARITY_TEXT = "Which shapes can appear?"


class MergeParityError(RunFailed):
    """The merged model's logits differ from the adapter-on-base logits by more than the tolerance."""

    def __init__(self, max_abs_diff: float, atol: float, where: str):
        self.max_abs_diff = max_abs_diff
        self.atol = atol
        self.where = where
        super().__init__(
            f"merge parity check failed for {where}: max logit difference {max_abs_diff:.3g} (float32) > "
            f"merge.parity_atol {atol:.3g}. The merged weights do not reproduce the trained model; nothing was "
            "published. Check the base model matches run.json."
        )


class MergeFailed(RunFailed):
    """The merge process exited with an error other than a failed parity check."""

    def __init__(self, returncode: int, log_tail: str, log_file: Path):
        self.returncode = returncode
        self.log_tail = log_tail
        self.log_file = log_file
        super().__init__(
            f"merge failed (exit code {returncode}); its whole output is in {log_file}; last lines:\n{log_tail}"
        )


@dataclass
class MergeResult:
    path: Path
    max_abs_diff: float
    atol: float
    adapter: bool
    """True when a LoRA adapter was merged; False for a full-mode run exported as is."""
    task_run_id: str = ""
    """The orchestrator's task run that merged (the retrain flow's merge step sets it; empty for `vlmops export`). A
    result reused from the cache keeps it, a merge run again gets a new one: the registration's name for this merged
    model (flows/retrain.py `MERGE_TAG`)."""

    def outputs(self) -> list[Path]:
        """The merged model's folder."""
        return [self.path]


PARITY_ATOL = 1e-3
"""The largest logit difference a merge may show, in float32 (merge.parity_atol: null)."""


def parity_batch(processor: Any) -> dict[str, torch.Tensor]:
    """A fixed batch: one prompt with an image (a deterministic pattern) and one text-only prompt."""
    import numpy as np
    from PIL import Image

    from vlmops.conversation import ImageRef, Message
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
    from vlmops.train.data import PIXEL_KEYS

    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(device) for k, v in batch.items()}
    for key in PIXEL_KEYS:
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    logits = model(**inputs).logits.float()
    return logits[inputs["attention_mask"].bool()].cpu()


def load_plain(model_dir: Path, dtype: torch.dtype, device: torch.device, allow_pickle: bool = False) -> Any:
    """A checkpoint through transformers alone (no peft), as a user of the merged model would load it."""
    from transformers import AutoModelForImageTextToText

    model: Any = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=dtype, **safe_weights(model_dir, allow_pickle)
    )
    return model.to(device)


def adapter_on_base(run: TrainedRun, dtype: torch.dtype, device: torch.device) -> Any:
    """The trained model as training left it: the base checkpoint with the run's adapter applied."""
    from peft import PeftModel

    allow_pickle = run.config.model.allow_pickle
    base = load_plain(Path(run.info.base_model), dtype, device, allow_pickle)
    safe_weights(run.weights, allow_pickle)  # peft falls back to adapter_model.bin: refuse it the same way
    return PeftModel.from_pretrained(base, str(run.weights))


def check_parity(
    merged_dir: Path, reference: torch.Tensor, batch: dict[str, torch.Tensor], atol: float, device: torch.device
) -> float:
    """Load the merged folder with transformers alone, in float32, and compare its logits with `reference`.

    Returns the max abs difference; raises MergeParityError above `atol`.
    """
    merged = load_plain(merged_dir, torch.float32, device)
    diff = _within(batch_logits(merged, batch), reference, atol, str(merged_dir))
    del merged
    return diff


def _within(logits: torch.Tensor, reference: torch.Tensor, atol: float, where: str) -> float:
    """The max abs difference of two logit tensors; MergeParityError above `atol` (NaN too)."""
    diff = float((logits - reference).abs().max())
    log.info("merge parity: max |merged - reference| = %.3g (atol %.3g; %s)", diff, atol, where)
    if not diff <= atol:
        raise MergeParityError(diff, atol, where)
    return diff


def round_weights(model: Any, dtype: torch.dtype) -> None:
    """Round what a checkpoint of `model` holds (its parameters and persistent buffers) to the values `dtype` can
    hold, in place, each tensor keeping its own dtype. Not `model.to(dtype)` and back: that would also round buffers
    no checkpoint holds, which a load computes afresh (rotary frequencies among them), and the folder would then not
    reproduce the model it is compared with (by 0.047 on the 1.3b architecture in the probe)."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype))


@contextmanager
def _exact_float32() -> Iterator[None]:
    """float32 matmuls and convolutions in full float32 (no TF32 on the GPU) while the parity is measured."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def merge_run(run_dir_or_ckpt: Path, out_dir: Path, atol: float | None = None, dtype: str = "auto") -> MergeResult:
    """Merge a run's adapter (final/, or the given checkpoint) into its base in float32; write `out_dir` in `dtype`;
    prove both steps (the module docstring).

    `dtype` as model.dtype (`resolve_dtype`: "auto" is bfloat16 on GPUs that have it, float16 on older GPUs,
    float32 on CPU). `atol` None: the run's merge.parity_atol, else 1e-3.
    """
    run = open_run(run_dir_or_ckpt)
    out_dir = Path(out_dir).resolve()
    check_merge_target(out_dir)
    base = Path(run.info.base_model)
    device = default_device()
    written_dtype = resolve_dtype(dtype, device)
    tolerance = atol if atol is not None else run.config.merge.parity_atol
    tolerance = tolerance if tolerance is not None else PARITY_ATOL
    has_processor = (run.weights / "processor_config.json").is_file()
    processor = load_processor(run.weights if has_processor else base)
    batch = parity_batch(processor)

    with staged_folder(out_dir) as staging, _exact_float32():
        merge_diff = 0.0
        if run.is_adapter:
            model = adapter_on_base(run, torch.float32, device)
            reference = batch_logits(model, batch)
            model = model.merge_and_unload()
            merge_diff = _within(batch_logits(model, batch), reference, tolerance, f"merging {run.weights}")
            del reference
        else:
            model = load_plain(run.weights, torch.float32, device, run.config.model.allow_pickle)
        round_weights(model, written_dtype)
        written = batch_logits(model, batch)  # the weights as written, computed in float32
        model.to(written_dtype).save_pretrained(staging)
        del model
        processor.save_pretrained(staging)
        shutil.copy2(run.root / CONFIG_FILE, staging / CONFIG_FILE)
        replace(run.info, merged_from=str(run.weights.resolve())).write(staging)
        diff = max(merge_diff, check_parity(staging, written, batch, tolerance, device))
    log.info("merged %s into %s (max logit difference %.3g, float32)", run.weights, out_dir, diff)
    return MergeResult(out_dir, diff, tolerance, run.is_adapter)


def check_merge_target(out_dir: Path) -> None:
    """Refuse an `out_dir` that holds something other than a merged model: the merged model is written as that
    folder, replacing it whole, not into it (`--out outputs/runs` deleted every run folder there).

    Raises:
        UserInputError: `out_dir` is a file, or a non-empty folder without a merged model's run.json.
    """
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    info = out_dir / RUN_INFO
    if info.is_file() and json.loads(info.read_text()).get("merged_from"):
        return  # an earlier merge: written again
    raise UserInputError(
        f"{out_dir} exists and is not a merged model (no {RUN_INFO} with merged_from): the merged model is written "
        "as that folder, replacing everything in it; pass a new folder (e.g. --out "
        f"{out_dir / 'merged'}), or leave --out out for <ckpt>-merged"
    )


def default_export_dir(ckpt: Path) -> Path:
    """`RUN_DIR-merged` / `checkpoint-N-merged`, beside the source, as swift names it."""
    source = ckpt.resolve()
    return source.with_name(f"{source.name}-merged")


def launch_merge(run_dir_or_ckpt: Path, out_dir: Path, atol: float | None = None, dtype: str = "auto") -> MergeResult:
    """`merge_run` in a child process of its own process group; its output is appended to `<out_dir>.log`.

    Raises MergeParityError as `merge_run` does, MergeFailed when the child fails otherwise.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log_file = out_dir.with_name(f"{out_dir.name}.log")
    # Held while the child merges: the next merge into this folder removes those of merges killed outright.
    with held_folder(".merge-", out_dir.parent) as tmp:
        result_file = tmp / "result.json"
        command = [
            sys.executable,
            "-m",
            "vlmops.train.merge",
            str(run_dir_or_ckpt),
            str(out_dir),
            "--dtype",
            dtype,
            "--result-file",
            str(result_file),
        ]
        if atol is not None:
            command += ["--atol", repr(atol)]
        returncode, tail = run_child(command, log_file)
        outcome = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if "parity_error" in outcome:
        raise MergeParityError(**outcome["parity_error"])
    if returncode != 0 or "result" not in outcome:
        raise MergeFailed(returncode, tail, log_file)
    fields = outcome["result"]
    return MergeResult(**{**fields, "path": Path(fields["path"])})


def main(argv: list[str] | None = None) -> int:
    """Entry point of the merge child: merge, then write the result (or the parity failure) as JSON."""
    parser = argparse.ArgumentParser(prog="python -m vlmops.train.merge", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder or checkpoint to merge")
    parser.add_argument("out", help="folder to write the merged model to")
    parser.add_argument("--atol", type=float, help="parity tolerance (default: the run's merge.parity_atol)")
    parser.add_argument("--dtype", default="auto", help="model.dtype to merge in")
    parser.add_argument("--result-file", required=True, help="where to write the result as JSON")
    args = parser.parse_args(argv)
    quiet.child_logging()
    result_file = Path(args.result_file)
    try:
        result = merge_run(Path(args.run), Path(args.out), atol=args.atol, dtype=args.dtype)
    except MergeParityError as err:
        error = {"max_abs_diff": err.max_abs_diff, "atol": err.atol, "where": err.where}
        result_file.write_text(json.dumps({"parity_error": error}))
        raise
    result_file.write_text(json.dumps({"result": {**asdict(result), "path": str(result.path)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
