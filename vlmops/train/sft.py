"""Supervised fine-tuning of DeepSeek-VL (LoRA or full), in-process: one run folder in, a `TrainResult` out.

This is the single training code path: `vlmops sft`, the flow's train step and the GPU benchmark all end
up in `train()` (multi-GPU through `vlmops.train.launch`, which re-executes it under torchrun).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmops.config import PipelineConfig, resolve_num_workers
from vlmops.data.formats import read_dataset
from vlmops.data.length import length_fingerprint, read_lengths
from vlmops.data.prepare import PreparedDataset, load_prepared
from vlmops.data.problems import DatasetError
from vlmops.errors import UserInputError
from vlmops.models.compile_cache import use_compile_cache
from vlmops.models.loading import attn_implementation, is_hybrid, load_processor, resolve_dtype, safe_weights
from vlmops.models.pixels import DevicePixels
from vlmops.plural import counted
from vlmops.staging import write_text_atomic
from vlmops.train.batching import (
    Batching,
    collator,
    resolve_batching,
    resolve_deepspeed,
    train_dataset,
    train_passes,
)
from vlmops.train.data import SFTDataset
from vlmops.train.deepspeed_config import load_deepspeed_config, require_deepspeed
from vlmops.train.packing import check_packing_support, training_attention
from vlmops.train.rundir import (
    CONFIG_FILE,
    FINAL_DIR,
    METRICS_FILE,
    RESULT_FILE,
    RUN_INFO,
    TRAINER_STATE,
    RunInfo,
    checkpoints,
    is_last_step,
    plan_resume,
    start_run_folder,
)
from vlmops.train.speed import SpeedPlan, apply_speed, plan_speed
from vlmops.train.trainable import TrainableSummary, prepare_trainable, route_input_grads, trained_parts
from vlmops.train.trainer import (
    CheckpointPolicy,
    CompactProgress,
    CompleteCheckpoints,
    MetricsLog,
    Throughput,
    VLTrainer,
    barrier,
    read_metrics,
)

log = logging.getLogger(__name__)

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PATH_FIELDS = ("final_dir", "best_checkpoint", "last_checkpoint", "resumed_from")


@dataclass
class TrainResult:
    """What a training run produced; rebuilt from the run folder by `TrainResult.from_run_dir`."""

    run_dir: Path
    final_dir: Path
    """final/: the peft adapter (LoRA) or the full model (full), with the processor and run files."""
    best_checkpoint: Path | None
    """The checkpoint with the lowest eval loss."""
    last_checkpoint: Path | None
    trainable_params: int
    total_params: int
    train_loss: float
    """The training loss logged at the last step (the last step is always logged)."""
    eval_loss: float
    """The best eval loss (there is always an evaluation at the last step)."""
    steps: int
    samples_per_s: float
    """Optimizer steps x global batch per second, over the steps after the first."""
    tokens_per_s: float
    """Non-padding tokens (image tokens included) per second over all ranks, after the first step."""
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    precision: str = "fp32"
    peak_gpu_memory_gib: float | None = None
    """Peak memory allocated by torch on this process's GPU (None on CPU)."""
    train_runtime_s: float = 0.0
    resumed_from: Path | None = None
    dropped_records: list[str] = field(default_factory=list)
    """Records left out because they were longer than data.max_length (policy drop)."""
    truncated_records: list[str] = field(default_factory=list)
    """Records whose text was cut to data.max_length (policy truncate-text)."""

    def outputs(self) -> list[Path]:
        """What the run wrote that the merge reads: without final/ it would take the latest checkpoint, another model
        than this result describes."""
        return [self.run_dir, self.final_dir]

    def to_json(self) -> dict[str, Any]:
        """result.json content: paths inside the run folder are stored relative to it, so it can move."""
        data = asdict(self)
        data.pop("loss_history")
        data.pop("eval_history")
        data.pop("run_dir")
        for key in PATH_FIELDS:
            if data[key] is not None:
                path = Path(data[key])
                data[key] = str(path.relative_to(self.run_dir)) if path.is_relative_to(self.run_dir) else str(path)
        return data

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike[str]) -> TrainResult:
        """Rebuild the result of a finished run from result.json and metrics.jsonl."""
        folder = Path(run_dir).resolve()
        result_file = folder / RESULT_FILE
        if not result_file.is_file():
            raise FileNotFoundError(f"{folder} has no {RESULT_FILE}: the training run did not finish (see its log)")
        data = json.loads(result_file.read_text())
        for key in PATH_FIELDS:
            data[key] = folder / data[key] if data.get(key) is not None else None
        losses, evals = histories(folder)
        return cls(run_dir=folder, **data, loss_history=losses, eval_history=evals)


