"""The HF Trainer, adapted for DeepSeek-VL runs: checkpoints marked complete, a vision pass on every step,
live metrics.

- The Trainer writes its checkpoints itself (`checkpoint-N/`: weights, optimizer, RNG, trainer_state.json).
  `CompleteCheckpoints` then adds config.yaml and run.json and, once every rank has saved, the completion
  marker, last; resume trusts only marked checkpoints, so a kill mid-save never leaves one that looks
  complete. Rotation keeps `train.save_total_limit` checkpoints plus the latest (to resume) and the best
  (lowest eval loss).
- Every step runs the vision tower(s), even on a text-only batch (see `VLTrainer.compute_loss`).
- A logging step's loss and grad norm are read back one logging step later (`LaggedLog`): the Trainer's own
  read-back makes the host wait for the GPU to finish the step, and the GPU then idles while the host
  prepares the next one. Logs keep their own step, epoch and token count; evaluation, saving and the
  run's end publish what is pending first.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from vlmops.models.pixels import DevicePixels
from vlmops.models.template import IGNORE_INDEX
from vlmops.models.vision_graphs import image_features
from vlmops.staging import STAGING_PREFIX, publish_folder, sync_entries, sync_files, write_text_atomic
from vlmops.train.data import PIXEL_KEYS, next_token_targets
from vlmops.train.packing import REAL_TOKENS_KEY, STEP_KEYS, TRAINED_INDEX_KEY, TRAINED_TARGETS_KEY
from vlmops.train.rundir import COMPLETE_MARKER, METRICS_FILE, TRAINER_STATE, checkpoints

log = logging.getLogger(__name__)

# What a checkpoint holds beside the model: optimizer, scheduler, RNG and DeepSpeed state.
TRAINING_STATE_FILES = (
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    TRAINER_STATE,
    "global_step*",
    "latest",
    "zero_to_fp32.py",
    COMPLETE_MARKER,
)


def vision_language_core(model: Any) -> Any:
    """The inner `DeepseekVL(Hybrid)Model` (vision tower, aligner, LLM) under peft / DeepSpeed wrappers."""
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model.model


def trained_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model kwargs that compute logits only where some sample of the batch has a next token to learn.

    The LM head over a 102k vocabulary, and its float32 copy in the loss, is the largest activation of a
    step (7b, batch 4 x 1088 tokens: ~1.8 GB in float32, twice with its gradient); prompts and images
    carry no loss, so those positions are skipped. `shift_labels` are the matching next-token targets;
    the loss and its normalisation (`num_items_in_batch`) are unchanged.
    """
    shifted = next_token_targets(labels)
    keep = shifted.ne(IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    if keep.numel() == 0:  # nothing to learn in this batch: let the model compute its usual (zero-weight) loss
        return {}
    return {"logits_to_keep": keep, "shift_labels": shifted[:, keep].contiguous()}


def rotate_checkpoints(run_dir: Path, keep: int, best: str | None) -> list[Path]:
    """Delete the oldest checkpoints beyond `keep`, never the latest nor the best; returns the deleted ones."""
    ordered = checkpoints(run_dir)
    protected = set(ordered[-1:]) | ({Path(best)} if best else set())
    deleted: list[Path] = []
    for path in ordered:
        if len(ordered) - len(deleted) <= max(keep, len(protected)):
            break
        if path not in protected:
            shutil.rmtree(path)
            deleted.append(path)
    return deleted


@dataclass
class LaggedLog:
    """A logging step's values on their way to the host: `values` (loss summed over `steps` steps, then the grad
    norm if it was a tensor) is a host copy the GPU fills when it gets there, `done` marks that point."""

    step: int
    epoch: float
    tokens_seen: int
    steps: int
    values: torch.Tensor
    done: torch.cuda.Event | None
    grad_norm: float | None
    learning_rate: float

    @classmethod
    def take(
        cls, state: TrainerState, steps: int, loss: torch.Tensor, grad_norm: Any, learning_rate: float
    ) -> LaggedLog:
        """Copies `loss` and a tensor `grad_norm` off the GPU without waiting for them."""
        parts = [loss.detach().reshape(1).float()]
        if isinstance(grad_norm, torch.Tensor):
            parts.append(grad_norm.detach().reshape(1).float().to(loss.device))
        values = torch.cat(parts)
        done = None
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            values = host
        return cls(
            step=state.global_step,
            epoch=state.epoch,
            tokens_seen=state.num_input_tokens_seen,
            steps=steps,
            values=values,
            done=done,
            grad_norm=None if grad_norm is None or isinstance(grad_norm, torch.Tensor) else float(grad_norm),
            learning_rate=learning_rate,
        )

    def logs(self) -> tuple[float, dict[str, float]]:
        """(the loss summed over the steps, the log's values); waits for the GPU to reach the copy."""
        if self.done is not None:
            self.done.synchronize()
        values = self.values.tolist()
        logs = {"loss": values[0] / self.steps}
        if len(values) > 1:
            logs["grad_norm"] = values[1]
        elif self.grad_norm is not None:
            logs["grad_norm"] = self.grad_norm
        logs["learning_rate"] = self.learning_rate
        return values[0], logs


class VLTrainer(Trainer):
    """`Trainer` with a vision pass on every step and a final folder that carries the run's config."""

    def __init__(
        self,
        *args: Any,
        run_files: list[Path],
        dummy_pixels: dict[str, torch.Tensor],
        pixels: DevicePixels | None = None,
        fused_loss: bool = False,
        causal_padding: bool = False,
        lag_logs: bool = True,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.run_files = run_files
        self.dummy_pixels = dummy_pixels
        self.pixels = pixels  # uint8 images from the datasets become the processor's values here (SFTDataset)
        self.fused_loss = fused_loss  # the model's forward computes the loss over trained positions itself
        self.causal_padding = causal_padding  # right-padded batches go without their mask (speed.SpeedPlan)
        self.lag_logs = lag_logs  # read a logging step's values back one logging step later (LaggedLog)
        self.lagged: LaggedLog | None = None
        self._core: tuple[torch.nn.Module, Any, torch.dtype] | None = None  # (model, its VLM core, the towers' dtype)
        self._counted_parameters: int | None = None

    def _maybe_log_save_evaluate(
        self,
        tr_loss: torch.Tensor,
        grad_norm: Any,
        model: torch.nn.Module,
        trial: Any,
        epoch: float,
        ignore_keys_for_eval: list[str] | None,
        start_time: float,
        learning_rate: float | None = None,
    ) -> None:
        control = self.control
        if self.lag_logs and control.should_log and self.state.global_step > self._globalstep_last_logged:
            # The step before was logged one logging step ago: the GPU is past it, so reading it waits for nothing.
            self._publish_lagged(start_time)
            steps = self.state.global_step - self._globalstep_last_logged
            # A new tensor (a collective across processes is queued like any kernel); then the running sum restarts.
            loss = nested_gather(tr_loss, self.args.parallel_mode).mean()
            tr_loss -= tr_loss
            rate = learning_rate if learning_rate is not None else self._get_learning_rate()
            self.lagged = LaggedLog.take(self.state, steps, loss, grad_norm, rate)
            self._globalstep_last_logged = self.state.global_step
            self.store_flos()
            control.should_log = False
        if control.should_evaluate or control.should_save or control.should_training_stop:
            self._publish_lagged(start_time)  # logs in step order, and all of them in a checkpoint's state
        super()._maybe_log_save_evaluate(
            tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate=learning_rate
        )

    def _finalize_training(self, trial: Any, num_train_samples: int, start_time: float) -> Any:
        self._publish_lagged(start_time)  # before the Trainer totals the run's loss
        return super()._finalize_training(trial, num_train_samples, start_time)

    def _publish_lagged(self, start_time: float) -> None:
        """Logs the pending logging step under its own step, epoch and token count."""
        if self.lagged is None:
            return
        pending, self.lagged = self.lagged, None
        loss_sum, logs = pending.logs()
        self._total_loss_scalar += loss_sum
        state = self.state
        now = state.global_step, state.epoch, state.num_input_tokens_seen
        state.global_step, state.epoch, state.num_input_tokens_seen = pending.step, pending.epoch, pending.tokens_seen
        try:
            self.log(logs, start_time)
        finally:
            state.global_step, state.epoch, state.num_input_tokens_seen = now

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        # The collator's step keys are not model inputs (a copy: the Trainer reads the real token count afterwards).
        step = {key: inputs[key] for key in STEP_KEYS if key in inputs}
        inputs = {key: value for key, value in inputs.items() if key not in STEP_KEYS}
        if self.causal_padding and "position_ids" not in inputs:  # padded, not packed: causal attention suffices
            inputs.pop("attention_mask", None)
        core, dtype = self._vision_core(model)
        for key in PIXEL_KEYS:
            if key not in inputs:
                continue
            if inputs[key].dtype == torch.uint8:
                if self.pixels is None:
                    raise ValueError(f"{key} arrived as uint8 but the trainer has no DevicePixels to normalise it")
                inputs[key] = self.pixels.values(key, inputs[key])
            inputs[key] = inputs[key].to(dtype)
        has_images = "pixel_values" in inputs
        if not self.fused_loss:
            inputs.update(trained_positions(inputs["labels"]))
        elif TRAINED_INDEX_KEY in step:  # positions chosen on the CPU: no GPU-to-host read in the loss
            inputs.update(trained_index=step[TRAINED_INDEX_KEY], trained_targets=step[TRAINED_TARGETS_KEY])
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if has_images:
            return result
        # A batch without images still runs the vision tower(s) and aligner on a dummy image and adds
        # 0 x their output: under DeepSpeed ZeRO-3 every forward gathers sharded weights collectively and
        # every rank must take part, and under DDP/ZeRO the gradient hooks of trainable vision/aligner
        # weights must fire on every rank, or the ranks fall out of step and hang.
        device = inputs["input_ids"].device
        if any(v.device != device or v.dtype != dtype for v in self.dummy_pixels.values()):
            # moved once: a copy from pageable host memory would make the host wait for the GPU on each such step
            self.dummy_pixels = {k: v.to(device=device, dtype=dtype) for k, v in self.dummy_pixels.items()}
        dummy = self.dummy_pixels
        # Under the autocast the model's own forward runs in (the accelerator wraps it, not `core`): in bf16 or fp16
        # the trained aligner is float32 and the towers' features are not.
        with self.accelerator.autocast():
            zero = 0.0 * image_features(core, dummy).float().sum()  # a tensor or `pooler_output`, by release
        if return_outputs:
            loss, outputs = result
            return loss + zero, outputs
        assert isinstance(result, torch.Tensor)
        return result + zero

    def _vision_core(self, model: torch.nn.Module) -> tuple[Any, torch.dtype]:
        """The VLM inside `model` and its vision towers' dtype, found once per model: unwrapping walks every module
        (accelerate looks for compiled regions), ~3 ms of host time per micro-batch on the CPU that runs the tests."""
        if self._core is None or self._core[0] is not model:
            core = vision_language_core(self.accelerator.unwrap_model(model))
            self._core = (model, core, next(core.vision_model.parameters()).dtype)
        return self._core[1], self._core[2]

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """transformers' estimate (6 x input tokens x non-embedding parameters) with the parameters counted once: the
        Trainer asks every micro-batch, and counting walks every module and parameter of the model (~2 ms of host time
        a micro-batch for the tiny model on the CPU that runs the tests)."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        count = getattr(self.model, "num_parameters", None)
        if main_input not in inputs or count is None:
            return super().floating_point_ops(inputs)
        if self._counted_parameters is None:
            self._counted_parameters = int(count(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * self._counted_parameters

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Tokens seen, from the collator's count of real tokens (`REAL_TOKENS_KEY`, a host integer): the Trainer's
        own count reads a GPU tensor back every micro-batch, which makes the host wait for the GPU each time."""
        if self.args.include_num_input_tokens_seen in ("no", False):
            return
        real = inputs.get(REAL_TOKENS_KEY)
        if real is None:
            super()._track_num_input_tokens(inputs)
            return
        if self.args.world_size > 1:  # the Trainer counts over all processes
            real = self.accelerator.gather(torch.tensor([real], device=self.args.device)).sum().item()
        self.state.num_input_tokens_seen += int(real)

    def save_final(self, folder: Path, from_checkpoint: Path | None = None) -> None:
        """The trained result (adapter or full model, with the processor and run files), written atomically.

        `from_checkpoint`: take the weights from that (last) checkpoint instead of the model in memory.
        """
        staging = folder.with_name(f"{STAGING_PREFIX}{folder.name}")
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if from_checkpoint is None:
            self.save_model(str(staging))
        elif self.args.should_save:
            shutil.copytree(from_checkpoint, staging, ignore=shutil.ignore_patterns(*TRAINING_STATE_FILES))
        if self.args.should_save:
            for path in self.run_files:
                shutil.copy2(path, staging / path.name)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_folder(staging, folder)
        self.accelerator.wait_for_everyone()


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class CompleteCheckpoints(TrainerCallback):
    """After the Trainer's own save: the run files into the checkpoint, then, once every rank has written its part,
    the completion marker (last), then rotation. Only rank 0 writes; every rank waits at the barrier.

    `on_save` runs right after `Trainer._save_checkpoint` returns, on every rank.
    """

    def __init__(self, run_dir: Path, run_files: list[Path], keep: int):
        self.run_dir = run_dir
        self.run_files = run_files
        self.keep = keep

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        barrier()  # every rank's shards, optimizer and RNG state are on disk
        if not state.is_world_process_zero:
            return
        checkpoint = self.run_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        for path in self.run_files:
            shutil.copy2(path, checkpoint / path.name)
        # The Trainer does not fsync: flush its files first, so the marker never reaches the disk before them.
        sync_files(checkpoint)
        (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": state.global_step}) + "\n")
        sync_files(checkpoint)
        sync_entries(checkpoint)
        for path in rotate_checkpoints(self.run_dir, self.keep, state.best_model_checkpoint):
            log.info("deleted %s (train.save_total_limit %d)", path, self.keep)


class CheckpointPolicy(TrainerCallback):
    """Log, evaluate and save at the last step, save whenever the eval loss is a new best, never twice a step.

    The Trainer alone evaluates only on its schedule: a run whose `max_steps` ends mid-epoch would end with
    no eval and no checkpoint, and the best eval step might not have been saved.
    """

    def __init__(self) -> None:
        self.last_eval = -1
        self.last_save = -1

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_log = True
            control.should_evaluate = True
            control.should_save = True

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: Any = None, **kwargs: Any
    ) -> None:
        self.last_eval = state.global_step
        loss = (metrics or {}).get("eval_loss")
        if loss is not None and (state.best_metric is None or loss < state.best_metric):
            control.should_save = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.last_save = state.global_step

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step == self.last_eval:
            control.should_evaluate = False
        if state.global_step == self.last_save:
            control.should_save = False


class MetricsLog(TrainerCallback):
    """Appends `metrics.jsonl` as training goes and, when MLFLOW_RUN_ID is set, logs the same metrics live
    to that MLflow run (rank 0 only). MLflow's client is used directly: transformers' MLflowCallback would
    log every TrainingArguments field as a param."""

    TRAIN_KEYS = ("loss", "learning_rate", "epoch", "grad_norm")

    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS_FILE
        self.run_id = os.environ.get("MLFLOW_RUN_ID")
        self.client: Any = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        # On resume, lines past the checkpoint's step belong to the lost part of the run: they are redone. Rewritten
        # aside and renamed: a kill (or a full disk) mid-rewrite would leave the history cut short.
        kept = [line for line in read_metrics(self.path) if line["step"] <= state.global_step]
        write_text_atomic(self.path, "".join(json.dumps(line) + "\n" for line in kept))
        if self.run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"))

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: Any = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            line = {"step": state.global_step, **{k: logs[k] for k in self.TRAIN_KEYS if k in logs}}
        elif "eval_loss" in logs:
            line = {"step": state.global_step, "eval_loss": logs["eval_loss"]}
        else:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, state.global_step) for k, v in line.items() if k != "step"]
            self.client.log_batch(self.run_id, metrics=metrics)


