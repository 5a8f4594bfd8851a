"""`train.memory_gib`'s policy (`vlmops.train.memory.plan_batch`) on the released 1.3b / 7b shapes (no weights)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vlmops.config import load_config
from vlmops.testing.architectures import architecture_config
from vlmops.train.batching import resolve_deepspeed
from vlmops.train.memory import (
    GIB,
    OFFLOAD_PRESET,
    ModelShape,
    count_parameters,
    estimate_peak_bytes,
    fits_without_deepspeed,
    plan_batch,
)
from vlmops.train.speed import SpeedPlan

LONGEST, MEAN = 1700, 900  # realistic data: 64-1,500 text tokens and 0-2 images of 576 tokens


def lora_qkv_params(config: object, r: int = 8) -> int:
    text = config.text_config  # type: ignore[attr-defined]
    return 3 * text.num_hidden_layers * r * 2 * text.hidden_size


@pytest.fixture(scope="module")
def shapes() -> dict[str, ModelShape]:
    out = {}
    for size, name in (("1.3b", "deepseek-vl-1.3b-chat"), ("7b", "deepseek-vl-7b-chat")):
        config = architecture_config(name)
        out[size] = ModelShape.from_config(config, lora_qkv_params(config))
        total = out[size].total_params
        out[f"{size}-full"] = ModelShape.from_config(config, total - 450_000_000, frozen_bytes=4, master_weights=True)
    return out


def test_parameter_counts_of_the_released_architectures(shapes: dict[str, ModelShape]) -> None:
    assert shapes["1.3b"].total_params == 1_962_640_384
    assert shapes["7b"].total_params == 7_331_390_721
    assert count_parameters(architecture_config("tiny-deepseek-vl")) < 2_000_000


def test_the_estimate_matches_the_measured_7b_plain_loop(shapes: dict[str, ModelShape]) -> None:
    """The plain transformers + peft loop without recompute peaked at 40.8 GiB with 4 samples of ~1,100 tokens."""
    shape = shapes["7b"]
    estimate = estimate_peak_bytes(shape, 4 * 1100, False, 1.0, accumulates=False) / GIB
    assert 0.85 * 40.8 < estimate < 1.15 * 40.8


@pytest.mark.parametrize(
    ("micro_batch", "grad_accum", "recompute", "measured"),
    [(4, 1, False, 113.2), (4, 1, True, 105.0), (2, 2, False, 128.7)],
)
def test_the_estimate_matches_the_measured_full_7b(
    shapes: dict[str, ModelShape], micro_batch: int, grad_accum: int, recompute: bool, measured: float
) -> None:
    """Full SFT of the 7b on an H200 (compiled layers, fused loss, 1,135-token samples, 2026-12-02): the gradients
    fill in as the backward pass frees the activations and autocast's weight copies, unless earlier micro-batches
    of the step left theirs."""
    shape = replace(shapes["7b-full"], fused_loss=True, compiled=True)
    estimate = estimate_peak_bytes(shape, micro_batch * 1135, recompute, 1.0, grad_accum > 1) / GIB
    assert measured <= estimate < 1.06 * measured


def test_full_7b_on_an_h200_runs_without_recompute(shapes: dict[str, ModelShape]) -> None:
    """Measured on an H200: 8,660 tokens/s without recompute (micro-batches of 4, 113.2 GiB) against 5,625 with it
    (105.0 GiB) and 6,750 with micro-batches of 2 accumulated twice (128.7 GiB)."""
    shape = replace(shapes["7b-full"], fused_loss=True, compiled=True)
    plan = plan_batch(shape, 0.9 * 139.8, 4, 1135, 1134, packing=False)
    assert (plan.micro_batch, plan.grad_accum, plan.recompute, plan.activation_budget) == (4, 1, False, 1.0)


@pytest.mark.parametrize("size", ["1.3b", "7b", "1.3b-full", "7b-full"])
@pytest.mark.parametrize("memory_gib", [24.0, 40.0, 80.0, 125.0])
@pytest.mark.parametrize("packing", [False, True])
def test_plans_keep_the_step_and_fit_the_budget(
    shapes: dict[str, ModelShape], size: str, memory_gib: float, packing: bool
) -> None:
    shape = shapes[size]
    try:
        plan = plan_batch(shape, memory_gib, 16, LONGEST, MEAN, packing)
    except ValueError as err:
        assert "train.memory_gib" in str(err) and size.endswith("full")  # full SFT of 7b needs more than 24-80 GiB
        return
    assert plan.estimate_gib <= memory_gib
    if packing:
        assert plan.packing_tokens is not None and plan.packing_tokens >= LONGEST
        assert plan.grad_accum * plan.packing_tokens >= 16 * MEAN  # the step still holds ~16 samples
    else:
        assert plan.packing_tokens is None and plan.micro_batch * plan.grad_accum == 16


def test_more_memory_means_bigger_micro_batches_and_no_recompute(shapes: dict[str, ModelShape]) -> None:
    plans = [plan_batch(shapes["7b"], gib, 16, LONGEST, MEAN, packing=False) for gib in (20, 40, 125)]
    # 40 GiB: two samples without recompute (~3,400 tokens) keep the GPU busy enough (SATURATING_TOKENS)
    assert [p.recompute for p in plans] == [True, False, False]
    assert [p.micro_batch for p in plans] == [1, 2, 8]
    small, roomy = (plan_batch(shapes["1.3b"], gib, 16, LONGEST, MEAN, packing=True) for gib in (16, 125))
    assert not small.recompute and small.packing_tokens == 2880 and small.grad_accum == 5
    assert not roomy.recompute
    assert roomy.grad_accum == 1 and roomy.packing_tokens == 16 * MEAN


def test_recompute_is_only_bought_when_the_gpu_would_otherwise_starve(shapes: dict[str, ModelShape]) -> None:
    """Without recompute 1.3b fits ~4,900 tokens in 20 GiB: enough to keep the GPU busy, so no recompute."""
    plan = plan_batch(shapes["1.3b"], 20, 16, LONGEST, MEAN, packing=True)
    assert not plan.recompute and plan.packing_tokens == 3600 and plan.grad_accum == 4


def test_an_explicit_recompute_setting_is_kept(shapes: dict[str, ModelShape]) -> None:
    assert plan_batch(shapes["7b"], 125, 16, LONGEST, MEAN, packing=False, recompute=True).recompute
    forced = plan_batch(shapes["7b"], 40, 16, LONGEST, MEAN, packing=False, recompute=False)
    assert not forced.recompute and forced.micro_batch == 2


def test_a_budget_too_small_for_one_sample_says_what_to_do(shapes: dict[str, ModelShape]) -> None:
    with pytest.raises(ValueError, match=r"train.memory_gib 16: not even one sample of 1700 tokens"):
        plan_batch(shapes["7b"], 16, 16, LONGEST, MEAN, packing=False)
    with pytest.raises(ValueError, match="recompute"):
        plan_batch(shapes["7b"], 20, 16, LONGEST, MEAN, packing=False, recompute=False)
    # LoRA is a fix for full training alone: a LoRA run was told to train with LoRA
    with pytest.raises(ValueError) as lora:
        plan_batch(shapes["7b"], 16, 16, LONGEST, MEAN, packing=False)
    assert "LoRA" not in str(lora.value) and "DeepSpeed offload" in str(lora.value)
    with pytest.raises(ValueError, match=r"lower data.max_length, train with LoRA, or use a DeepSpeed offload"):
        plan_batch(shapes["7b-full"], 16, 16, LONGEST, MEAN, packing=False)


def test_a_budget_too_small_without_recompute_names_gradient_checkpointing(shapes: dict[str, ModelShape]) -> None:
    """train.gradient_checkpointing: false where a sample fits the budget only with recompute: the error names that
    key and its fix. It said 'about 18.5 GiB needed with recompute' to a budget of 24 and told the user to raise it."""
    with pytest.raises(
        ValueError, match=r"without recompute .*gradient_checkpointing: false.*: set train.gradient_che"
    ):
        plan_batch(shapes["7b"], 24, 16, LONGEST, MEAN, packing=False, recompute=False)
    with_it = plan_batch(shapes["7b"], 24, 16, LONGEST, MEAN, packing=False, recompute=True)  # as the error says
    assert with_it.recompute and with_it.estimate_gib <= 24
    # too small even with recompute: both fixes
    with pytest.raises(ValueError, match=r"gradient_checkpointing: auto and raise train.memory_gib"):
        plan_batch(shapes["7b"], 16, 16, LONGEST, MEAN, packing=False, recompute=False)


def test_the_gpu_speed_levers_shrink_the_estimate(shapes: dict[str, ModelShape]) -> None:
    """No logits with the fused loss; compiled layers keep a measured share of the plain activations."""
    import dataclasses

    from vlmops.train.memory import COMPILED_ACTIVATION_SHARE, HIGH_RES_VISION_BYTES_PER_TOKEN

    plain = shapes["7b"]
    fused = dataclasses.replace(plain, fused_loss=True)
    assert plain.logit_bytes == 2 + 4 + 4  # bf16 logits, the loss's float32 copy, the float32 gradient
    assert plain.bytes_per_token(False) - fused.bytes_per_token(False) == plain.vocab_size * plain.logit_bytes
    compiled = dataclasses.replace(fused, compiled=True)
    vision = HIGH_RES_VISION_BYTES_PER_TOKEN  # the 7b's SAM transients are not layer activations
    share = (compiled.bytes_per_token(False) - vision) / (fused.bytes_per_token(False) - vision)
    assert plain.high_res_vision and not shapes["1.3b"].high_res_vision
    assert share == pytest.approx(COMPILED_ACTIVATION_SHARE, abs=1e-3)
    # 20 GiB: recompute, micro-batches of 4 (measured 21.6 GiB at 8 x 1,088 tokens with recompute)
    plan = plan_batch(compiled, 20, 8, 1090, 1088, packing=False)
    assert plan.recompute and plan.micro_batch == 4 and plan.estimate_gib <= 20


def test_graphed_towers_let_the_7b_take_whole_steps_at_20_gib(shapes: dict[str, ModelShape]) -> None:
    """SAM's transients from CUDA graphs of one image are one image's, not one per sample: the 7b LoRA at 20 GiB then
    runs its 8 samples as one micro-batch with recompute. Measured on an H200 (1,135-token samples, 2026-12-02):
    17.9 GiB allocated (19.0 reserved) and 11.9k tokens/s, against 16.0 GiB and 11.7k for 4 x 2; eagerly, 8 x 1
    peaked at 21.6 GiB."""
    from vlmops.train.memory import HIGH_RES_VISION_GRAPH_BYTES, estimate_peak_bytes

    eager = replace(shapes["7b"], fused_loss=True, compiled=True)
    graphed = replace(eager, vision_graphs=True)
    assert graphed.persistent_bytes() - eager.persistent_bytes() == HIGH_RES_VISION_GRAPH_BYTES
    assert (plan_batch(eager, 20, 8, 1135, 1134, packing=False).micro_batch, eager.vision_graphs) == (4, False)
    plan = plan_batch(graphed, 20, 8, 1135, 1134, packing=False)
    assert (plan.micro_batch, plan.grad_accum, plan.recompute) == (8, 1, True)
    assert 19.0 <= plan.estimate_gib <= 20
    assert 16.0 <= estimate_peak_bytes(graphed, 4 * 1135, True, 1.0, True) / 2**30 <= 20
    # the 1.3b has no SAM: nothing changes
    assert replace(shapes["1.3b"], vision_graphs=True).bytes_per_token(False) == shapes["1.3b"].bytes_per_token(False)


def test_full_7b_fits_an_h200_without_deepspeed_but_not_an_80_gb_card(shapes: dict[str, ModelShape]) -> None:
    """The plain float32-master loop trained the 7b at 107.5 GiB on an H200 (DESIGN.md §7)."""
    fused = replace(shapes["7b-full"], fused_loss=True, compiled=True)  # the GPU levers: no logits kept
    assert fits_without_deepspeed(fused, 125.0, 4096)
    assert not fits_without_deepspeed(fused, 72.0, 4096)
    assert fits_without_deepspeed(shapes["1.3b-full"], 40.0, 4096)


def test_full_training_takes_the_offload_preset_only_where_it_would_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "7b"
    architecture_config("deepseek-vl-7b-chat").save_pretrained(base)

    gpu_levers = SpeedPlan(compile_layers=True, fused_loss=True, fused_adamw=True)

    def chosen(**overrides: object) -> str | None:
        return resolve_deepspeed(load_config(None, overrides), base, gpu_levers).train.deepspeed

    full = {"train.mode": "full"}
    assert chosen(**full, **{"train.memory_gib": 72}) is None  # no GPU here: as written
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, sized by train.memory_gib
    assert chosen(**full, **{"train.memory_gib": 72}) == OFFLOAD_PRESET
    assert chosen(**full, **{"train.memory_gib": 125}) is None  # fits: the fast path, no offload
    assert chosen(**{"train.mode": "lora", "train.memory_gib": 20}) is None
    assert chosen(**full, **{"train.memory_gib": 72, "train.auto_batch": False}) is None
    # A sharding preset in a run of one process shards nothing: taken as null, so the offload preset where it would
    # not fit; a run of several processes keeps it
    assert chosen(**full, **{"train.memory_gib": 72, "train.deepspeed": "zero2"}) == OFFLOAD_PRESET
    assert chosen(**full, **{"train.memory_gib": 125, "train.deepspeed": "zero3"}) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert chosen(**full, **{"train.memory_gib": 72, "train.deepspeed": "zero2"}) == "zero2"


def test_a_sharding_preset_in_a_run_of_one_process_trains_without_deepspeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    base = tmp_path / "1.3b"
    architecture_config("deepseek-vl-1.3b-chat").save_pretrained(base)

    def resolved(preset: str) -> tuple[str | None, list[str]]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vlmops.train.batching"):
            config = resolve_deepspeed(load_config(None, {"train.mode": "full", "train.deepspeed": preset}), base)
        said = [r.getMessage() for r in caplog.records if "would shard nothing" in r.getMessage()]
        return config.train.deepspeed, said

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for preset in ("zero2", "zero3"):
        chosen, said = resolved(preset)
        assert chosen is None and len(said) == 1
        assert said[0].startswith(f"train.deepspeed: {preset} ") and "trains without DeepSpeed" in said[0]
    assert resolved("zero3-offload") == ("zero3-offload", [])  # offload is a reason of its own on one GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolved("zero2") == ("zero2", [])


def test_compiled_layers_buy_bigger_micro_batches_with_selective_recompute(shapes: dict[str, ModelShape]) -> None:
    """1.3b LoRA at 16 GiB, 8 samples of ~1,135 tokens a step: 4 a micro-batch fit without recompute; with compiled
    layers the policy keeps a share of their activations instead and runs all 8 at once (measured on an H200: 50.9k
    tokens/s at 11.8 GiB with a budget of 0.5, against 31.7k at 11.4 GiB with micro-batches of 4)."""
    from vlmops.train.memory import SELECTIVE_MIN_BUDGET

    fused = replace(shapes["1.3b"], fused_loss=True)
    eager = plan_batch(fused, 16, 8, 1135, 1134, packing=False)
    assert (eager.micro_batch, eager.recompute, eager.activation_budget) == (4, False, 1.0)  # no compiler: no budget
    compiled = replace(fused, compiled=True)
    plan = plan_batch(compiled, 16, 8, 1135, 1134, packing=False)
    assert (plan.micro_batch, plan.grad_accum, plan.recompute) == (8, 1, False)
    assert SELECTIVE_MIN_BUDGET <= plan.activation_budget < 1 and plan.estimate_gib <= 16
    assert "selective (activation budget" in plan.describe()
    # the budget shrinks the layer activations only, in proportion
    full, half = compiled.bytes_per_token(False), compiled.bytes_per_token(False, 0.5)
    assert half == pytest.approx(full / 2, rel=1e-3)  # the 1.3b has no SAM transients, and the loss is fused
    # An explicit setting is kept; where even half the activations do not fit, full recompute as before.
    assert plan_batch(compiled, 16, 8, 1135, 1134, packing=False, recompute=False).activation_budget == 1.0
    seven = plan_batch(replace(shapes["7b"], fused_loss=True, compiled=True), 20, 8, 1090, 1088, packing=False)
    assert seven.recompute and seven.activation_budget == 1.0
    packed = plan_batch(compiled, 16, 8, 2700, 1225, packing=True)
    assert packed.grad_accum == 1 and packed.packing_tokens == 8 * 1225 and packed.activation_budget < 1


def test_apply_speed_hands_the_budget_to_the_compiler(tiny_model: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from vlmops.train.speed import apply_speed

    model = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32)
    before = torch._functorch.config.activation_memory_budget
    try:
        apply_speed(model, SpeedPlan(compile_layers=True), activation_budget=0.55)
        assert torch._functorch.config.activation_memory_budget == 0.55
    finally:
        torch._functorch.config.activation_memory_budget = before


def test_ddp_without_deepspeed_counts_its_gradient_buckets(
    shapes: dict[str, ModelShape], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several processes without DeepSpeed: DDP keeps a float32 bucket of every trained gradient for the whole run.
    The full 7b that fits an H200 alone does not fit it beside them (~24 GiB more): the offload preset is taken."""
    from vlmops.train.batching import training_shape

    full = replace(shapes["7b-full"], fused_loss=True, compiled=True)
    ddp = replace(full, ddp=True)
    assert ddp.persistent_bytes() - full.persistent_bytes() == full.trained_params * 4
    assert fits_without_deepspeed(full, 125.0, 4096) and not fits_without_deepspeed(ddp, 125.0, 4096)
    base = tmp_path / "7b"
    architecture_config("deepseek-vl-7b-chat").save_pretrained(base)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    levers = SpeedPlan(compile_layers=True, fused_loss=True, fused_adamw=True)
    config = load_config(None, {"train.mode": "full", "train.memory_gib": 125})
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not training_shape(base, config.train, torch.float32, levers).ddp
    assert resolve_deepspeed(config, base, levers).train.deepspeed is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert training_shape(base, config.train, torch.float32, levers).ddp
    assert resolve_deepspeed(config, base, levers).train.deepspeed == OFFLOAD_PRESET
    zero2 = load_config(None, {"train.mode": "full", "train.deepspeed": "zero2"})
    assert not training_shape(base, zero2.train, torch.float32, levers).ddp  # DeepSpeed reduces without DDP


