"""The models vlmops knows by name: where each one lives, what it needs, and its architecture.

`model.name` in pipeline.yaml is a catalog name (`vlmops models` lists them) or, with `model.source: local`
and `model.id: <folder>`, any label for your own checkpoint. `resolve` turns a `ModelConfig` into the one
source, id and revision to fetch. (Random-initialised models of the released architectures, for
benchmarks, are `vlmops.testing.architectures`.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vlmops.config import ModelConfig, PipelineConfig
from vlmops.errors import UserInputError
from vlmops.models.layout import Arch

Source = Literal["modelscope", "huggingface", "local", "s3"]


class UnknownModelError(UserInputError):
    """A model name that is not in the catalog, with no model.source and model.id to say where it is."""


# Hub revisions. ModelScope's `master` and the HF hub's `main` are moving branches: a pin to a commit id is
# better (reproducible, and a later upstream push cannot change what a run downloads), but no commit ids of
# these repositories were available when this was written. Pin one yourself with `model.revision: <commit>`
# (ModelScope shows commit ids under "Files > History"; on the HF hub, `huggingface-cli repo info`).
MODELSCOPE_REVISION = "master"
HF_REVISION = "main"


@dataclass(frozen=True)
class CatalogEntry:
    """One known model. Memory numbers are GiB per GPU, as documented or measured (see MEMORY_NOTES)."""

    name: str
    """The catalog name (`model.name`)."""
    arch: Arch
    """transformers model type: deepseek_vl (1.3b, SigLIP only) or deepseek_vl_hybrid (7b, SigLIP + SAM)."""
    default_source: Source
    """Where the weights come from when `model.source` is not set."""
    params: int
    """Parameter count of the native (converted) model."""
    inference_bf16_gib: float
    """Peak GPU memory to chat in bf16 (one conversation, a few images)."""
    lora_sft_gib: float
    """Peak GPU memory of LoRA SFT on the LLM's q/k/v, gradient checkpointing on."""
    full_sft_gib_per_gpu: float
    """Peak GPU memory per GPU of full SFT over `full_sft_gpus` GPUs."""
    full_sft_gpus: int
    """GPUs the full-SFT figure assumes (DeepSpeed ZeRO-2 when above 1)."""
    modelscope_id: str | None = None
    """ModelScope id of the original release (converted on first download)."""
    hf_id: str | None = None
    """HF hub id of the transformers-native conversion (`deepseek-community/...`)."""
    modelscope_revision: str = MODELSCOPE_REVISION
    """Pinned ModelScope revision."""
    hf_revision: str = HF_REVISION
    """Pinned HF hub revision."""
    tiny_variant: Arch | None = None
    """For tiny entries: the `build_tiny_model` variant built on demand; None for released models."""

    def hub_id(self, source: Source) -> str | None:
        """The id of this model on a hub, None when it is not published there."""
        if source == "modelscope":
            return self.modelscope_id
        if source == "huggingface":
            return self.hf_id
        return None

    def hub_revision(self, source: Source) -> str | None:
        if source == "modelscope":
            return self.modelscope_revision
        if source == "huggingface":
            return self.hf_revision
        return None


# Where the memory numbers come from (GiB per GPU):
#   7b LoRA 20.5 and 1.3b LoRA 14.9: measured on an H100, DESIGN.md §7 (batch 4 / 8, 1088 tokens,
#     gradient checkpointing);
#     the seed (ms-swift) quotes "20GB" for 7b LoRA.
#   7b full SFT 70 x 4 GPUs: the seed (ms-swift, DeepSpeed ZeRO-2, flash-attn).
#   bf16 inference: the weights (2 bytes/param) plus ~1.5 GiB of activations and KV cache.
#   1.3b full SFT, one GPU: estimate, 16 bytes/param (bf16 weights and grads, fp32 master and AdamW moments)
#     plus ~6 GiB of checkpointed activations.
MEMORY_NOTES = (
    "measured on an H100 (LoRA: 7b batch 4, 1.3b batch 8, 1,088 tokens, gradient checkpointing), the seed's figures "
    "(ms-swift), or estimates from bytes per parameter"
)

_1_3B_PARAMS = 1_962_640_384  # native DeepseekVLForConditionalGeneration of the released config
_7B_PARAMS = 7_331_390_721  # native DeepseekVLHybridForConditionalGeneration of the released config


def _released(name: str, arch: Arch, hf_available: bool = True) -> CatalogEntry:
    small = arch == "deepseek_vl"
    return CatalogEntry(
        name=name,
        arch=arch,
        default_source="modelscope",
        params=_1_3B_PARAMS if small else _7B_PARAMS,
        inference_bf16_gib=5.5 if small else 15.5,
        lora_sft_gib=14.9 if small else 20.5,
        full_sft_gib_per_gpu=36.0 if small else 70.0,
        full_sft_gpus=1 if small else 4,
        modelscope_id=f"deepseek-ai/{name}",
        hf_id=f"deepseek-community/{name}" if hf_available else None,
    )


