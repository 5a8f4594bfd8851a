"""Fake DeepSeek-VL releases for tests and benchmarks: random checkpoints in the original release layout.

Not for users: this writes what ModelScope's `deepseek-ai/deepseek-vl-*` repositories hold (config.json,
weights, tokenizer, preprocessor config) with random weights, so the converter and the download path can be
tested on tiny ones (`tiny_release_config`) and benchmarked on a full-size 7b (`release_config`). Every
tensor name and shape is spelled out (`original_shapes`); tensors are generated and written shard by shard.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vlmops.models.original_layout import CLIP_MEAN, CLIP_STD, SamSpec, SiglipSpec, sam_spec, siglip_spec
from vlmops.models.template import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN


def release_config(arch: str) -> dict[str, Any]:
    """config.json of the released deepseek-vl-1.3b-chat (`deepseek_vl`) or -7b-chat (`deepseek_vl_hybrid`).

    Reconstructed from the original code's defaults (the files themselves are on ModelScope).
    """
    if arch == "deepseek_vl":
        vision = {
            "cls": "CLIPVisionTower",
            "params": {
                "image_size": 384,
                "model_name": "siglip_large_patch16_384",
                "select_feature": "same",
                "select_layer": -1,
            },
        }
        aligner = {"depth": 2, "input_dim": 1024, "n_embed": 2048, "projector_type": "mlp_gelu"}
        language = {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
        }
    elif arch == "deepseek_vl_hybrid":
        vision = {
            "cls": "HybridVisionTower",
            "params": {
                "concat_type": "tuple",
                "freeze_high": True,
                "freeze_low": True,
                "high_res_cfg": {
                    "ckpt_path": "",
                    "image_size": 1024,
                    "model_name": "sam_b_downsample",
                    "output_dim": 1024,
                    "pixel_mean": CLIP_MEAN,
                    "pixel_std": CLIP_STD,
                    "select_feature": "same",
                    "select_layer": -1,
                },
                "low_res_cfg": {
                    "ckpt_path": "",
                    "image_size": 384,
                    "model_name": "siglip_large_patch16_384",
                    "output_dim": 1024,
                    "pixel_mean": [0.5, 0.5, 0.5],
                    "pixel_std": [0.5, 0.5, 0.5],
                    "select_feature": "same",
                    "select_layer": -1,
                },
            },
        }
        aligner = {
            "depth": 2,
            "input_dim": 1024,
            "n_embed": 4096,
            "projector_type": "low_high_hybrid_split_mlp_gelu",
        }
        language = {"num_hidden_layers": 30}  # the rest is LlamaConfig's default: 4096 / 11008 / 32 heads
    else:
        raise ValueError(f"unknown arch {arch!r}: use deepseek_vl or deepseek_vl_hybrid")
    return {
        "architectures": ["MultiModalityCausalLM"],
        "model_type": "multi_modality",
        "torch_dtype": "bfloat16",
        "vision_config": {"model_type": "vision", **vision},
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner", "params": aligner},
        "language_config": {
            "model_type": "llama",
            "max_position_embeddings": 16384,
            "torch_dtype": "bfloat16",
            "vocab_size": 102400,
            **language,
        },
    }


def original_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of an original-layout checkpoint with this config.json, name -> shape, in module order."""
    from transformers import LlamaConfig

    shapes: dict[str, tuple[int, ...]] = {}
    vision = config["vision_config"]
    params = vision.get("params", {})
    if vision.get("cls") == "HybridVisionTower":
        high = params["high_res_cfg"]
        _sam_shapes(shapes, "vision_model.vision_tower_high.vision_tower.", sam_spec(high))
        _siglip_shapes(shapes, "vision_model.vision_tower_low.vision_tower.", siglip_spec(params["low_res_cfg"]))
        shapes["vision_model.high_layer_norm.weight"] = (int(high.get("output_dim", 1024)),)
        shapes["vision_model.high_layer_norm.bias"] = (int(high.get("output_dim", 1024)),)
        low_dim = int(params["low_res_cfg"].get("output_dim", 1024))
        shapes["vision_model.low_layer_norm.weight"] = (low_dim,)
        shapes["vision_model.low_layer_norm.bias"] = (low_dim,)
    else:
        _siglip_shapes(shapes, "vision_model.vision_tower.", siglip_spec(params))

    aligner = config["aligner_config"]["params"]
    n_in, n_embed, depth = int(aligner["input_dim"]), int(aligner["n_embed"]), int(aligner.get("depth", 1))
    if aligner["projector_type"] == "mlp_gelu":
        _linear(shapes, "aligner.layers.0.", n_in, n_embed)
        for i in range(1, depth):
            _linear(shapes, f"aligner.layers.{2 * i}.", n_embed, n_embed)
    else:  # low_high_hybrid_split_mlp_gelu
        _linear(shapes, "aligner.high_up_proj.", n_in, n_embed // 2)
        _linear(shapes, "aligner.low_up_proj.", n_in, n_embed // 2)
        for i in range(1, depth):
            _linear(shapes, f"aligner.layers.{2 * i - 1}.", n_embed, n_embed)

    lang = LlamaConfig(**{k: v for k, v in config["language_config"].items() if k != "torch_dtype"})
    hidden, inter, vocab = lang.hidden_size, lang.intermediate_size, lang.vocab_size
    head_dim = hidden // lang.num_attention_heads
    kv = int(lang.num_key_value_heads or lang.num_attention_heads) * head_dim
    shapes["language_model.model.embed_tokens.weight"] = (vocab, hidden)
    for i in range(lang.num_hidden_layers):
        p = f"language_model.model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["language_model.model.norm.weight"] = (hidden,)
    shapes["language_model.lm_head.weight"] = (vocab, hidden)
    return shapes


def _linear(shapes: dict[str, tuple[int, ...]], prefix: str, n_in: int, n_out: int) -> None:
    shapes[prefix + "weight"] = (n_out, n_in)
    shapes[prefix + "bias"] = (n_out,)


def _siglip_shapes(shapes: dict[str, tuple[int, ...]], p: str, s: SiglipSpec) -> None:
    w, m = s.width, s.mlp_dim
    shapes[p + "pos_embed"] = (1, s.num_patches, w)
    shapes[p + "patch_embed.proj.weight"] = (w, 3, s.patch_size, s.patch_size)
    shapes[p + "patch_embed.proj.bias"] = (w,)
    for i in range(s.layers):
        b = f"{p}blocks.{i}."
        for norm in ("norm1", "norm2"):
            shapes[b + norm + ".weight"] = (w,)
            shapes[b + norm + ".bias"] = (w,)
        _linear(shapes, b + "attn.qkv.", w, 3 * w)
        _linear(shapes, b + "attn.proj.", w, w)
        _linear(shapes, b + "mlp.fc1.", w, m)
        _linear(shapes, b + "mlp.fc2.", m, w)
    shapes[p + "norm.weight"] = (w,)
    shapes[p + "norm.bias"] = (w,)
    # timm's AttentionPoolLatent (global_pool="map"): built by the release, never run (ignore_head=True).
    shapes[p + "attn_pool.latent"] = (1, 1, w)
    _linear(shapes, p + "attn_pool.q.", w, w)
    _linear(shapes, p + "attn_pool.kv.", w, 2 * w)
    _linear(shapes, p + "attn_pool.proj.", w, w)
    shapes[p + "attn_pool.norm.weight"] = (w,)
    shapes[p + "attn_pool.norm.bias"] = (w,)
    _linear(shapes, p + "attn_pool.mlp.fc1.", w, m)
    _linear(shapes, p + "attn_pool.mlp.fc2.", m, w)


def _sam_shapes(shapes: dict[str, tuple[int, ...]], p: str, s: SamSpec) -> None:
    w, grid, head_dim, c = s.width, s.image_size // s.patch_size, s.width // s.heads, s.out_chans
    shapes[p + "pos_embed"] = (1, grid, grid, w)
    shapes[p + "patch_embed.proj.weight"] = (w, 3, s.patch_size, s.patch_size)
    shapes[p + "patch_embed.proj.bias"] = (w,)
    for i in range(s.layers):
        b = f"{p}blocks.{i}."
        size = grid if i in s.global_attn_indexes else s.window_size
        shapes[b + "norm1.weight"] = (w,)
        shapes[b + "norm1.bias"] = (w,)
        _linear(shapes, b + "attn.qkv.", w, 3 * w)
        _linear(shapes, b + "attn.proj.", w, w)
        shapes[b + "attn.rel_pos_h"] = (2 * size - 1, head_dim)
        shapes[b + "attn.rel_pos_w"] = (2 * size - 1, head_dim)
        shapes[b + "norm2.weight"] = (w,)
        shapes[b + "norm2.bias"] = (w,)
        _linear(shapes, b + "mlp.lin1.", w, s.mlp_dim)
        _linear(shapes, b + "mlp.lin2.", s.mlp_dim, w)
    for neck in ("neck", "neck_hd"):
        shapes[f"{p}{neck}.0.weight"] = (c, w, 1, 1)
        shapes[f"{p}{neck}.1.weight"] = (c,)
        shapes[f"{p}{neck}.1.bias"] = (c,)
        shapes[f"{p}{neck}.2.weight"] = (c, c, 3, 3)
        shapes[f"{p}{neck}.3.weight"] = (c,)
        shapes[f"{p}{neck}.3.bias"] = (c,)
    n_in = c
    for i, n_out in enumerate(s.downsample_channels):
        shapes[f"{p}downsamples.{i}.weight"] = (n_out, n_in, 3, 3)
        n_in = n_out
    shapes[p + "hd_alpha_downsamples"] = (1,)


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A random tensor scaled so a forward pass stays in a sane range (unit-ish activations)."""
    if name.endswith("hd_alpha_downsamples"):
        return torch.full(shape, 0.5, dtype=dtype)  # the release initialises it to 0; 0.5 keeps the HD path alive
    values = torch.randn(shape, generator=generator, device=generator.device)
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1 and "norm" in name and leaf == "weight":
        values = 1.0 + 0.1 * values
    elif len(shape) == 1:
        values = 0.1 * values
    elif leaf == "weight":
        values = values / math.sqrt(math.prod(shape[1:]))
    else:  # pos_embed, rel_pos_*, latent
        values = 0.1 * values
    return values.to(dtype).cpu()


def write_original_checkpoint(
    out_dir: str | os.PathLike[str],
    config: dict[str, Any],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int | None = None,
    weights_format: str = "safetensors",
    device: str = "cpu",
) -> Path:
    """Write a random checkpoint in the original layout: config.json, weights, tokenizer, preprocessor config.

    Tensors are generated one at a time and written shard by shard (`shard_bytes` per shard, with a
    `model.safetensors.index.json`), so a full 7b needs no more RAM than one shard. `weights_format`
    "bin" writes a single `pytorch_model.bin` instead (small models only). `device` "cuda" draws the
    random numbers on the GPU (minutes faster for a 7b); the values then differ from a CPU draw.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generator = torch.Generator(device=device).manual_seed(seed)
    shapes = original_shapes(config)
    if weights_format == "bin":
        state = {name: random_tensor(name, shape, generator, dtype) for name, shape in shapes.items()}
        torch.save(state, out / "pytorch_model.bin")
    elif shard_bytes is None:
        state = {name: random_tensor(name, shape, generator, dtype) for name, shape in shapes.items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards = list(_shard_names(shapes, dtype, shard_bytes))
        weight_map: dict[str, str] = {}
        total = 0
        for index, names in enumerate(shards):
            file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            state = {name: random_tensor(name, shapes[name], generator, dtype) for name in names}
            total += sum(t.numel() * t.element_size() for t in state.values())
            save_file(state, str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
            del state
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    write_release_tokenizer(out)
    write_release_preprocessor_config(out, config)
    return out


def _shard_names(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, shard_bytes: int) -> Iterator[list[str]]:
    item = torch.empty((), dtype=dtype).element_size()
    names: list[str] = []
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * item
        if names and size + nbytes > shard_bytes:
            yield names
            names, size = [], 0
        names.append(name)
        size += nbytes
    if names:
        yield names


def write_release_tokenizer(out_dir: Path, with_pad_token: bool = True) -> None:
    """A small byte-level BPE tokenizer saved the way the release ships its own.

    Like the release: `tokenizer.json` prepends BOS through its post-processor, `tokenizer_config.json` names
    LlamaTokenizerFast with `add_bos_token: true` and no pad token, and `<image_placeholder>` is an added
    special token. `with_pad_token` adds `<｜▁pad▁｜>` to the vocabulary (not as the pad token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from vlmops.models.tiny import _CORPUS_WORDS

    specials = [BOS_TOKEN, EOS_TOKEN, *([PAD_TOKEN] if with_pad_token else []), IMAGE_TOKEN]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS_WORDS, "User: Assistant: \n\n", _CORPUS_WORDS.upper()] * 4, trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tok.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "additional_special_tokens": [IMAGE_TOKEN]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")


def write_release_preprocessor_config(out_dir: Path, config: dict[str, Any]) -> None:
    """preprocessor_config.json as the release's VLMImageProcessor writes it."""
    params = config["vision_config"].get("params", {})
    hybrid = config["vision_config"].get("cls") == "HybridVisionTower"
    size = int(params["high_res_cfg"]["image_size"] if hybrid else params.get("image_size", 384))
    mean = [0.5, 0.5, 0.5]
    processor = {
        "image_processor_type": "VLMImageProcessor",
        "processor_class": "VLChatProcessor",
        "image_size": size,
        "min_size": 14,
        "image_mean": mean,
        "image_std": mean,
        "rescale_factor": 1 / 255,
        # The hybrid towers normalise inside the model (pixel_mean/std in their params).
        "do_normalize": not hybrid,
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def tiny_release_config(arch: str) -> dict[str, Any]:
    """An original-layout config.json with tiny towers and LLM (sizes spelled out in the params).

    The tower sizes match `vlmops.models.tiny` (32px SigLIP in 8px patches, 64px SAM), so a converted tiny
    original behaves like a tiny native model.
    """
    config = release_config(arch)
    siglip = {"width": 32, "layers": 2, "heads": 2, "patch_size": 8, "mlp_ratio": 2}
    language = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": 4096,
        "vocab_size": 640,
        "torch_dtype": "float32",
    }
    config["language_config"] = language
    config["torch_dtype"] = "float32"
    params = config["vision_config"]["params"]
    if arch == "deepseek_vl":
        params.update(model_name="siglip_tiny", image_size=32, **siglip)
        config["aligner_config"]["params"].update(input_dim=32, n_embed=64)
        return config
    params["low_res_cfg"].update(model_name="siglip_tiny", image_size=32, output_dim=32, **siglip)
    sam = {
        "model_name": "sam_tiny",
        "image_size": 64,
        "width": 32,
        "layers": 2,
        "heads": 2,
        "patch_size": 8,
        "window_size": 4,
        "global_attn_indexes": [1],
        "out_chans": 16,
        "downsample_channels": [32, 64],
        "output_dim": 64,
    }
    params["high_res_cfg"].update(sam)
    # The hybrid aligner projects both towers from `input_dim`, so the SigLIP width must equal SAM's last
    # downsample channels (1024 on the release, 64 here).
    params["low_res_cfg"].update(width=64, output_dim=64)
    config["aligner_config"]["params"].update(input_dim=64, n_embed=64)
    return config
