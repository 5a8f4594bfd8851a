"""`train()` end to end on the tiny model: the loss falls (pinned), metrics go to metrics.jsonl and live to
MLflow, checkpoints are complete and rotated, and every step runs the vision tower."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmops.config import PipelineConfig, load_config
from vlmops.data.prepare import PreparedDataset
from vlmops.train.rundir import COMPLETE_MARKER, checkpoints, open_run
from vlmops.train.sft import TrainResult, setup_training, train
from vlmops.train.trainer import rotate_checkpoints

# The measured recipe for the tiny model (LoRA on every LLM linear + the aligner trained fully, lr 5e-3).
RECIPE = {
    "train.lora.targets": "all-linear",
    "train.freeze.aligner": False,
    "train.lr": 5e-3,
    "train.batch_size": 8,
}
# Eval loss after each of the 4 epochs (6 steps each) of a seed-0 run; the same on transformers 5.17 and 5.23.
PINNED_EVAL = [(6, 2.372722), (12, 1.364858), (18, 0.798457), (24, 0.824718)]


def config(**overrides: Any) -> PipelineConfig:
    return load_config(None, {**RECIPE, **overrides})


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("train-test"))
    return uri, run.info.run_id


@pytest.fixture(scope="module")
def recipe_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, snapshot: PreparedDataset, mlflow_run: tuple[str, str]
) -> TrainResult:
    uri, run_id = mlflow_run
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("MLFLOW_RUN_ID", run_id)
        return train(config(**{"train.epochs": 4}), tiny_model, snapshot.path, tmp_path_factory.mktemp("run") / "r")


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinned on the CPU in float32; a GPU trains in bf16, compiled")
def test_loss_falls_to_pinned_values(recipe_run: TrainResult) -> None:
    result = recipe_run
    assert result.steps == 24
    assert [step for step, _ in result.eval_history] == [6, 12, 18, 24]  # once per epoch by default
    for (step, loss), (_, pinned) in zip(result.eval_history, PINNED_EVAL, strict=True):
        assert loss == pytest.approx(pinned, abs=1e-4), f"eval loss at step {step}"
    first, last = result.loss_history[0][1], result.loss_history[-1][1]
    assert last < first - 0.5
    assert result.eval_history[-1][1] < result.eval_history[0][1] - 0.2
    assert result.eval_loss == min(loss for _, loss in result.eval_history)


def test_run_folder_and_result(recipe_run: TrainResult) -> None:
    result = recipe_run
    run_dir = result.run_dir
    assert TrainResult.from_run_dir(run_dir) == result
    assert result.trainable_params > 0 and result.total_params > result.trainable_params
    assert result.tokens_per_s > 0 and result.samples_per_s > 0
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 25))
    # run.json says what the run resolved where config.yaml leaves it to vlmops (train.packing: auto, ...)
    trained_with = json.loads((run_dir / "run.json").read_text())["trained_with"]
    assert trained_with["attention"] == "sdpa" and trained_with["packing"] is False  # CPU: padded batches
    assert trained_with["batch_size"] * trained_with["grad_accum"] == 8 and "recompute" in trained_with
    assert {"step", "loss", "learning_rate", "epoch"} <= set(lines[0])
    assert [(m["step"], m["eval_loss"]) for m in lines if "eval_loss" in m] == result.eval_history
    # save_total_limit 2 (default): the latest two; the best (lowest eval loss, step 18) is among them
    assert [p.name for p in checkpoints(run_dir)] == ["checkpoint-18", "checkpoint-24"]
    assert result.best_checkpoint == run_dir / "checkpoint-18"
    assert result.last_checkpoint == run_dir / "checkpoint-24"
    assert not list(run_dir.glob(".staging-*"))
    for folder in [*checkpoints(run_dir), run_dir / "final"]:
        assert {"config.yaml", "run.json", "adapter_model.safetensors", "processor_config.json"} <= {
            p.name for p in folder.iterdir()
        }
    assert (run_dir / "checkpoint-24" / "trainer_state.json").is_file()
    assert [p.name for p in run_dir.glob("checkpoint-*/" + COMPLETE_MARKER)] == [COMPLETE_MARKER] * 2
    assert not (run_dir / "final" / COMPLETE_MARKER).exists()
    opened = open_run(run_dir / "checkpoint-18")  # a checkpoint is usable on its own, like swift's --ckpt_dir
    assert opened.is_adapter and opened.config.train.lora.targets == "all-linear"


def test_metrics_stream_live_to_mlflow(recipe_run: TrainResult, mlflow_run: tuple[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    uri, run_id = mlflow_run
    client = MlflowClient(tracking_uri=uri)
    losses = client.get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == [step for step, _ in recipe_run.loss_history]
    assert [m.value for m in losses] == pytest.approx([loss for _, loss in recipe_run.loss_history])
    evals = client.get_metric_history(run_id, "eval_loss")
    assert [(m.step, pytest.approx(m.value)) for m in evals] == recipe_run.eval_history
    assert client.get_run(run_id).data.params == {}  # metrics only: no flood of TrainingArguments params


def test_same_seed_same_run(tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path) -> None:
    def losses(seed: int, name: str) -> list[tuple[int, float]]:
        overrides = {"train.max_steps": 4, "run.seed": seed, "train.gradient_checkpointing": False}
        return train(config(**overrides), tiny_model, snapshot.path, tmp_path / name).loss_history

    first = losses(0, "a")
    assert losses(0, "b") == first  # bit-identical
    assert losses(1, "c") != first


def test_max_steps_mid_epoch_still_logs_evaluates_and_saves_at_the_end(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    result = train(
        config(**{"train.max_steps": 4, "train.logging_steps": 3}), tiny_model, snapshot.path, tmp_path / "r"
    )
    assert result.steps == 4
    assert [step for step, _ in result.loss_history] == [3, 4]  # the last step is always logged
    assert result.eval_history and result.eval_history[-1][0] == 4
    assert result.last_checkpoint == tmp_path / "r" / "checkpoint-4"


def test_logs_read_back_late_are_the_logs_of_their_steps(
    tiny_model: Path, tiny_processor: Any, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    from transformers import AutoModelForImageTextToText, Trainer, TrainerCallback

    from vlmops.data.formats import read_dataset
    from vlmops.train.data import SFTDataset, VisionLanguageCollator
    from vlmops.train.sft import dummy_pixel_values, training_arguments
    from vlmops.train.trainer import CheckpointPolicy, VLTrainer

    dataset = SFTDataset(read_dataset(snapshot.train_file).conversations[:24], tiny_processor, 512, "error")

    class Arrivals(TrainerCallback):
        """(steps the trainer had taken, the step a log is for) for each log as it arrives."""

        def __init__(self) -> None:
            self.taken = 0
            self.seen: list[tuple[int, int]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.taken += 1

        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.seen.append((self.taken, state.global_step))

    def run(lag: bool) -> tuple[list[dict[str, Any]], float, list[tuple[int, int]]]:
        overrides = {"train.max_steps": 5, "train.logging_steps": 2, "train.eval_steps": 3, "train.batch_size": 4}
        arrivals = Arrivals()
        torch.manual_seed(0)
        trainer = VLTrainer(
            model=AutoModelForImageTextToText.from_pretrained(tiny_model),
            args=training_arguments(config(**overrides), tmp_path / f"lag-{lag}", "fp32"),
            train_dataset=dataset,
            eval_dataset=dataset,
            data_collator=VisionLanguageCollator(pad_token_id=tiny_processor.tokenizer.pad_token_id),
            callbacks=[CheckpointPolicy(), arrivals],  # as sft has it: the last step logs, evaluates, saves
            run_files=[],
            dummy_pixels=dummy_pixel_values(tiny_processor),
            lag_logs=lag,
        )
        output = trainer.train()
        batch = {"input_ids": torch.zeros(2, 7, dtype=torch.long)}  # its parameters counted once, the same count
        assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0
        timing = ("_runtime", "_per_second")
        logs = [{k: v for k, v in log.items() if not k.endswith(timing)} for log in trainer.state.log_history]
        return logs, output.training_loss, arrivals.seen

    lagged, lagged_loss, lagged_arrivals = run(lag=True)
    read_at_once, loss, arrivals = run(lag=False)
    assert lagged == read_at_once and lagged_loss == loss  # same values, steps, epochs and order
    assert [log["step"] for log in lagged if "loss" in log] == [2, 4, 5]
    assert all(taken == step for taken, step in arrivals)
    # Read a step late: step 4's loss arrived with step 5's (the eval at step 3 published step 2's first).
    assert (5, 4) in lagged_arrivals and (3, 2) in lagged_arrivals


def test_rotation_keeps_latest_and_best(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4, 5):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("{}\n")
    (tmp_path / "checkpoint-6").mkdir()  # being written: not a checkpoint yet, neither kept nor counted
    deleted = rotate_checkpoints(tmp_path, keep=2, best=str(tmp_path / "checkpoint-2"))
    assert sorted(p.name for p in deleted) == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-5"]
    rotate_checkpoints(tmp_path, keep=1, best=str(tmp_path / "checkpoint-2"))  # best and latest, even above 1
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-5"]
    assert (tmp_path / "checkpoint-6").is_dir()


def vision_grads(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path, batch: dict[str, torch.Tensor], **overrides: Any
) -> tuple[int, dict[str, torch.Tensor | None]]:
    """Forward and backward `batch` as the trainer does; count vision-tower forwards, collect vision-side grads."""
    setup = setup_training(config(**overrides), tiny_model, snapshot.path, tmp_path)
    trainer = setup.trainer
    calls = []
    core = trainer.model.get_base_model().model
    handle = core.vision_model.register_forward_hook(lambda *_: calls.append(1))
    model = trainer.accelerator.prepare_model(trainer.model)  # its forward under autocast, as train() has it
    model.train()
    loss = trainer.compute_loss(model, on_device(batch, trainer.args.device))
    loss.backward()
    handle.remove()
    assert torch.isfinite(loss)
    grads = {
        n: p.grad
        for n, p in trainer.model.named_parameters()
        if p.requires_grad and ("vision_model" in n or "aligner" in n)
    }
    return len(calls), grads


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """`batch` where the trainer's model is (the Trainer moves its batches there; these tests call compute_loss)."""
    return {key: value.to(device) for key, value in batch.items()}


