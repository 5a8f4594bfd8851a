"""Each `train.lora.targets` / `train.freeze` / `train.mode` choice trains exactly the parameters it names."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from vlmops.config import load_config
from vlmops.models.tiny import VARIANTS
from vlmops.train.trainable import prepare_trainable

PEFT_PREFIX = "base_model.model."
QKV = ("q_proj", "k_proj", "v_proj")


def load(path: Path) -> nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path)


def linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def lora_param_names(modules: set[str]) -> set[str]:
    return {f"{PEFT_PREFIX}{m}.lora_{ab}.default.weight" for m in modules for ab in "AB"}


def trainable(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def lora_numel(model: nn.Module, modules: set[str], r: int) -> int:
    sizes = {n: m for n, m in model.named_modules() if n in modules}
    return sum(r * (m.in_features + m.out_features) for m in sizes.values())


def params_under(model: nn.Module, prefixes: tuple[str, ...]) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if n.startswith(prefixes)}


@pytest.fixture(params=VARIANTS)
def variant_model(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> tuple[str, Path]:
    return request.param, tiny_models[request.param]


def test_qkv_trains_only_llm_qkv_adapters(variant_model: tuple[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    _, path = variant_model
    base = load(path)
    expected_modules = {n for n in linear_names(base) if n.startswith("model.language_model.") and n.endswith(QKV)}
    assert len(expected_modules) == 2 * 3  # 2 layers in the tiny LLM
    numel = lora_numel(base, expected_modules, r=8)
    with caplog.at_level(logging.INFO, logger="vlmops.train.trainable"):
        model, summary = prepare_trainable(base, load_config().train)
    assert set(trainable(model)) == lora_param_names(expected_modules)
    assert summary.trainable_params == sum(trainable(model).values()) == numel == 2 * 3 * 8 * (64 + 64)
    assert f"trainable params: {numel:,} of {summary.total_params:,}" in caplog.text


def test_all_linear_trains_every_llm_linear_but_lm_head(variant_model: tuple[str, Path]) -> None:
    _, path = variant_model
    base = load(path)
    expected_modules = {n for n in linear_names(base) if n.startswith("model.language_model.")}
    assert len(expected_modules) == 2 * 7 and "lm_head" not in expected_modules
    numel = lora_numel(base, expected_modules, r=4)
    model, summary = prepare_trainable(
        base, load_config(None, {"train.lora.targets": "all-linear", "train.lora.r": 4}).train
    )
    assert set(trainable(model)) == lora_param_names(expected_modules)
    assert summary.trainable_params == numel


def test_ALL_reaches_vision_towers_and_aligner(variant_model: tuple[str, Path]) -> None:  # noqa: N802
    variant, path = variant_model
    base = load(path)
    expected_modules = linear_names(base) - {"lm_head"}
    assert any(n.startswith("model.vision_model.") for n in expected_modules)
    assert any(n.startswith("model.aligner.") for n in expected_modules)
    if variant == "deepseek_vl_hybrid":  # SAM's linear layers (attn.qkv, mlp.lin1/2) too
        assert any(n.startswith("model.high_res_vision_model.") for n in expected_modules)
    model, summary = prepare_trainable(base, load_config(None, {"train.lora.targets": "ALL"}).train)
    assert set(trainable(model)) == lora_param_names(expected_modules)
    assert summary.trainable_params == lora_numel(base, expected_modules, r=8)


def test_regex_targets_exactly_the_matching_modules(variant_model: tuple[str, Path]) -> None:
    _, path = variant_model
    base = load(path)
    regex = r"model\.language_model\.layers\.\d+\.mlp\.(gate|up)_proj"
    expected_modules = {n for n, _ in base.named_modules() if re.fullmatch(regex, n)}
    assert len(expected_modules) == 4
    model, _ = prepare_trainable(base, load_config(None, {"train.lora.targets": regex}).train)
    assert set(trainable(model)) == lora_param_names(expected_modules)


@pytest.mark.parametrize("part", ["aligner", "vision"])
def test_unfrozen_part_trains_fully_beside_the_adapters(variant_model: tuple[str, Path], part: str) -> None:
    variant, path = variant_model
    base = load(path)
    qkv = {n for n in linear_names(base) if n.startswith("model.language_model.") and n.endswith(QKV)}
    modules = ["model.aligner"] if part == "aligner" else ["model.vision_model"]
    if part == "vision" and variant == "deepseek_vl_hybrid":
        modules += ["model.high_res_vision_model", "model.high_res_vision_neck", "model.high_res_vision_proj"]
    copies = {
        f"{PEFT_PREFIX}{m}.modules_to_save.default{n[len(m) :]}": k
        for m in modules
        for n, k in params_under(base, (m + ".",)).items()
    }
    model, summary = prepare_trainable(base, load_config(None, {f"train.freeze.{part}": False}).train)
    assert set(trainable(model)) == lora_param_names(qkv) | set(copies)
    assert summary.trainable_params == lora_numel(base, qkv, 8) + sum(copies.values())
    assert summary.fully_trained_parts == [part]
    if part == "vision" and variant == "deepseek_vl_hybrid":  # a bare scalar peft cannot wrap: stays frozen
        assert not dict(model.named_parameters())[f"{PEFT_PREFIX}model.high_res_vision_alpha"].requires_grad


def test_full_mode_trains_aligner_and_llm_and_freezes_vision(variant_model: tuple[str, Path]) -> None:
    _, path = variant_model
    base = load(path)
    expected = params_under(base, ("model.aligner.", "model.language_model.", "lm_head."))
    model, summary = prepare_trainable(base, load_config(None, {"train.mode": "full"}).train)
    assert model is base  # no peft wrapper
    assert trainable(model) == expected
    assert summary.trainable_params == sum(expected.values())
    assert summary.total_params == sum(p.numel() for p in base.parameters())


def test_full_mode_freeze_switches(variant_model: tuple[str, Path]) -> None:
    variant, path = variant_model
    base = load(path)
    vision = ("model.vision_model.", "model.high_res_vision", "model.aligner.")
    expected = params_under(base, vision)
    if variant == "deepseek_vl_hybrid":
        assert "model.high_res_vision_alpha" in expected
    config = load_config(None, {"train.mode": "full", "train.freeze.vision": False, "train.freeze.llm": True})
    model, _ = prepare_trainable(base, config.train)
    assert trainable(model) == expected


def test_contradictions_and_bad_targets_are_clear_errors(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="freezes every part"):
        prepare_trainable(
            load(tiny_model),
            load_config(None, {"train.mode": "full", "train.freeze.aligner": True, "train.freeze.llm": True}).train,
        )
    with pytest.raises(ValueError, match=r"adapters inside vision.*train.freeze.vision: true"):
        prepare_trainable(
            load(tiny_model), load_config(None, {"train.lora.targets": "ALL", "train.freeze.vision": False}).train
        )
    with pytest.raises(ValueError, match="matches no module name"):
        prepare_trainable(load(tiny_model), load_config(None, {"train.lora.targets": "q_proj"}).train)
    with pytest.raises(ValueError, match="not a valid regex"):
        prepare_trainable(load(tiny_model), load_config(None, {"train.lora.targets": "model.(("}).train)
    with pytest.raises(ValueError, match=r"LoRA cannot adapt: model\.aligner\.activation \(GELU\)"):
        prepare_trainable(load(tiny_model), load_config(None, {"train.lora.targets": r"model\.aligner\..*"}).train)


def test_lora_init_is_seeded(tiny_model: Path) -> None:
    def adapters(seed: int) -> list[torch.Tensor]:
        model, _ = prepare_trainable(load(tiny_model), load_config().train, seed=seed)
        return [p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n]

    first, again, other = adapters(0), adapters(0), adapters(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(("targets", "vision_grads"), [("qkv", False), ("ALL", True)])
def test_frozen_vision_towers_record_no_graph(
    variant_model: tuple[str, Path], targets: str, vision_grads: bool
) -> None:
    """With gradient checkpointing on, only towers with trained weights behind them get input gradients: a
    frozen SigLIP/SAM must not run its backward (it would for every tower with enable_input_require_grads)."""
    from transformers import AutoProcessor

    from vlmops.train.sft import dummy_pixel_values
    from vlmops.train.trainable import require_grads_on_inputs
    from vlmops.train.trainer import vision_language_core

    _, path = variant_model
    config = load_config(None, [f"train.lora.targets={targets}"])
    model, _ = prepare_trainable(load(path), config.train, seed=0)
    hooked = require_grads_on_inputs(model)
    assert any(name.endswith("language_model.embed_tokens") for name in hooked)
    core = vision_language_core(model)
    pixels = dummy_pixel_values(AutoProcessor.from_pretrained(path))
    features = core.get_image_features(**pixels).pooler_output
    assert features.requires_grad == vision_grads