def test_fp32_training_counts_4_byte_activations_and_logits(shapes: dict[str, ModelShape], tmp_path: Path) -> None:
    """`train.precision: fp32` keeps float32 activations and logits: twice the bytes of bf16 autocast's, so smaller
    micro-batches in the same budget (counted at 2 bytes, the 1.3b's plan at 24 GiB needed ~27)."""
    from vlmops.train.batching import training_shape

    base = tmp_path / "1.3b"
    architecture_config("deepseek-vl-1.3b-chat").save_pretrained(base)

    def shape(precision: str) -> ModelShape:
        return training_shape(base, load_config(None, {"train.precision": precision}).train, torch.float32)

    bf16, fp32 = shape("bf16"), shape("fp32")
    assert (bf16.activation_bytes, fp32.activation_bytes, shape("auto").activation_bytes) == (2, 4, 2)
    assert (bf16.logit_bytes, fp32.logit_bytes) == (10, 8)  # float32 logits need no float32 copy in the loss
    layers = replace(fp32, fused_loss=True).bytes_per_token(False)
    assert layers == 2 * replace(bf16, fused_loss=True).bytes_per_token(False)
    at_2, at_4 = (plan_batch(s, 24, 16, LONGEST, MEAN, packing=False) for s in (bf16, fp32))
    assert at_4.micro_batch * 2 <= at_2.micro_batch or (at_4.recompute and not at_2.recompute), (at_2, at_4)
    assert at_4.estimate_gib <= 24