def histories(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) and (step, eval_loss) pairs from metrics.jsonl."""
    lines = read_metrics(run_dir / METRICS_FILE)
    losses = [(int(m["step"]), float(m["loss"])) for m in lines if "loss" in m]
    evals = [(int(m["step"]), float(m["eval_loss"])) for m in lines if "eval_loss" in m]
    return losses, evals


def resolve_precision(precision: str) -> str:
    """`auto`: the precision of the `auto` dtype on this machine (`resolve_dtype`: bf16 on GPUs that have it, fp16
    on older GPUs, fp32 on CPU); anything else as asked."""
    if precision != "auto":
        return precision
    auto = resolve_dtype("auto")
    return next(name for name, dtype in PRECISION_DTYPES.items() if dtype == auto)


def weights_dtype(config: PipelineConfig, precision: str) -> torch.dtype:
    """The dtype the base weights are loaded in.

    `model.dtype` wins when set. Otherwise LoRA keeps the frozen base in the compute precision; full
    training keeps float32 master weights under autocast, unless DeepSpeed (which holds its own float32
    master copy in the optimizer) is used.
    """
    if config.model.dtype != "auto":
        return resolve_dtype(config.model.dtype)
    if config.train.mode == "lora" or config.train.deepspeed is not None:
        return PRECISION_DTYPES[precision]
    return torch.float32


def check_fp16_trainable(config: PipelineConfig, precision: str) -> None:
    """fp16 training scales its loss, and the GradScaler cannot unscale float16 gradients: on a GPU a run that
    trains weights in float16 (`model.dtype: float16`, parts trained fully, no DeepSpeed) stopped at its first step
    ("Attempting to unscale FP16 gradients"). Refused before anything starts. LoRA's adapters are float32.

    Raises:
        UserInputError: such a run.
    """
    parts = trained_parts(config.train)
    if precision == "fp16" and config.model.dtype == "float16" and config.train.deepspeed is None and parts:
        raise UserInputError(
            f"model.dtype float16 with train.precision fp16 would train the {', '.join(sorted(parts))} weights in "
            "float16, whose gradients fp16's loss scaling cannot unscale: set model.dtype: auto (trained weights "
            "stay float32 under fp16 autocast), or train.precision: bf16 on a GPU that has it, or freeze those parts "
            "(train.freeze) and train LoRA adapters alone"
        )


def training_arguments(
    config: PipelineConfig,
    run_dir: Path,
    precision: str,
    batching: Batching | None = None,
    speed: SpeedPlan | None = None,
) -> Any:
    """`TrainingArguments` from the `train` and `data` sections. Build it before loading the model: with
    ZeRO-3 it makes `from_pretrained` shard the weights as they load.

    `batching`: the run's resolved batching (`resolve_batching`); None: train.batch_size, grad_accum and
    gradient_checkpointing as written. `speed`: the run's GPU levers (`plan_speed`); None: the plain optimizer.
    """
    from transformers import TrainingArguments

    t = config.train
    if batching is None:
        recompute = t.gradient_checkpointing is not False
        batching = Batching(t.batch_size, t.grad_accum, recompute, False, None, False)
    if t.deepspeed is not None:
        require_deepspeed(f"train.deepspeed is {t.deepspeed!r}")
        if not torch.cuda.is_available():
            raise ValueError(
                f"train.deepspeed is {t.deepspeed!r} but there is no CUDA GPU: DeepSpeed through the HF Trainer runs on "
                "GPUs only; set train.deepspeed: null to train on CPU"
            )
    eval_steps = t.eval_steps
    # Saving at the eval steps keeps the best eval step restorable.
    save_steps = t.save_steps if t.save_steps is not None else eval_steps
    schedule: dict[str, Any] = {"eval_strategy": "epoch", "save_strategy": "epoch"}  # null: once per epoch
    if eval_steps is not None:
        schedule.update(eval_strategy="steps", eval_steps=eval_steps)
    if save_steps is not None:
        schedule.update(save_strategy="steps", save_steps=save_steps)
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=batching.per_device_batch,
        # The micro-batch fits training's forward and backward, so the eval loss's forward alone; train.batch_size as
        # written may be 64 that the memory policy split into micro-batches of 4 (out of memory at the first eval).
        per_device_eval_batch_size=t.eval_batch_size or batching.batch_size,
        gradient_accumulation_steps=batching.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a share of the total steps
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        logging_steps=t.logging_steps,
        **schedule,
        save_total_limit=None,  # CompleteCheckpoints rotates, keeping the latest and the best
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        prediction_loss_only=True,
        seed=config.run.seed,
        data_seed=config.run.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        optim="adamw_torch_fused" if speed is not None and speed.fused_adamw else "adamw_torch",
        use_cpu=not torch.cuda.is_available(),
        **_checkpointing_kwargs(batching.recompute),
        deepspeed=load_deepspeed_config(t.deepspeed),
        dataloader_num_workers=resolve_num_workers(config.data.num_workers),
        dataloader_persistent_workers=resolve_num_workers(config.data.num_workers) > 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Batches go to the GPU without the host waiting for the copy (and so for every kernel queued before it).
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        # The NaN/inf check of each micro-batch's loss reads it back to the host: the host would wait for the GPU
        # on every micro-batch. A NaN loss shows in the logged loss instead of being averaged away.
        logging_nan_inf_filter=False,
        remove_unused_columns=False,
        label_names=["labels"],
        # VLTrainer counts the collator's real tokens; "non_padding" is the Trainer's own count where a batch lacks
        # them (it tells a packed row's filler by its padding ids).
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,  # every step runs every part (see VLTrainer.compute_loss)
        report_to="none",
        disable_tqdm=False,
    )


def _checkpointing_kwargs(enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing with `use_reentrant=False` (peft-safe: frozen inputs still get gradients).

    transformers 5.23 renamed the argument `activation_checkpointing`; 5.17 only knows the old name.
    """
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


