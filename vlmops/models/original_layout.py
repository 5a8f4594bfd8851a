"""The original DeepSeek-VL release layout (ModelScope `deepseek-ai/deepseek-vl-*`), as data.

The release is `MultiModalityCausalLM` from github.com/deepseek-ai/DeepSeek-VL: a timm SigLIP ViT
(`vision_model.vision_tower.*`; on the 7b `vision_model.vision_tower_low.vision_tower.*` beside a SAM-B ViT
`vision_model.vision_tower_high.vision_tower.*`), an `MlpProjector` aligner (`aligner.*`) and a
`LlamaForCausalLM` (`language_model.*`). Its `config.json` says `model_type: multi_modality` and names the
towers by `model_name`; the sizes live in the original code's tables, copied here as `SIGLIP_TOWERS` and
`SAM_TOWERS`.

This module spells out the tower sizes, which the converter reads. Writing a random checkpoint in this
layout (for tests and benchmarks) is `vlmops.testing.fake_release`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmops.models.layout import ConversionError

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# siglip_vit.py's SigLIP_MODEL_CONFIG (the towers DeepSeek-VL uses) and sam.py's SAM_MODEL_CONFIG.
SIGLIP_TOWERS: dict[str, dict[str, Any]] = {
    "siglip_large_patch16_384": {"width": 1024, "layers": 24, "heads": 16, "patch_size": 16, "mlp_ratio": 4},
    "siglip_so400m_patch14_384": {
        "width": 1152,
        "layers": 27,
        "heads": 16,
        "patch_size": 14,
        "mlp_ratio": 3.7362,
    },
}
SAM_TOWERS: dict[str, dict[str, Any]] = {
    "sam_b_downsample": {
        "width": 768,
        "layers": 12,
        "heads": 12,
        "global_attn_indexes": [2, 5, 8, 11],
        "downsample_channels": [512, 1024],
    },
}
# Fixed in sam.py's create_sam_vit for every SAM tower.
SAM_FIXED: dict[str, Any] = {"patch_size": 16, "window_size": 14, "out_chans": 256, "mlp_ratio": 4}


@dataclass(frozen=True)
class SiglipSpec:
    """A timm SigLIP ViT as the release builds it (no class token, attention-pool head kept but unused)."""

    image_size: int
    width: int
    layers: int
    heads: int
    patch_size: int
    mlp_dim: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class SamSpec:
    """A SAM ViT image encoder with the release's neck, HD neck and downsampling convolutions."""

    image_size: int
    width: int
    layers: int
    heads: int
    patch_size: int
    window_size: int
    global_attn_indexes: tuple[int, ...]
    out_chans: int
    downsample_channels: tuple[int, ...]
    mlp_dim: int


def siglip_spec(params: dict[str, Any], where: str = "vision_config.params") -> SiglipSpec:
    """The SigLIP tower a `CLIPVisionTower` params dict describes.

    Sizes come from the original code's table for its `model_name`; a params dict may spell them out instead
    (`width`, `layers`, `heads`, `patch_size`, `mlp_ratio`), which is how tiny test checkpoints describe
    their towers. `select_layer` trims the tower the way `create_siglip_vit` does.
    """
    sizes = {**SIGLIP_TOWERS.get(str(params.get("model_name")), {}), **_explicit(params)}
    _require(sizes, ("width", "layers", "heads", "patch_size", "mlp_ratio"), params, where, SIGLIP_TOWERS)
    layers = int(sizes["layers"])
    select_layer = int(params.get("select_layer", -1))
    layers = min(layers, layers + select_layer + 1) if select_layer <= 0 else min(layers, select_layer)
    return SiglipSpec(
        image_size=int(params.get("image_size", 384)),
        width=int(sizes["width"]),
        layers=layers,
        heads=int(sizes["heads"]),
        patch_size=int(sizes["patch_size"]),
        mlp_dim=int(int(sizes["width"]) * float(sizes["mlp_ratio"])),
    )


def sam_spec(params: dict[str, Any], where: str = "vision_config.params.high_res_cfg") -> SamSpec:
    """The SAM tower a `high_res_cfg` params dict describes (same rules as `siglip_spec`)."""
    sizes = {**SAM_FIXED, **SAM_TOWERS.get(str(params.get("model_name")), {}), **_explicit(params)}
    _require(
        sizes,
        ("width", "layers", "heads", "global_attn_indexes", "downsample_channels"),
        params,
        where,
        SAM_TOWERS,
    )
    return SamSpec(
        image_size=int(params.get("image_size", 1024)),
        width=int(sizes["width"]),
        layers=int(sizes["layers"]),
        heads=int(sizes["heads"]),
        patch_size=int(sizes["patch_size"]),
        window_size=int(sizes["window_size"]),
        global_attn_indexes=tuple(int(i) for i in sizes["global_attn_indexes"]),
        out_chans=int(sizes["out_chans"]),
        downsample_channels=tuple(int(c) for c in sizes["downsample_channels"]),
        mlp_dim=int(int(sizes["width"]) * float(sizes["mlp_ratio"])),
    )


_SIZE_KEYS = (
    "width",
    "layers",
    "heads",
    "patch_size",
    "mlp_ratio",
    "window_size",
    "global_attn_indexes",
    "out_chans",
    "downsample_channels",
)


def _explicit(params: dict[str, Any]) -> dict[str, Any]:
    return {k: params[k] for k in _SIZE_KEYS if k in params}


def _require(
    sizes: dict[str, Any], keys: tuple[str, ...], params: dict[str, Any], where: str, table: dict[str, Any]
) -> None:
    missing = [k for k in keys if k not in sizes]
    if missing:
        raise ConversionError(
            f"{where}: tower model_name {params.get('model_name')!r} is not one the original code defines "
            f"({', '.join(table)}) and the params do not give its sizes ({', '.join(missing)} missing)"
        )
