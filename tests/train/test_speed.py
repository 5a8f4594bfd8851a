"""The GPU speed levers: which ones a run gets, and the fused-loss forward computes the model's own loss.

The fused forward is exercised on CPU with the unfused head loss (Liger's kernels need CUDA): the patching, the
label shift, `shift_labels` / `logits_to_keep`, the `num_items_in_batch` normalisation and the gradients
are the same code either way; bench/train_bench.py compares the Liger path's loss curve on the GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from vlmops.config import ConfigError, load_config
from vlmops.models.template import IGNORE_INDEX
from vlmops.models.vision_graphs import graph_image_features
from vlmops.train.packing import TRAINED_INDEX_KEY, TRAINED_TARGETS_KEY, with_step_keys
from vlmops.train.speed import SpeedPlan, apply_speed, fuse_loss, liger_available, plan_speed, reference_head_loss
from vlmops.train.trainer import trained_positions


def test_cpu_gets_the_plain_path() -> None:
    plan = plan_speed(load_config(None).train, cuda=False, precision="fp32")
    assert not (plan.compile_layers or plan.fused_loss or plan.fused_adamw or plan.lora_compute_dtype)
    assert plan.why_off == {
        "compile": "no CUDA GPU",
        "fused_loss": "no CUDA GPU",
        "vision_graphs": "no CUDA GPU",
        "sam_folded": "no CUDA GPU",
        "sam_compile": "no CUDA GPU",
    }
    assert "off compile (no CUDA GPU)" in plan.describe()
    assert plan.pad_to_multiple_of == 1


def test_gpu_gets_every_lever_and_deepspeed_the_safe_ones() -> None:
    train = load_config(None, {"train.mode": "lora"}).train
    plan = plan_speed(train, cuda=True, precision="bf16")
    assert plan.compile_layers and plan.fused_adamw and plan.lora_compute_dtype and plan.vision_graphs
    assert plan.pad_to_multiple_of == 64  # compiled layers see a few bucketed lengths
    assert plan.fused_loss == liger_available()
    if not liger_available():
        assert "pip install 'vlmops[gpu]'" in plan.why_off["fused_loss"]
    zero3 = plan_speed(load_config(None, {"train.deepspeed": "zero3"}).train, cuda=True, precision="bf16")
    assert not (zero3.compile_layers or zero3.fused_loss or zero3.fused_adamw or zero3.lora_compute_dtype)
    assert not zero3.vision_graphs
    assert zero3.why_off["compile"] == "DeepSpeed is on"
    off = plan_speed(load_config(None, {"train.compile": "off"}).train, cuda=True, precision="bf16")
    assert not off.compile_layers and off.why_off["compile"] == "train.compile: off"
    assert not plan.sam_flex  # SAM's FlexAttention only when asked for (measured slower), and only on a GPU
    assert plan.sam_folded  # SAM's relative positions folded into the query and key: the default on a GPU
    flex = load_config(None, {"train.sam_attention": "flex"}).train
    assert plan_speed(flex, cuda=True, precision="bf16").sam_flex
    on_cpu = plan_speed(flex, cuda=False, precision="fp32")
    assert not on_cpu.sam_flex and on_cpu.why_off["sam_flex"] == "no CUDA GPU"
    on_cpu = plan_speed(load_config(None, {}).train, cuda=False, precision="fp32")
    assert not on_cpu.sam_folded and on_cpu.why_off["sam_folded"] == "no CUDA GPU"
    sdpa = plan_speed(load_config(None, {"train.sam_attention": "sdpa"}).train, cuda=True, precision="bf16")
    assert not (sdpa.sam_folded or sdpa.sam_flex)
    # The folded SAM tower compiled: the default on a GPU; not with transformers' attention, nor when switched off
    assert plan.sam_compiled and plan.sam_folded
    assert not sdpa.sam_compiled and sdpa.why_off["sam_compile"] == "SAM's attention is not folded"
    off = plan_speed(load_config(None, {"train.sam_compile": "off"}).train, cuda=True, precision="bf16")
    assert not off.sam_compiled and off.why_off["sam_compile"] == "train.sam_compile: off"
    assert not zero3.sam_compiled and zero3.why_off["sam_compile"] == "DeepSpeed is on"


def test_on_where_it_cannot_apply_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"train.compile: on, but no CUDA GPU; set it to auto"):
        plan_speed(load_config(None, {"train.compile": "on"}).train, cuda=False, precision="fp32")


def _batch(processor: Any, hybrid: bool) -> dict[str, torch.Tensor]:
    from PIL import Image

    from vlmops.models.template import IMAGE_TOKEN

    torch.manual_seed(0)
    texts = [f"{IMAGE_TOKEN} what colour is the square? it is red", f"{IMAGE_TOKEN} and this one? blue, mostly"]
    images = [[Image.new("RGB", (32, 32), (200, 20, 20))], [Image.new("RGB", (32, 32), (20, 20, 200))]]
    batch = dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
    labels = batch["input_ids"].clone()
    labels[:, : labels.shape[1] // 2] = IGNORE_INDEX  # the prompt half carries no loss
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    batch["labels"] = labels
    return batch


@pytest.mark.parametrize("arch", ["deepseek_vl", "deepseek_vl_hybrid"])
@pytest.mark.parametrize("items", [None, 7])
def test_fused_forward_gives_the_models_own_loss_and_gradients(
    arch: str, items: int | None, tiny_model: Path, tiny_hybrid_model: Path
) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = tiny_hybrid_model if arch == "deepseek_vl_hybrid" else tiny_model
    processor = AutoProcessor.from_pretrained(folder)
    batch = _batch(processor, arch == "deepseek_vl_hybrid")
    kwargs: dict[str, Any] = {} if items is None else {"num_items_in_batch": torch.tensor(items)}

    def loss_and_grads(fused: bool, positions: str | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
        if fused:
            fuse_loss(model, reference_head_loss)
        inputs = dict(batch, **kwargs)
        if positions == "logits_to_keep":
            inputs.update(trained_positions(inputs["labels"]))
        elif positions == "collator":  # flat positions and targets found on the CPU (`with_step_keys`)
            keys = with_step_keys(dict(batch), 0)
            inputs.update(trained_index=keys[TRAINED_INDEX_KEY], trained_targets=keys[TRAINED_TARGETS_KEY])
        output = model(**inputs)
        assert (output.logits is None) == fused  # the fused forward never materialises the logits
        loss = output.loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    reference, reference_grads = loss_and_grads(fused=False, positions=None)
    # plain labels, the trained positions + shift_labels, and the collator's flat positions + targets
    for positions in (None, "logits_to_keep", "collator"):
        loss, grads = loss_and_grads(fused=True, positions=positions)
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("arch", "sam_compiled"),
    [("deepseek_vl", False), ("deepseek_vl_hybrid", False), ("deepseek_vl_hybrid", True)],
)
def test_graphed_towers_train_the_same(
    arch: str, sam_compiled: bool, device: str, tiny_model: Path, tiny_hybrid_model: Path
) -> None:
    """Frozen towers routed through `graph_image_features` (graphs of one image, replayed per image on CUDA; eager
    on CPU): the model's forward gets what it got from its own towers, the loss and the trained weights' gradients are
    the same; a call asking for more than the features still runs the towers themselves. With `sam_compiled`, as
    `train.sam_compile: auto` sets up a GPU run: SAM's attention folded and its tower compiled, inside the graphs
    (other kernels, so float32 rounding differs in the last bits). On the CPU the tower is compiled with `aot_eager`:
    the same capture of its forward and backward, without inductor's C++ build of every kernel (about 90 s on two
    cores); inductor's CPU kernels are checked on the inference side (test_sam_tower_compiled_gives_the_eager_features),
    and the product compiles SAM for training on GPUs only (`train.sam_compile` needs CUDA)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmops.models.sam_attention import set_sam_attention, set_sam_compiled
    from vlmops.train.trainable import prepare_trainable

    folder = tiny_hybrid_model if arch == "deepseek_vl_hybrid" else tiny_model
    batch = {k: v.to(device) for k, v in _batch(AutoProcessor.from_pretrained(folder), False).items()}
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).to(device)
    model, _ = prepare_trainable(model, load_config(None, {"train.mode": "lora"}).train, seed=0)
    model.eval()  # no LoRA dropout: the two forwards draw the same numbers
    core = model.get_base_model().model

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    pixels = {k: v for k, v in batch.items() if k.endswith("pixel_values")}
    eager_features = core.get_image_features(**pixels, return_dict=True).pooler_output
    reference, reference_grads = loss_and_grads()
    if sam_compiled:
        set_sam_attention(core, "folded")
        assert set_sam_compiled(core, True, backend="inductor" if device == "cuda" else "aot_eager") == 1
    graphs = graph_image_features(core)
    # On CUDA the graphs hold one image each, where the eager towers took the batch of two in one go: other matmul
    # shapes, so float32 rounding may differ in the last bits. On CPU the towers run eagerly: exactly the same.
    exact = device == "cpu" and not sam_compiled
    tolerance = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-4, "atol": 1e-5}
    for _ in range(2):  # the first call captures, the second replays
        loss, grads = loss_and_grads()
        torch.testing.assert_close(loss, reference, **tolerance)
        assert grads.keys() == reference_grads.keys() and grads
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], **tolerance, msg=name)
    torch.testing.assert_close(core.get_image_features(**pixels).pooler_output, eager_features, **tolerance)
    assert len(graphs.graphs) == (1 if device == "cuda" else 0) and graphs.enabled  # one graph: one image each
    assert core.get_image_features.graphs is graphs  # what the benchmark reports
    full = core.get_image_features(**pixels, output_hidden_states=True)
    assert full.hidden_states is not None  # not the graphs' features-only output