@dataclass
class TrainingSetup:
    """Everything `train` runs, built and ready (tests and the benchmark inspect it)."""

    trainer: VLTrainer
    summary: TrainableSummary
    datasets: dict[str, SFTDataset]
    precision: str
    resume: Path | None
    throughput: Throughput
    batching: Batching
    speed: SpeedPlan


def setup_training(config: PipelineConfig, base_model: Path, dataset: Path, run_dir: Path) -> TrainingSetup:
    """Prepare the run folder, load and wrap the model, build the datasets and the trainer."""
    from transformers import AutoModelForImageTextToText, set_seed
    from transformers.trainer_callback import ProgressCallback

    base_model, dataset, run_dir = Path(base_model).resolve(), Path(dataset).resolve(), Path(run_dir).resolve()
    if torch.cuda.is_available() and not torch.cuda.is_initialized() and config.train.mode == "lora":
        # Segments that grow instead of new blocks for each size: micro-batches of varying lengths otherwise leave
        # the allocator holding GiBs it cannot reuse, beyond the train.memory_gib the policy planned for (the 1.3b
        # at 16 GiB: 12.1 GiB reserved instead of 17.4). Not for full training: the 7b's step took twice as long
        # with them (2.8k against 5.9k tokens/s on an H200, ~105 GiB allocated). Read at the first CUDA
        # allocation; a setting of the user's own is kept.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    precision = resolve_precision(config.train.precision)
    config = resolve_deepspeed(config, base_model, plan_speed(config.train, torch.cuda.is_available(), precision))
    # On the DeepSpeed setting the run takes (zero2 / zero3 in one process train without it), before the run folder:
    # the fixed config starts it afresh.
    check_fp16_trainable(config, precision)
    t = config.train
    if t.deepspeed is not None:
        single_process_rendezvous()
    # The datasets are measured first: their lengths size the micro-batches, which the TrainingArguments carry.
    processor = load_processor(base_model)
    prepared = load_prepared(dataset)
    datasets = build_datasets(config, processor, prepared)
    speed = plan_speed(t, torch.cuda.is_available(), precision)
    batching = resolve_batching(config, base_model, datasets["train"].lengths, weights_dtype(config, precision), speed)
    args = training_arguments(config, run_dir, precision, batching, speed)
    main = args.should_save
    attn = training_attention(config.model.attn, t.packing, batching.packing)
    trained_with = {"attention": attn, **dataclasses.asdict(batching)}  # the micro-batch split, packing, recompute
    info = RunInfo(str(base_model), str(dataset), prepared.content_hash, t.mode, trained_with=trained_with)
    plan = plan_resume(run_dir, config, info)
    barrier()  # every rank has read the folder before rank 0 changes it
    if main:
        start_run_folder(run_dir, config, info, plan)
    barrier()
    resume = plan.checkpoint

    set_seed(config.run.seed)
    hybrid = is_hybrid(base_model)
    dtype = weights_dtype(config, precision)
    if attn != config.model.attn:
        log.info("train.packing: auto packs this data (padded batches would be >= 15%% padding); the LLM uses %s", attn)
    use_compile_cache(config.model.compile_cache)  # train.compile, train.sam_compile
    model: Any = AutoModelForImageTextToText.from_pretrained(
        base_model,
        dtype=dtype,
        attn_implementation=attn_implementation(attn, hybrid),
        **safe_weights(base_model, config.model.allow_pickle),
    )
    model.config.use_cache = False
    # The LLM reads its own config: without this it builds a KV cache while training, which also keeps
    # transformers from separating packed samples.
    model.config.text_config.use_cache = False
    model, summary = prepare_trainable(model, t, seed=config.run.seed)
    if config.model.dtype == "auto" and precision != "fp32" and t.deepspeed is None:
        for param in model.parameters():  # trained weights (adapters, modules_to_save) stay float32 under autocast
            if param.requires_grad:
                param.data = param.data.float()
    route_input_grads(model)  # the Trainer's checkpointing would give every tower input gradients
    if batching.packing:
        check_packing_support(model)
    speed = apply_speed(model, speed, batching.activation_budget)

    throughput = Throughput()
    run_files = [run_dir / CONFIG_FILE, run_dir / RUN_INFO]
    trainer = VLTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset(batching, datasets["train"], config.run.seed),
        eval_dataset=datasets["eval"],
        data_collator=collator(
            batching,
            processor.tokenizer.pad_token_id,
            speed.pad_to_multiple_of,
            datasets["train"].lengths,
            config.run.seed,
            passes=train_passes(t, batching, len(datasets["train"])),
        ),
        processing_class=processor,
        callbacks=[
            CheckpointPolicy(),
            CompleteCheckpoints(run_dir, run_files, keep=t.save_total_limit),
            MetricsLog(run_dir),
            throughput,
        ],
        run_files=run_files,
        dummy_pixels=dummy_pixel_values(processor),
        pixels=datasets["train"].pixels,
        fused_loss=speed.fused_loss,
        causal_padding=speed.causal_padding,
    )
    # The default bar prints every log dict on its own line; this one shows the latest numbers on the bar.
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgress())
    return TrainingSetup(trainer, summary, datasets, precision, resume, throughput, batching, speed)


