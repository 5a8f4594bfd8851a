"""The native transformers config of a release config.json (`multi_modality`, see `original_layout`).

Every size the native classes cannot express (a different aligner depth, SAM downsampling channels other
than 2x/4x its neck) is refused here, before any weight is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmops.models.layout import Arch, ConversionError
from vlmops.models.original_layout import SamSpec, SiglipSpec, sam_spec, siglip_spec
from vlmops.models.template import IMAGE_TOKEN


def release_arch(original: dict[str, Any], where: Path) -> Arch:
    vision = original.get("vision_config", {})
    cls = str(vision.get("cls", ""))
    projector = original.get("aligner_config", {}).get("params", {}).get("projector_type")
    if "HybridVisionTower" in cls and projector == "low_high_hybrid_split_mlp_gelu":
        return "deepseek_vl_hybrid"
    if "CLIPVisionTower" in cls and projector == "mlp_gelu":
        return "deepseek_vl"
    raise ConversionError(
        f"{where}: vision tower {cls!r} with aligner {projector!r} is not a DeepSeek-VL release "
        "(expected CLIPVisionTower + mlp_gelu for 1.3b, "
        "HybridVisionTower + low_high_hybrid_split_mlp_gelu for 7b)"
    )


def native_config(original: dict[str, Any], tokenizer: Any, arch: Arch, where: Path | str = "config.json") -> Any:
    """The native DeepseekVLConfig / DeepseekVLHybridConfig of an original config.json."""
    from transformers import DeepseekVLConfig, DeepseekVLHybridConfig, LlamaConfig

    params = original["vision_config"].get("params", {})
    aligner = original["aligner_config"].get("params", {})
    special = special_ids(tokenizer)
    language = {
        k: v
        for k, v in original.get("language_config", {}).items()
        if k not in ("torch_dtype", "dtype", "_name_or_path", "architectures", "transformers_version")
    }
    text = LlamaConfig(**{**language, "tie_word_embeddings": False, **special})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id >= text.vocab_size:
        raise ConversionError(
            f"{where}: {IMAGE_TOKEN} has token id {image_token_id}, outside the LLM's vocabulary of {text.vocab_size}"
        )
    if int(aligner.get("depth", 1)) != 2:
        raise ConversionError(f"{where}: aligner_config.params.depth is {aligner.get('depth')}; the release uses 2")
    if int(aligner.get("n_embed", -1)) != text.hidden_size:
        raise ConversionError(
            f"{where}: aligner n_embed {aligner.get('n_embed')} differs from the LLM hidden size {text.hidden_size}"
        )
    common = {"text_config": text, "image_token_id": image_token_id, "tie_word_embeddings": False, **special}
    if arch == "deepseek_vl":
        siglip = siglip_spec(params, f"{where}: vision_config.params")
        _same(where, "aligner input_dim", aligner.get("input_dim"), "SigLIP width", siglip.width)
        return DeepseekVLConfig(vision_config=_siglip_config(siglip), **common)
    if params.get("concat_type", "tuple") != "tuple":
        raise ConversionError(
            f"{where}: HybridVisionTower concat_type {params.get('concat_type')!r}; the release uses tuple"
        )
    siglip = siglip_spec(params["low_res_cfg"], f"{where}: vision_config.params.low_res_cfg")
    sam = sam_spec(params["high_res_cfg"], f"{where}: vision_config.params.high_res_cfg")
    expected = (2 * sam.out_chans, 4 * sam.out_chans)
    if sam.downsample_channels != expected:
        raise ConversionError(
            f"{where}: SAM downsample_channels {list(sam.downsample_channels)}; the native model supports "
            f"exactly {list(expected)} (2x and 4x the neck's {sam.out_chans} channels)"
        )
    _same(where, "aligner input_dim", aligner.get("input_dim"), "SigLIP width", siglip.width)
    _same(where, "aligner input_dim", aligner.get("input_dim"), "SAM output channels", expected[1])
    return DeepseekVLHybridConfig(
        vision_config=_siglip_config(siglip), high_res_vision_config=_sam_config(sam), **common
    )


def _same(where: Path | str, name: str, value: Any, other_name: str, other: int) -> None:
    if value is not None and int(value) != other:
        raise ConversionError(f"{where}: {name} {value} differs from the {other_name} {other}")


def _siglip_config(s: SiglipSpec) -> dict[str, Any]:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": s.width,
        "intermediate_size": s.mlp_dim,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "image_size": s.image_size,
        "patch_size": s.patch_size,
        "hidden_act": "gelu",  # timm's nn.GELU: exact, not the tanh approximation transformers defaults to
        "layer_norm_eps": 1e-6,
        "vision_use_head": False,
    }


def _sam_config(s: SamSpec) -> dict[str, Any]:
    return {
        "model_type": "sam_vision_model",
        "hidden_size": s.width,
        "output_channels": s.out_chans,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "mlp_dim": s.mlp_dim,
        "image_size": s.image_size,
        "patch_size": s.patch_size,
        "window_size": s.window_size,
        "global_attn_indexes": list(s.global_attn_indexes),
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
    }


def special_ids(tokenizer: Any) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def write_generation_config(folder: Path, tokenizer: Any) -> None:
    from transformers import GenerationConfig

    GenerationConfig(**special_ids(tokenizer)).save_pretrained(folder)
