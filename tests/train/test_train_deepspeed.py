"""DeepSpeed presets: valid JSON, accepted by the HF Trainer (which fills every "auto") and by DeepSpeed's
own config parser; a user path that is missing or invalid is a clear error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vlmops.config import load_config
from vlmops.train.deepspeed_config import PRESETS, load_deepspeed_config, preset_path

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install 'vlmops[deepspeed]')")


@pytest.fixture(autouse=True)
def _zero3_off_afterwards() -> Iterator[None]:
    """TrainingArguments with a ZeRO-3 config switch on ZeRO-3 model init process-wide; switch it off again."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    yield
    unset_hf_deepspeed_config()


def autos(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in autos(v, f"{path}.{k}" if path else k)]
    return [path] if node == "auto" else []


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_filled_by_the_trainer_and_parsed_by_deepspeed(name: str, tiny_model: Path, tmp_path: Path) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import AutoModelForImageTextToText, TrainingArguments

    config = load_deepspeed_config(name)
    assert config == json.loads(preset_path(name).read_text())
    assert autos(config)  # batch sizes, clipping, precision and buckets are left to the Trainer
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)  # before the args turn ZeRO-3 init on
    args = TrainingArguments(
        output_dir=str(tmp_path),
        deepspeed=config,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        bf16=True,
        use_cpu=True,
        report_to="none",
    )
    hf_config = args.hf_deepspeed_config
    hf_config.trainer_config_finalize(args, model, 100)
    filled = hf_config.config
    assert autos(filled) == []
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 2
    assert filled["train_batch_size"] == 8 and filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["zero_optimization"]["reduce_bucket_size"] == 64 * 64  # the tiny LLM's hidden size, squared
    parsed = DeepSpeedConfig(filled)  # DeepSpeed's own validation (world size 1 here)
    assert parsed.zero_optimization_stage == (2 if name == "zero2" else 3)
    offloads_params = parsed.zero_config.offload_param is not None and parsed.zero_config.offload_param.device == "cpu"
    assert offloads_params == (name == "zero3-offload")
    optimizer = parsed.zero_config.offload_optimizer
    assert (optimizer.ratio if optimizer is not None else None) == {
        "zero3-offload": 1.0,
        "zero3-offload-partial": 0.7,
    }.get(name)
    assert hf_config.is_zero3() == (name != "zero2")
    assert hf_config.is_offload() == name.startswith("zero3-offload")


def test_user_json_path(tmp_path: Path) -> None:
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    assert load_deepspeed_config(str(own))["zero_optimization"]["stage"] == 2
    with pytest.raises(
        FileNotFoundError, match=r"train.deepspeed: '.*missing.json' is neither a preset \(zero2, zero3"
    ):
        load_deepspeed_config(str(tmp_path / "missing.json"))
    own.write_text('{"zero_optimization": {"stage": 2},\n  "bf16": }')
    with pytest.raises(ValueError, match=r"ds.json:2: not valid JSON"):
        load_deepspeed_config(str(own))
    own.write_text(
        json.dumps({"zero_optimization": {"stage": 4, "offload_param": {"device": "gpu"}}, "train_batch_size": 0})
    )
    with pytest.raises(ValueError) as err:
        load_deepspeed_config(str(own))
    message = str(err.value)
    assert '"zero_optimization.stage" must be 0, 1, 2 or 3' in message
    assert '"zero_optimization.offload_param.device" must be one of cpu, nvme, none' in message
    assert '"train_batch_size" must be "auto"' in message


def test_deepspeed_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    import torch

    from vlmops.train.sft import training_arguments

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="DeepSpeed through the HF Trainer runs on GPUs only"):
        training_arguments(load_config(None, {"train.deepspeed": "zero2"}), tmp_path, "fp32")


def test_deepspeed_not_installed_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed is an optional extra: asking for it without it names the extra (not accelerate's ImportError)."""
    import importlib.util

    from vlmops.train.sft import training_arguments

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ValueError, match=r"train.deepspeed is 'zero2', but DeepSpeed is not installed: pip install"):
        training_arguments(load_config(None, {"train.deepspeed": "zero2"}), tmp_path, "fp32")
