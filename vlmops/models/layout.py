"""What a checkpoint folder holds: the DeepSeek-VL architectures and the two layouts, read from config.json.

The one place that reads a folder's `model_type`: the converter asks which layout a folder is in
(`detect_layout`), loading and training ask which native architecture it is (`native_arch`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from vlmops.errors import UserInputError

Arch = Literal["deepseek_vl", "deepseek_vl_hybrid"]
"""transformers model type: deepseek_vl (1.3b, SigLIP only) or deepseek_vl_hybrid (7b, SigLIP + SAM)."""
ARCHES: tuple[Arch, ...] = ("deepseek_vl", "deepseek_vl_hybrid")

Layout = Literal["original", "native"]
ORIGINAL_MODEL_TYPE = "multi_modality"  # the release's config.json (MultiModalityCausalLM)


class CheckpointError(UserInputError):
    """A checkpoint folder that is not what it should be; the message names the file and what to do."""


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file as a dict.

    Raises:
        CheckpointError: the file is not valid JSON or not a JSON object.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}): the file is damaged; download it again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _model_type(path: str | os.PathLike[str]) -> tuple[Path, Any]:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: it is not a model checkpoint folder")
    return config_file, read_json(config_file).get("model_type")


def detect_layout(path: str | os.PathLike[str]) -> Layout:
    """`original` for the release layout (model_type multi_modality), `native` for transformers' own.

    Raises:
        FileNotFoundError: no config.json in `path`.
        CheckpointError: a config.json of some other model (a ValueError).
    """
    config_file, model_type = _model_type(path)
    if model_type == ORIGINAL_MODEL_TYPE:
        return "original"
    if model_type in ARCHES:
        return "native"
    raise CheckpointError(
        f"{config_file}: model_type {model_type!r} is neither the DeepSeek-VL release layout "
        f"({ORIGINAL_MODEL_TYPE}) nor a native DeepSeek-VL checkpoint ({', '.join(ARCHES)})"
    )


def native_arch(path: str | os.PathLike[str]) -> Arch:
    """The architecture of a native checkpoint folder.

    Raises:
        FileNotFoundError: no config.json in `path`.
        CheckpointError: the folder is in the release layout (convert it first) or not a DeepSeek-VL model.
    """
    config_file, model_type = _model_type(path)
    if model_type == ORIGINAL_MODEL_TYPE:
        raise CheckpointError(
            f"{path} is in the original DeepSeek-VL release layout; convert it first: vlmops convert {path} OUT"
        )
    if model_type == "deepseek_vl":
        return "deepseek_vl"
    if model_type == "deepseek_vl_hybrid":
        return "deepseek_vl_hybrid"
    raise CheckpointError(f"{config_file}: model_type {model_type!r} is not a DeepSeek-VL checkpoint")


class ConversionError(CheckpointError):
    """A release checkpoint the converter refuses; the message names the file or key and what to do."""
