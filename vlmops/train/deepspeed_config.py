"""DeepSpeed configs: the shipped presets or a user's JSON file.

- `zero2`: optimizer state and gradients sharded across GPUs (the seed's `default-zero2`).
- `zero3`: parameters sharded too.
- `zero3-offload`: ZeRO-3 with parameters and optimizer state in host memory (16 bytes of host RAM per trained
  parameter and more: the 7b needs a host with well over 128 GiB).
- `zero3-offload-partial`: parameters stay on the GPU, 70% of the optimizer state goes to the host (DeepSpeed's
  partial offload): the 7b full SFT on one 80 GB GPU and a 128 GiB host (see bench/RESULTS.md).

The presets leave batch sizes, clipping, precision and bucket sizes as "auto": the HF Trainer fills
them from `train.*`, so one config works for any model size and GPU count (as swift's `default-zero2`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PRESETS = ("zero2", "zero3", "zero3-offload", "zero3-offload-partial")
OFFLOAD_DEVICES = ("cpu", "nvme", "none")


def preset_path(name: str) -> Path:
    """The JSON file of a shipped preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown DeepSpeed preset {name!r}: use one of {', '.join(PRESETS)} or a path to a JSON file")
    return Path(str(resources.files("vlmops.train").joinpath("deepspeed_presets", f"{name}.json")))


def require_deepspeed(why: str) -> None:
    """Raise a clear error, saying `why` DeepSpeed is wanted, when it is not installed (it is an optional extra)."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            f"{why}, but DeepSpeed is not installed: pip install 'vlmops[deepspeed]' (or set train.deepspeed: null)"
        )


def load_deepspeed_config(value: str | None) -> dict[str, Any] | None:
    """`train.deepspeed` -> the config dict for `TrainingArguments(deepspeed=...)`; None when not set.

    Raises FileNotFoundError for a missing file and ValueError for one that is not a valid config.
    """
    if value is None:
        return None
    if value in PRESETS:
        path = preset_path(value)
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"train.deepspeed: {value!r} is neither a preset ({', '.join(PRESETS)}) nor an existing JSON file"
            )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"train.deepspeed: {path}:{err.lineno}: not valid JSON: {err.msg}") from None
    problems = validate_deepspeed_config(config)
    if problems:
        raise ValueError(
            f"train.deepspeed: {path} is not a usable DeepSpeed config:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    log.info("DeepSpeed config %s (ZeRO stage %s)", path, config["zero_optimization"]["stage"])
    return config


def validate_deepspeed_config(config: Any) -> list[str]:
    """Every problem with a DeepSpeed config that would stop the Trainer or DeepSpeed, one line each."""
    if not isinstance(config, dict):
        return ["the top level must be a JSON object"]
    problems = []
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict):
        problems.append('"zero_optimization" is missing; it needs at least {"stage": 2 or 3}')
    else:
        stage = zero.get("stage")
        if stage not in (0, 1, 2, 3):
            problems.append(f'"zero_optimization.stage" must be 0, 1, 2 or 3, got {stage!r}')
        for key in ("offload_optimizer", "offload_param"):
            offload = zero.get(key)
            if offload is None:
                continue
            device = offload.get("device") if isinstance(offload, dict) else None
            if device not in OFFLOAD_DEVICES:
                problems.append(
                    f'"zero_optimization.{key}.device" must be one of {", ".join(OFFLOAD_DEVICES)}, got {device!r}'
                )
            if key == "offload_param" and device not in (None, "none") and stage != 3:
                problems.append('"zero_optimization.offload_param" needs stage 3')
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = config.get(key, "auto")
        if value != "auto" and not (isinstance(value, int) and value >= 1):
            problems.append(f'"{key}" must be "auto" (filled from train.*) or a positive integer, got {value!r}')
    for key in ("bf16", "fp16"):
        section = config.get(key)
        if section is not None and (
            not isinstance(section, dict) or section.get("enabled", "auto") not in ("auto", True, False)
        ):
            problems.append(f'"{key}.enabled" must be "auto", true or false')
    if config.get("bf16", {}).get("enabled") is True and config.get("fp16", {}).get("enabled") is True:
        problems.append('"bf16" and "fp16" cannot both be enabled')
    return problems