class CompactProgress(ProgressCallback):
    """The Trainer's progress bar, with the latest loss and eval loss on it instead of a printed dict per log.

    The full numbers are in metrics.jsonl (and MLflow); the terminal gets one bar that stays one line.
    """

    SHOWN = (("loss", "loss"), ("eval_loss", "eval_loss"), ("learning_rate", "lr"))

    def __init__(self) -> None:
        super().__init__()
        self.postfix: dict[str, str] = {}

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: Any = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        for key, label in self.SHOWN:
            if isinstance(logs.get(key), (int, float)):
                self.postfix[label] = f"{logs[key]:.4g}"
        self.training_bar.set_postfix(self.postfix, refresh=False)


class Throughput(TrainerCallback):
    """Tokens and samples per second, measured from the end of a warm-up step to the last step.

    On a GPU each step's end is a CUDA event, timed by the GPU when it gets there: the host never waits for it
    (a synchronisation per step would drain the queue of work the host has launched ahead)."""

    KEPT_WARMUP_MARKS = 64
    """`rates` accepts up to this many warm-up steps."""

    def __init__(self) -> None:
        # (time in seconds or a CUDA event, tokens seen, global step) at each step end
        self.marks: list[tuple[float | torch.cuda.Event, int, int]] = []

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        mark: float | torch.cuda.Event = time.perf_counter()
        if torch.cuda.is_available():
            mark = torch.cuda.Event(enable_timing=True)
            mark.record()
        entry = (mark, state.num_input_tokens_seen, state.global_step)
        if len(self.marks) > self.KEPT_WARMUP_MARKS:  # the warm-up marks and the latest: a long run holds no more
            self.marks[-1] = entry
        else:
            self.marks.append(entry)

    def step_seconds(self) -> list[float]:
        """How long each step after the first took, up to step `KEPT_WARMUP_MARKS` (the marks kept in a row); a step
        that compiled, or waited on data, shows as an outlier. Waits for the GPU to reach the last of them."""
        durations: list[float] = []
        if self.marks and isinstance(self.marks[-1][0], torch.cuda.Event):
            self.marks[-1][0].synchronize()  # every earlier mark is done too
        for (t0, _, step0), (t1, _, step1) in itertools.pairwise(self.marks):
            if step1 != step0 + 1:
                break  # past the kept marks: the latest replaces the one before it
            if isinstance(t0, torch.cuda.Event) and isinstance(t1, torch.cuda.Event):
                durations.append(t0.elapsed_time(t1) / 1000)
            else:
                assert isinstance(t0, float) and isinstance(t1, float)
                durations.append(t1 - t0)
        return durations

    def rates(self, samples_per_step: int, warmup_steps: int = 1) -> tuple[float, float]:
        """(samples/s, tokens/s) over the steps after the first `warmup_steps` of this session; zeros when
        there were not enough steps."""
        warmup_steps = min(max(1, warmup_steps), self.KEPT_WARMUP_MARKS)
        if len(self.marks) <= warmup_steps:
            return 0.0, 0.0
        (t0, tokens0, step0), (t1, tokens1, step1) = self.marks[warmup_steps - 1], self.marks[-1]
        if isinstance(t0, torch.cuda.Event) and isinstance(t1, torch.cuda.Event):
            t1.synchronize()
            seconds = t0.elapsed_time(t1) / 1000
        else:
            assert isinstance(t0, float) and isinstance(t1, float)
            seconds = t1 - t0
        return (step1 - step0) * samples_per_step / seconds, (tokens1 - tokens0) / seconds


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl file (none if it does not exist), up to its last newline.

    A last line without its newline is an append a stopped run cut short (a kill, a full disk): always a step past
    its last complete checkpoint, since a step logs before it saves, so the resume would drop it anyway.
    """
    if not path.is_file():
        return []
    whole, _, cut = path.read_text().rpartition("\n")
    if cut.strip():
        log.warning("%s: its last line was cut short (a run stopped while writing it); left out: %r", path, cut)
    return [json.loads(line) for line in whole.split("\n") if line.strip()]
