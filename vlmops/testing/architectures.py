"""The transformers configs of the catalog's architectures, for random-initialised models in benchmarks and
tests (the released weights are not needed to measure memory, speed or a conversion)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmops.models.catalog import get_entry

if TYPE_CHECKING:
    from transformers import DeepseekVLConfig, DeepseekVLHybridConfig


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


def released_image_processor(name: str) -> Any:
    """The image processor of a released model as `vlmops convert` builds it from the release's settings: 384 px
    SigLIP input (bicubic) for the 1.3b; for the 7b, 1,024 px SAM input (bicubic) and the 384 px input resized
    from that (bilinear, as the release's torchvision resize)."""
    from transformers import DeepseekVLHybridConfig, DeepseekVLHybridImageProcessorPil, DeepseekVLImageProcessorPil
    from transformers.image_utils import PILImageResampling

    from vlmops.models.tiny import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN

    hybrid = isinstance(architecture_config(name), DeepseekVLHybridConfig)
    common: dict[str, Any] = {
        "size": {"height": 384, "width": 384},
        "image_mean": SIGLIP_MEAN,
        "image_std": SIGLIP_MEAN,
        "min_size": 14,
    }
    if not hybrid:
        return DeepseekVLImageProcessorPil(**common, resample=PILImageResampling.BICUBIC)
    return DeepseekVLHybridImageProcessorPil(
        **common,
        resample=PILImageResampling.BILINEAR,
        high_res_size={"height": 1024, "width": 1024},
        high_res_image_mean=CLIP_MEAN,
        high_res_image_std=CLIP_STD,
        high_res_resample=PILImageResampling.BICUBIC,
    )