def batch_of(setup_dataset: Any, indices: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    from vlmops.train.data import VisionLanguageCollator

    return VisionLanguageCollator(pad_token_id=pad_token_id)([setup_dataset[i] for i in indices])


def test_text_only_batch_still_runs_the_vision_tower(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    # LoRA on every linear layer, vision tower and aligner included (ALL).
    overrides = {"train.lora.targets": "ALL", "train.freeze.aligner": None}
    setup = setup_training(config(**overrides), tiny_model, snapshot.path, tmp_path / "probe")
    dataset = setup.datasets["train"]
    pad = dataset.tokenizer.pad_token_id
    text_only = [i for i in range(len(dataset)) if not dataset.encoded(i).images][:2]
    with_images = [i for i in range(len(dataset)) if dataset.encoded(i).images][:2]
    assert len(text_only) == 2

    calls, grads = vision_grads(tiny_model, snapshot, tmp_path / "t", batch_of(dataset, text_only, pad), **overrides)
    assert calls == 1  # the dummy image went through SigLIP
    assert grads and all(g is not None for g in grads.values())  # every hook fired ...
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())  # ... with an exactly zero gradient

    mixed = batch_of(dataset, [text_only[0], with_images[0]], pad)
    assert mixed["pixel_values"].shape[0] == len(dataset.encoded(with_images[0]).images)
    calls, grads = vision_grads(tiny_model, snapshot, tmp_path / "m", mixed, **overrides)
    assert calls == 1
    assert any(float(g.abs().max()) > 0 for g in grads.values() if g is not None)  # real images: real gradients


def test_hybrid_text_only_batch_runs_both_towers(
    tiny_hybrid_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    setup = setup_training(
        config(**{"train.lora.targets": "ALL", "train.freeze.aligner": None}),
        tiny_hybrid_model,
        snapshot.path,
        tmp_path / "h",
    )
    trainer, dataset = setup.trainer, setup.datasets["train"]
    core = trainer.model.get_base_model().model
    calls: list[str] = []
    for name in ("vision_model", "high_res_vision_model"):
        getattr(core, name).register_forward_hook(lambda *_, name=name: calls.append(name))
    text_only = [i for i in range(len(dataset)) if not dataset.encoded(i).images][:2]
    model = trainer.accelerator.prepare_model(trainer.model)  # its forward under autocast, as train() has it
    model.train()
    batch = on_device(batch_of(dataset, text_only, dataset.tokenizer.pad_token_id), trainer.args.device)
    trainer.compute_loss(model, batch).backward()
    assert sorted(calls) == ["high_res_vision_model", "vision_model"]
    sam = [p.grad for n, p in trainer.model.named_parameters() if p.requires_grad and "high_res_vision_model" in n]
    assert sam and all(g is not None and float(g.abs().max()) == 0.0 for g in sam)


@pytest.mark.parametrize(
    ("overrides", "vision_graph"),
    [
        ({"train.mode": "full"}, False),
        ({"train.lora.targets": "qkv"}, False),
        ({"train.lora.targets": "ALL", "train.freeze.aligner": None}, True),
    ],
)
def test_recompute_keeps_frozen_towers_out_of_the_backward(
    tiny_hybrid_model: Path, snapshot: PreparedDataset, tmp_path: Path, overrides: dict[str, Any], vision_graph: bool
) -> None:
    """With recompute on, the Trainer's checkpointing asks the model for input gradients on every tower; a frozen
    SigLIP and SAM must still record no graph (they would run a backward for nothing on every step)."""
    settings = {**overrides, "train.gradient_checkpointing": True, "train.max_steps": 2}
    setup = setup_training(config(**settings), tiny_hybrid_model, snapshot.path, tmp_path / "r")
    model = setup.trainer.model
    core = (model.get_base_model() if hasattr(model, "get_base_model") else model).model
    graphs: dict[str, list[bool]] = {"vision_model": [], "high_res_vision_model": [], "language_model": []}

    def record(name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if torch.is_grad_enabled():  # training steps, not evaluation
                graphs[name].append(bool(output.last_hidden_state.requires_grad))

        return hook

    for name in graphs:
        getattr(core, name).register_forward_hook(record(name))
    setup.trainer.train()
    assert len(graphs["language_model"]) >= 2 and all(graphs["language_model"])  # the LLM trains, recomputing
    assert graphs["vision_model"] and set(graphs["vision_model"]) == {vision_graph}
    assert graphs["high_res_vision_model"] and set(graphs["high_res_vision_model"]) == {vision_graph}


@pytest.mark.parametrize("variant", ["deepseek_vl", "deepseek_vl_hybrid"])
def test_full_mode_and_bf16_train(
    variant: str, tiny_models: dict[str, Path], snapshot: PreparedDataset, tmp_path: Path
) -> None:
    overrides = {"train.mode": "full", "train.max_steps": 3, "train.lr": 1e-3, "train.precision": "bf16"}
    result = train(config(**overrides), tiny_models[variant], snapshot.path, tmp_path / "r")
    assert result.precision == "bf16" and result.steps == 3
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.loss_history)
    # final/ is a complete model: full mode saves the weights themselves, float32 master weights included
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(result.final_dir)
    assert next(model.parameters()).dtype == torch.float32
    assert not (result.final_dir / "adapter_config.json").exists()


def test_fp16_training_of_float16_weights_is_refused_before_the_run_starts(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    """fp16's loss scaling cannot unscale float16 gradients (a GPU run stopped at its first step): weights trained
    fully in float16 are refused, naming the settings and the fixes, before the run folder exists (the fixed
    config starts afresh); LoRA alone (float32 adapters) is not."""
    from vlmops.errors import UserInputError
    from vlmops.train.sft import check_fp16_trainable

    overrides = {"train.mode": "full", "train.max_steps": 1, "train.precision": "fp16", "model.dtype": "float16"}
    with pytest.raises(UserInputError, match=r"model.dtype float16 with train.precision fp16 .* model.dtype: auto"):
        train(config(**overrides), tiny_model, snapshot.path, tmp_path / "r")
    assert not (tmp_path / "r").exists()
    lora = {"train.mode": "lora", "model.dtype": "float16"}
    check_fp16_trainable(load_config(None, lora), "fp16")
    with pytest.raises(UserInputError, match="the aligner weights"):
        check_fp16_trainable(load_config(None, {**lora, "train.freeze.aligner": False}), "fp16")
    check_fp16_trainable(load_config(None, overrides), "bf16")  # bf16 autocast scales nothing


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_fp16_training_of_float16_weights_is_refused_where_a_sharding_preset_shards_nothing(
    preset: str, tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zero2 / zero3 in a run of one process train without DeepSpeed (`resolve_deepspeed`), so float16 weights
    trained fully meet fp16's GradScaler as with train.deepspeed null: refused the same, before the run folder. The
    check ran on the preset as written, passed, and a GPU run stopped at its first step."""
    from vlmops.errors import UserInputError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    overrides = {
        "train.mode": "full",
        "train.max_steps": 1,
        "train.precision": "fp16",
        "model.dtype": "float16",
        "train.deepspeed": preset,
    }
    with pytest.raises(UserInputError, match=r"model.dtype float16 with train.precision fp16"):
        train(config(**overrides), tiny_model, snapshot.path, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_resume_refuses_a_different_setup(tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path) -> None:
    train(config(**{"train.max_steps": 2}), tiny_model, snapshot.path, tmp_path / "r")
    with pytest.raises(ValueError, match=r"(?s)train.lr: 0.005 -> 0.01.*new run folder"):
        train(config(**{"train.max_steps": 2, "train.lr": 1e-2}), tiny_model, snapshot.path, tmp_path / "r")
    # bookkeeping keys may change: this resumes (at the end already) instead of refusing
    again = train(config(**{"train.max_steps": 2, "run.name": "renamed"}), tiny_model, snapshot.path, tmp_path / "r")
    assert again.resumed_from == tmp_path / "r" / "checkpoint-2" and again.steps == 2


def test_resume_takes_moved_caches_and_validation_settings(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where torch.compile keeps its caches (model.compile_cache moved to a worker's lasting volume, as its docstring
    advises), where validation writes its rejects and which folders it lets images come from (the snapshot's hash
    says what came of them) change nothing a checkpoint holds: the run resumes. Each was refused as 'a run with a
    different setup', the fix given a new run folder, its steps lost."""
    from vlmops.models.compile_cache import ENV

    monkeypatch.delenv(ENV, raising=False)  # training points it at model.compile_cache: put back afterwards
    train(config(**{"train.max_steps": 2}), tiny_model, snapshot.path, tmp_path / "r")
    moved = {
        "train.max_steps": 2,
        "model.compile_cache": str(tmp_path / "compile-cache"),
        "model.shared_compile_cache": "s3://team/compile-cache",
        "data.rejects_file": str(tmp_path / "rejects.jsonl"),
        "data.allowed_roots": [str(tmp_path)],
    }
    again = train(config(**moved), tiny_model, snapshot.path, tmp_path / "r")
    assert again.resumed_from == tmp_path / "r" / "checkpoint-2" and again.steps == 2


def test_flash_attention_without_flash_attn_is_a_clear_error(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ValueError, match="flash-attn is not installed"):
        train(config(**{"model.attn": "flash_attention_2"}), tiny_model, snapshot.path, tmp_path / "r")


@pytest.mark.parametrize("variant", ["deepseek_vl", "deepseek_vl_hybrid"])
def test_loss_on_trained_positions_equals_the_full_loss(
    variant: str, tiny_models: dict[str, Path], snapshot: PreparedDataset, tmp_path: Path
) -> None:
    """The trainer computes logits only where a next token is learned; loss and gradients are unchanged."""
    setup = setup_training(
        config(**{"train.lora.targets": "all-linear"}), tiny_models[variant], snapshot.path, tmp_path
    )
    trainer, dataset = setup.trainer, setup.datasets["train"]
    batch = batch_of(dataset, [0, 1, 2, 3], dataset.tokenizer.pad_token_id)
    model = trainer.model
    model.train()
    torch.manual_seed(0)
    # The datasets hand the trainer uint8 images; the model's own forward takes the processor's values.
    assert batch["pixel_values"].dtype == torch.uint8
    as_processed = {k: dataset.pixels.values(k, v) if v.dtype == torch.uint8 else v for k, v in batch.items()}
    outputs = model(**as_processed)  # the model's own loss over every position
    full = outputs.loss
    full.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    torch.manual_seed(0)  # same dropout masks
    loss, narrow = trainer.compute_loss(model, dict(batch), return_outputs=True)
    loss.backward()
    assert narrow.logits.shape[1] < outputs.logits.shape[1]  # fewer positions went through the LM head
    assert float(loss) == pytest.approx(float(full), abs=1e-6)
    for name, grad in reference.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-6), name


def test_images_travel_as_uint8_and_train_as_the_processor_made_them(
    tiny_hybrid_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    """The datasets hand the trainer the processor's uint8 geometry (a quarter of the bytes through the DataLoader
    and to the GPU); the trainer's lookup gives the processor's float values, so the loss is the same, bit for bit."""
    setup = setup_training(config(), tiny_hybrid_model, snapshot.path, tmp_path)
    trainer, dataset = setup.trainer, setup.datasets["train"]
    pad = dataset.tokenizer.pad_token_id
    with_images = [i for i in range(len(dataset)) if dataset.encoded(i).images][:4]
    small = batch_of(dataset, with_images, pad)
    pixels, dataset.pixels = dataset.pixels, None  # the processor's own float32, as without the split
    full = batch_of(dataset, with_images, pad)
    dataset.pixels = pixels
    for key in ("pixel_values", "high_res_pixel_values"):
        assert small[key].dtype == torch.uint8 and full[key].dtype == torch.float32
        assert full[key].nbytes == 4 * small[key].nbytes
        assert torch.equal(pixels.values(key, small[key]), full[key])
    trainer.model.eval()  # no dropout: two forwards compute the same
    with torch.no_grad():
        assert torch.equal(trainer.compute_loss(trainer.model, dict(small)), trainer.compute_loss(trainer.model, full))


@pytest.mark.parametrize("variant", ["deepseek_vl", "deepseek_vl_hybrid"])
def test_padded_batches_learn_the_same_without_their_mask(
    variant: str, tiny_models: dict[str, Path], snapshot: PreparedDataset, tmp_path: Path
) -> None:
    """Right-padded batches under causal attention need no padding mask (what `causal_padding` does on a GPU, where
    it lets SDPA take its FlashAttention kernel): the same loss and gradients as with the mask."""
    setup = setup_training(config(), tiny_models[variant], snapshot.path, tmp_path)
    trainer, dataset = setup.trainer, setup.datasets["train"]
    assert not setup.speed.causal_padding  # CPU: the plain path
    batch = batch_of(dataset, [0, 1, 2, 3, 4, 5], dataset.tokenizer.pad_token_id)
    assert not bool(batch["attention_mask"].all())  # some rows are padded
    model = trainer.model
    model.train()
    results = []
    for causal_padding in (False, True):
        trainer.causal_padding = causal_padding
        model.zero_grad()
        torch.manual_seed(0)  # same dropout masks
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        results.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (masked, masked_grads), (unmasked, unmasked_grads) = results
    assert unmasked == pytest.approx(masked, abs=1e-6)
    for name, grad in masked_grads.items():
        assert torch.allclose(unmasked_grads[name], grad, atol=1e-6), name


def test_text_only_batch_in_bf16_runs_the_dummy_image_under_autocast(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    """bf16 training keeps the trained aligner (a modules_to_save copy) in float32 and runs the model under the
    accelerator's autocast; the dummy image of a text-only batch went through the towers outside it, so the bf16
    features met the float32 aligner ('mat1 and mat2 must have the same dtype'): the retrain flow's gpu test stopped
    at the first text-only step (step 35) on an H100. bf16 autocast runs on the CPU too."""
    setup = setup_training(config(**{"train.precision": "bf16"}), tiny_model, snapshot.path, tmp_path)
    trainer, dataset = setup.trainer, setup.datasets["train"]
    text_only = [i for i in range(len(dataset)) if not dataset.encoded(i).images][:2]
    model = trainer.accelerator.prepare_model(trainer.model)  # its forward under autocast, as train() has it
    model.train()
    batch = on_device(batch_of(dataset, text_only, dataset.tokenizer.pad_token_id), trainer.args.device)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    aligner = [p for n, p in model.named_parameters() if p.requires_grad and "aligner" in n]
    assert aligner and all(p.dtype == torch.float32 and p.grad is not None for p in aligner)