def build_datasets(config: PipelineConfig, processor: Any, prepared: PreparedDataset) -> dict[str, SFTDataset]:
    """The train and eval splits of a prepared snapshot, measured against data.max_length; images as uint8 where
    `DevicePixels` reproduces the processor exactly (the trainer rescales and normalises them)."""
    pixels = DevicePixels.build(processor.image_processor)
    saved_lengths = read_lengths(
        prepared.path,
        length_fingerprint(processor.tokenizer, int(processor.num_image_tokens), config.model.system_prompt),
    )
    datasets: dict[str, SFTDataset] = {}
    for split, path in (("train", prepared.train_file), ("eval", prepared.eval_file)):
        read = read_dataset(path)
        if read.problems:
            raise DatasetError(read.problems, f"{path} is a prepared snapshot and should be valid: prepare it again")
        datasets[split] = SFTDataset(
            read.conversations,
            processor,
            config.data.max_length,
            config.data.max_length_policy,
            config.model.system_prompt,
            config.storage,
            split,
            saved_lengths.get(split),
            pixels,
        )
    return datasets


def train(config: PipelineConfig, base_model: Path, dataset: Path, run_dir: Path) -> TrainResult:
    """Fine-tune `base_model` on the prepared dataset snapshot `dataset`, writing the run to `run_dir`.

    Resumes from the run folder's latest complete checkpoint when `train.resume` is auto.
    """
    from transformers import TrainerState

    run_dir = Path(run_dir).resolve()
    setup = setup_training(config, base_model, dataset, run_dir)
    trainer, resume, datasets, args = setup.trainer, setup.resume, setup.datasets, setup.trainer.args
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if resume is not None:
        log.info("resuming from %s", resume)
    started = time.perf_counter()
    if resume is not None and is_last_step(resume):
        # The Trainer would run one step past max_steps when resumed at the very end: nothing is left to
        # train, the last checkpoint is the result (this run was stopped after it, or is run again).
        log.info("%s is the last step of this run: nothing left to train", resume)
        trainer.state = TrainerState.load_from_json(str(resume / TRAINER_STATE))
        trainer.save_final(run_dir / FINAL_DIR, from_checkpoint=resume)
    else:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        trainer.save_final(run_dir / FINAL_DIR)
    runtime = time.perf_counter() - started

    # A packed micro-batch holds batching.batch_size samples on average (the Trainer's batch size is 1 group).
    samples_per_step = setup.batching.batch_size * args.gradient_accumulation_steps * args.world_size
    samples_per_s, tokens_per_s = setup.throughput.rates(samples_per_step)
    losses, evals = histories(run_dir)
    state = trainer.state
    done = checkpoints(run_dir)
    result = TrainResult(
        run_dir=run_dir,
        final_dir=run_dir / FINAL_DIR,
        best_checkpoint=Path(state.best_model_checkpoint) if state.best_model_checkpoint else None,
        last_checkpoint=done[-1] if done else None,
        trainable_params=setup.summary.trainable_params,
        total_params=setup.summary.total_params,
        train_loss=losses[-1][1] if losses else math.nan,
        eval_loss=state.best_metric if state.best_metric is not None else math.nan,
        steps=state.global_step,
        samples_per_s=samples_per_s,
        tokens_per_s=tokens_per_s,
        loss_history=losses,
        eval_history=evals,
        precision=setup.precision,
        peak_gpu_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        train_runtime_s=runtime,
        resumed_from=resume,
        dropped_records=datasets["train"].report.dropped + datasets["eval"].report.dropped,
        truncated_records=datasets["train"].report.truncated + datasets["eval"].report.truncated,
    )
    if args.should_save:
        write_text_atomic(run_dir / RESULT_FILE, json.dumps(result.to_json(), indent=2) + "\n")
    log.info(
        "trained %s in %.1f s: train loss %.4f, best eval loss %.4f, %.0f tokens/s; final: %s",
        counted(result.steps, "step"),
        runtime,
        result.train_loss,
        result.eval_loss,
        tokens_per_s,
        result.final_dir,
    )
    return result


def dummy_pixel_values(processor: Any) -> dict[str, torch.Tensor]:
    """The pixel tensors of one plain grey image: what a text-only batch feeds the vision tower(s)."""
    from PIL import Image

    features = processor.image_processor([Image.new("RGB", (64, 64), (128, 128, 128))], return_tensors="pt")
    return {k: v for k, v in features.items() if k.endswith("pixel_values")}


def single_process_rendezvous() -> None:
    """DeepSpeed always joins a process group: outside torchrun, make this process a group of one."""
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    log.info("DeepSpeed outside torchrun: running as a single-process group (port %d)", port)
