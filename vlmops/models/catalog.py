"""The models vlmops knows by name: where each one lives, what it needs, and its architecture.

`model.name` in pipeline.yaml is a catalog name (`vlmops models` lists them) or, with `model.source: local`
and `model.id: <folder>`, any label for your own checkpoint. `resolve` turns a `ModelConfig` into the one
source, id and revision to fetch; `architecture_config` gives the transformers config of a released
architecture, for random-initialised benchmark models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vlmops.config import ModelConfig

if TYPE_CHECKING:
    from transformers import DeepseekVLConfig, DeepseekVLHybridConfig

Arch = Literal["deepseek_vl", "deepseek_vl_hybrid"]
Source = Literal["modelscope", "huggingface", "local", "s3"]

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
    tiny_variant: Literal["deepseek_vl", "deepseek_vl_hybrid"] | None = None
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
MEMORY_NOTES = "measured (DESIGN.md §7), the seed's figures (ms-swift), or estimates from bytes per parameter"

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


def _tiny(name: str, variant: Literal["deepseek_vl", "deepseek_vl_hybrid"]) -> CatalogEntry:
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
        ValueError: unknown name; the message lists the known names and how to use your own folder.
    """
    entry = CATALOG.get(name)
    if entry is None:
        raise _unknown_name(name)
    return entry


def _unknown_name(name: str) -> ValueError:
    return ValueError(
        f"unknown model {name!r}. Known models: {', '.join(CATALOG)}. "
        "To use your own checkpoint, set model.source: local and model.id: /path/to/folder "
        "(model.name is then only a label)."
    )


def resolve(model_cfg: ModelConfig, output_dir: str | os.PathLike[str]) -> ResolvedModel:
    """Fill in the source, id and revision a `model:` section leaves to the catalog.

    A tiny entry with a local source lives at `<output_dir>/models/<name>` unless `model.id` names a folder.

    Raises:
        ValueError: the name is unknown and the section does not say where the weights are, or the chosen
            source does not publish this model.
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
            model_id = str(Path(output_dir) / "models" / entry.name)
        else:
            model_id = entry.hub_id(source)
        if model_id is None:
            where = {"local": "a folder", "s3": "an s3://bucket/prefix"}.get(source, "a hub id")
            hubs: tuple[Source, ...] = ("modelscope", "huggingface")
            published = [hub for hub in hubs if entry.hub_id(hub)]
            raise ValueError(
                f"model {entry.name} has no {source} id in the catalog: set model.id to {where}, "
                f"or use model.source: {' or '.join(published) or 'local'}"
            )
    _check_id(source, model_id)
    revision = model_cfg.revision if model_cfg.revision is not None else entry.hub_revision(source)
    return ResolvedModel(source, model_id, revision, entry)


def _check_id(source: Source, model_id: str) -> None:
    if source == "s3" and not model_id.startswith("s3://"):
        raise ValueError(f"model.source is s3 but model.id {model_id!r} is not an s3://bucket/prefix URI")
    if source in ("modelscope", "huggingface") and (model_id.startswith("s3://") or model_id.count("/") != 1):
        raise ValueError(
            f"model.id {model_id!r} is not a {source} id (owner/name); "
            "for a folder use model.source: local, for a bucket model.source: s3"
        )


def architecture_config(name: str) -> DeepseekVLConfig | DeepseekVLHybridConfig:
    """The transformers config of a catalog model's architecture, for random-initialised models.

    Released models get the released sizes (DESIGN.md §5); tiny entries get `tiny_config` with the tiny
    tokenizer's vocabulary (640 tokens; BOS, EOS, pad and image token are ids 0-3).
    """
    from transformers import DeepseekVLConfig, DeepseekVLHybridConfig

    from vlmops.models import tiny

    entry = get_entry(name)
    if entry.tiny_variant is not None:
        tiny_special = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
        config: DeepseekVLConfig | DeepseekVLHybridConfig = tiny.tiny_config(
            entry.tiny_variant, vocab_size=640, image_token_id=3, special=tiny_special
        )
        return config
    special: dict[str, Any] = {"bos_token_id": 100000, "eos_token_id": 100001}
    siglip: dict[str, Any] = {
        "model_type": "siglip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 16,
        "hidden_act": "gelu",  # exact GELU as in the release (the transformers default is tanh)
        "layer_norm_eps": 1e-6,
        "vision_use_head": False,  # the release drops SigLIP's attention-pool head
    }
    hybrid = entry.arch == "deepseek_vl_hybrid"
    text: dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": 4096 if hybrid else 2048,
        "intermediate_size": 11008 if hybrid else 5632,
        "num_hidden_layers": 30 if hybrid else 24,
        "num_attention_heads": 32 if hybrid else 16,
        "num_key_value_heads": 32 if hybrid else 16,
        "vocab_size": 102400,
        "max_position_embeddings": 16384,  # the released value; trained on 4096-token contexts
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        **special,
    }
    common: dict[str, Any] = {
        "text_config": text,
        "vision_config": siglip,
        "image_token_id": 100015,  # <image_placeholder> in the released tokenizer
        "tie_word_embeddings": False,  # the release has a separate lm_head; the config default is True
        **special,
    }
    if not hybrid:
        return DeepseekVLConfig(**common)
    sam: dict[str, Any] = {
        "model_type": "sam_vision_model",
        "hidden_size": 768,
        "output_channels": 256,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "mlp_dim": 3072,
        "image_size": 1024,
        "patch_size": 16,
        "window_size": 14,
        "global_attn_indexes": [2, 5, 8, 11],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
    }
    return DeepseekVLHybridConfig(**common, high_res_vision_config=sam)


def models_command() -> int:
    """`vlmops models`: the catalog as a table. Returns the exit code."""
    rows = [("name", "arch", "source", "id", "params", "infer bf16", "LoRA SFT", "full SFT")]
    for e in CATALOG.values():
        params = f"{e.params / 1e9:.2f}B" if e.params else "tiny"
        full = f"{e.full_sft_gib_per_gpu:g} GiB x{e.full_sft_gpus}"
        model_id = e.hub_id(e.default_source) or "built on demand"
        rows.append(
            (
                e.name,
                e.arch,
                e.default_source,
                model_id,
                params,
                f"{e.inference_bf16_gib:g} GiB",
                f"{e.lora_sft_gib:g} GiB",
                full,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"\nGPU memory per GPU: {MEMORY_NOTES}.")
    print("The HF hub has transformers-native copies: model.source: huggingface (deepseek-community/...).")
    print("Your own checkpoint: model.source: local and model.id: /path/to/folder.")
    return 0