def test_towers_that_train_keep_their_eager_forward(tiny_model: Path) -> None:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32)
    for param in model.parameters():
        param.requires_grad = False
    model.model.aligner.requires_grad_(True)
    original = model.model.get_image_features
    plan = apply_speed(model, SpeedPlan(vision_graphs=True, sam_compiled=True))
    trains = "the vision towers or the aligner train"
    assert not (plan.vision_graphs or plan.sam_compiled)
    assert plan.why_off == {"vision_graphs": trains, "sam_compile": trains}
    assert model.model.get_image_features == original
    model.model.aligner.requires_grad_(False)
    assert apply_speed(model, SpeedPlan(vision_graphs=True)).vision_graphs
    assert model.model.get_image_features != original


def test_fused_forward_without_labels_is_the_original(tiny_model: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    batch = _batch(processor, hybrid=False)
    batch.pop("labels")
    model = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(**batch).logits
        fuse_loss(model, reference_head_loss)
        torch.testing.assert_close(model(**batch).logits, expected)


def test_throughput_counts_the_steps_after_the_warmup_and_keeps_few_marks() -> None:
    import time

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from vlmops.train.trainer import Throughput

    meter, state = Throughput(), TrainerState()
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    assert meter.rates(2, warmup_steps=5) == (0.0, 0.0)
    for step in range(1, 201):
        state.global_step, state.num_input_tokens_seen = step, 100 * step
        time.sleep(0.0005)
        meter.on_step_end(args, state, TrainerControl())
    assert len(meter.marks) == Throughput.KEPT_WARMUP_MARKS + 1  # the warm-up marks and the latest
    samples_per_s, tokens_per_s = meter.rates(2, warmup_steps=5)
    assert samples_per_s > 0 and tokens_per_s / samples_per_s == pytest.approx(
        100 / 2
    )  # steps 5 -> 200, 2 samples each


def test_throughput_times_each_kept_step() -> None:
    """Per-step durations of the kept consecutive marks (the benchmark's compile outliers), none past them."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from vlmops.train.trainer import Throughput

    meter, state = Throughput(), TrainerState()
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    clock = iter(float(t) for t in [0, 1, 3, 3.5, *range(10, 200)])
    for step in range(1, 101):
        state.global_step = step
        meter.on_step_end(args, state, TrainerControl())
        _, tokens, at = meter.marks[-1]
        meter.marks[-1] = (next(clock), tokens, at)  # a known time for each step end (CPU marks are floats)
    durations = meter.step_seconds()
    assert durations[:3] == [1.0, 2.0, 0.5]
    # steps 2..64 (the first 64 step ends are kept in a row); the latest mark, step 100, is not the next one
    assert len(durations) == Throughput.KEPT_WARMUP_MARKS - 1


@pytest.mark.parametrize(
    ("settings", "graphed"),
    [
        ({"train.mode": "lora"}, True),  # adapters on the language model's q/k/v only
        ({"train.mode": "lora", "train.lora.targets": "all-linear"}, True),  # the language model's linears
        ({"train.mode": "lora", "train.lora.targets": "ALL"}, False),  # adapters in the towers too
        ({"train.mode": "lora", "train.freeze.aligner": False}, False),
        ({"train.mode": "full"}, False),  # the aligner trains by default
        ({"train.mode": "full", "train.freeze.aligner": True}, True),
    ],
)
def test_the_memory_estimate_knows_when_the_towers_run_from_graphs(
    settings: dict[str, Any], graphed: bool, tiny_hybrid_model: Path
) -> None:
    """`training_shape` must agree with what `apply_speed` will find on the model: the estimate counts one image's
    SAM transients with graphs, one per sample without."""
    from vlmops.train.batching import training_shape

    train = load_config(None, settings).train
    on = training_shape(tiny_hybrid_model, train, torch.bfloat16, plan_speed(train, cuda=True, precision="bf16"))
    assert on.high_res_vision and on.vision_graphs == graphed
    assert not training_shape(tiny_hybrid_model, train, torch.bfloat16, None).vision_graphs
