"""Tiny random-initialised DeepSeek-VL models, built on the spot for tests and the embedded default.

They use transformers' native classes (`DeepseekVLForConditionalGeneration`, and the 7b-style
`DeepseekVLHybridForConditionalGeneration`), the real special tokens and the `deepseek` chat format; only
the sizes are small. The result is an ordinary checkpoint folder that `AutoModelForImageTextToText` and
`AutoProcessor` load.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vlmops.config import DEFAULT_SYSTEM_PROMPT
from vlmops.models.layout import ARCHES, Arch
from vlmops.models.original_layout import CLIP_MEAN, CLIP_STD
from vlmops.models.template import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN
from vlmops.staging import staged_folder

log = logging.getLogger(__name__)

Variant = Arch  # a tiny model of either architecture
VARIANTS = ARCHES

# Sizes: 32x32 SigLIP input in 8x8 patches -> 16 image tokens per image (576 on the real models).
LOW_RES = 32
HIGH_RES = 64
PATCH = 8
NUM_IMAGE_TOKENS = (LOW_RES // PATCH) ** 2
SIGLIP_MEAN = [0.5, 0.5, 0.5]
LM_HEAD_STD = 0.5

_CORPUS_WORDS = (
    "what colour color is the shape shapes image images picture first second third same different "
    "yes no and or of in on a an it this that these those which how many there are say hello hi "
    "red green blue yellow purple orange white black grey gray pink brown cyan magenta "
    "circle square triangle star cross ring diamond rectangle dot line big small large tiny "
    "left right top bottom middle centre center background foreground both neither count "
    "zero one two three four five six seven eight nine ten answer question user assistant system "
    "you are helpful language vision able to understand visual content provides assist with variety "
    "tasks using natural describe tell me please thanks thank what's name colours colors word only"
)


def build_tokenizer(out_dir: Path) -> None:
    """Train a small byte-level BPE with DeepSeek's special tokens and save it as a transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast

    specials = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [_CORPUS_WORDS, DEFAULT_SYSTEM_PROMPT, "User: Assistant: \n\n", _CORPUS_WORDS.upper()]
    lines += [w.capitalize() for w in _CORPUS_WORDS.split()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=4096,
        padding_side="left",
        add_bos_token=False,
    )
    fast.save_pretrained(out_dir)


def tiny_config(variant: Variant, vocab_size: int, image_token_id: int, special: dict[str, int]) -> Any:
    """The model config of a tiny model; the same classes and keys as the released ones."""
    from transformers import DeepseekVLConfig, DeepseekVLHybridConfig

    text_config: dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        **special,
    }
    vision_config: dict[str, Any] = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": LOW_RES,
        "patch_size": PATCH,
        "hidden_act": "gelu",
        "vision_use_head": False,
    }
    common: dict[str, Any] = {
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": image_token_id,
        "tie_word_embeddings": False,
        **special,
    }
    if variant == "deepseek_vl":
        return DeepseekVLConfig(**common)
    high_res: dict[str, Any] = {
        "model_type": "sam_vision_model",
        "hidden_size": 32,
        "output_channels": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": HIGH_RES,
        "patch_size": 8,
        "window_size": 4,
        "global_attn_indexes": [1],
        "mlp_dim": 64,
    }
    return DeepseekVLHybridConfig(**common, high_res_vision_config=high_res)


def image_processor(variant: Variant) -> Any:
    """The image processor of a tiny model: the released preprocessing at tiny resolutions."""
    from transformers import DeepseekVLHybridImageProcessorPil, DeepseekVLImageProcessorPil

    if variant == "deepseek_vl":
        return DeepseekVLImageProcessorPil(
            size={"height": LOW_RES, "width": LOW_RES}, image_mean=SIGLIP_MEAN, image_std=SIGLIP_MEAN
        )
    return DeepseekVLHybridImageProcessorPil(
        size={"height": LOW_RES, "width": LOW_RES},
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_MEAN,
        high_res_size={"height": HIGH_RES, "width": HIGH_RES},
        high_res_image_mean=CLIP_MEAN,
        high_res_image_std=CLIP_STD,
    )


def _wake_sam(sam: Any) -> None:
    """Redraw the SAM tower's convolutions (patch embedding, neck) at a unit-variance scale: transformers initialises
    them near 1e-10, which makes SAM's output ~0, so the hybrid's image features would not depend on its high-res
    image or SAM's attention, and no test of those would see a fault in them."""
    for module in sam.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.normal_(0.0, module.weight[0].numel() ** -0.5)


def build_tiny_model(out_dir: str | os.PathLike[str], variant: Variant = "deepseek_vl", seed: int = 0) -> Path:
    """Write a tiny random DeepSeek-VL checkpoint (model, tokenizer, processor) to `out_dir`.

    The folder is written aside and renamed into place, so a crash never leaves a half-built model.
    """
    from transformers import (
        AutoTokenizer,
        DeepseekVLForConditionalGeneration,
        DeepseekVLHybridForConditionalGeneration,
        DeepseekVLHybridProcessor,
        DeepseekVLProcessor,
    )

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}: use one of {', '.join(VARIANTS)}")
    out = Path(out_dir)
    with staged_folder(out) as staging:
        build_tokenizer(staging)
        tokenizer = AutoTokenizer.from_pretrained(staging)
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        image_token_id: int = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)  # type: ignore[assignment]
        config = tiny_config(variant, len(tokenizer), image_token_id, special)
        torch.manual_seed(seed)
        model_cls = (
            DeepseekVLForConditionalGeneration if variant == "deepseek_vl" else DeepseekVLHybridForConditionalGeneration
        )
        model: Any = model_cls(config)
        # With the default init (std 0.02) the LM head's logits span a fraction of a unit, so even a model that
        # answers every demo question right keeps a loss near ln(vocab); a wider head lets it become confident.
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, LM_HEAD_STD)
            if variant != "deepseek_vl":
                _wake_sam(model.model.high_res_vision_model)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(staging)
        processor_cls = DeepseekVLProcessor if variant == "deepseek_vl" else DeepseekVLHybridProcessor
        processor = processor_cls(
            image_processor=image_processor(variant), tokenizer=tokenizer, num_image_tokens=NUM_IMAGE_TOKENS
        )
        processor.save_pretrained(staging)
        (staging / "vlmops_model.json").write_text(
            json.dumps({"kind": "tiny", "variant": variant, "seed": seed}, indent=2) + "\n"
        )
    log.info("built tiny %s model at %s", variant, out)
    return out