def _tiny(name: str, variant: Arch) -> CatalogEntry:
    return CatalogEntry(
        name=name,
        arch=variant,
        default_source="local",
        params=0,  # a few hundred thousand; built on the spot, so not worth pinning here
        inference_bf16_gib=0.1,
        lora_sft_gib=0.1,
        full_sft_gib_per_gpu=0.1,
        full_sft_gpus=1,
        tiny_variant=variant,
    )


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        _released("deepseek-vl-1.3b-chat", "deepseek_vl"),
        _released("deepseek-vl-7b-chat", "deepseek_vl_hybrid"),
        _released("deepseek-vl-1.3b-base", "deepseek_vl"),
        _released("deepseek-vl-7b-base", "deepseek_vl_hybrid"),
        _tiny("tiny-deepseek-vl", "deepseek_vl"),
        _tiny("tiny-deepseek-vl-hybrid", "deepseek_vl_hybrid"),
    )
}


@dataclass(frozen=True)
class ResolvedModel:
    """What `download_model` fetches: exactly one source, id and revision."""

    source: Source
    id: str
    revision: str | None
    entry: CatalogEntry | None
    """The catalog entry, None for a model that is not in the catalog (a local folder or an s3 prefix)."""


def get_entry(name: str) -> CatalogEntry:
    """The catalog entry called `name`.

    Raises:
        UnknownModelError: unknown name; the message lists the known names and how to use your own folder.
    """
    entry = CATALOG.get(name)
    if entry is None:
        raise _unknown_name(name)
    return entry


def _unknown_name(name: str) -> UnknownModelError:
    return UnknownModelError(
        f"unknown model {name!r}. Known models: {', '.join(CATALOG)}. "
        "To use your own checkpoint, set model.source: local and model.id: /path/to/folder "
        "(model.name is then only a label)."
    )


def built_models_dir(output_dir: str | os.PathLike[str]) -> Path:
    """The folder of `run.output_dir` where tiny catalog models are built, with their manifests."""
    return Path(output_dir) / "models"


def resolve(model_cfg: ModelConfig, output_dir: str | os.PathLike[str]) -> ResolvedModel:
    """Fill in the source, id and revision a `model:` section leaves to the catalog.

    A tiny entry with a local source lives at `<output_dir>/models/<name>` unless `model.id` names a folder.

    Raises:
        UnknownModelError: the name is unknown and the section does not say where the weights are.
        UserInputError: the chosen source does not publish this model, or model.id does not fit the source.
    """
    entry = CATALOG.get(model_cfg.name)
    if entry is None:
        if model_cfg.source is None or model_cfg.id is None:
            raise _unknown_name(model_cfg.name)
        _check_id(model_cfg.source, model_cfg.id)
        return ResolvedModel(model_cfg.source, model_cfg.id, model_cfg.revision, None)

    source: Source = model_cfg.source or entry.default_source
    model_id = model_cfg.id
    if model_id is None:
        if source == "local" and entry.tiny_variant is not None:
            model_id = str(built_models_dir(output_dir) / entry.name)
        else:
            model_id = entry.hub_id(source)
        if model_id is None:
            where = {"local": "a folder", "s3": "an s3://bucket/prefix"}.get(source, "a hub id")
            hubs: tuple[Source, ...] = ("modelscope", "huggingface")
            published = [hub for hub in hubs if entry.hub_id(hub)]
            raise UserInputError(
                f"model {entry.name} has no {source} id in the catalog: set model.id to {where}, "
                f"or use model.source: {' or '.join(published) or 'local'}"
            )
    _check_id(source, model_id)
    revision = model_cfg.revision if model_cfg.revision is not None else entry.hub_revision(source)
    return ResolvedModel(source, model_id, revision, entry)


WEIGHTS_KEYS = ("source", "id", "revision")
"""The `model:` keys that say where a model's weights come from: a config file's are its own model's."""


def catalog_model_config(config: PipelineConfig, name: str, overrides: Sequence[str] = ()) -> ModelConfig:
    """The `model:` section for catalog model `name`: the config's own section when it names that model, else that
    section with `name`, and with the catalog's source, id and revision unless `overrides` (the command line's
    `--set model.*` that names `name`) give them: the file's are another model's.

    Raises:
        UnknownModelError: `name` is not in the catalog.
    """
    if name == config.model.name:
        return config.model
    get_entry(name)
    keys = {item.partition("=")[0].strip() for item in overrides}
    given = set(WEIGHTS_KEYS) if "model" in keys else {key.removeprefix("model.") for key in keys}
    return config.model.model_copy(update={"name": name} | {key: None for key in WEIGHTS_KEYS if key not in given})


def _check_id(source: Source, model_id: str) -> None:
    if source == "s3" and not model_id.startswith("s3://"):
        raise UserInputError(f"model.source is s3 but model.id {model_id!r} is not an s3://bucket/prefix URI")
    if source == "s3" and any(part in ("", ".", "..") for part in model_id[len("s3://") :].rstrip("/").split("/")):
        # The copy goes to <cache_dir>/s3/<bucket>/<prefix>: '..' took it out of the cache (over other folders).
        raise UserInputError(
            f"model.id {model_id!r}: a bucket and prefix with an empty, '.' or '..' part name no folder to copy it "
            "to; write it as s3://bucket/some/prefix"
        )
    if source in ("modelscope", "huggingface") and (model_id.startswith("s3://") or model_id.count("/") != 1):
        raise UserInputError(
            f"model.id {model_id!r} is not a {source} id (owner/name); "
            "for a folder use model.source: local, for a bucket model.source: s3"
        )
