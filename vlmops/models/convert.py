"""Convert an original DeepSeek-VL release checkpoint to transformers' native classes, once.

The release (ModelScope `deepseek-ai/deepseek-vl-*`, `config.json` with `model_type: multi_modality`, see
`original_layout`) becomes a folder that `DeepseekVLForConditionalGeneration` (1.3b) or
`DeepseekVLHybridForConditionalGeneration` (7b) loads with no missing or unexpected keys, plus its processor
(tokenizer, image processor, the `deepseek` chat template). Key mapping: DESIGN.md §5.

Tensors are streamed one at a time from the input shards into output shards of `max_shard_bytes`, so a 7b
conversion holds one output shard in RAM, not the model twice. Everything is written into a staging folder
beside `dst` and renamed into place at the end: a crash leaves no folder a rerun would trust.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vlmops.config import DEFAULT_SYSTEM_PROMPT
from vlmops.errors import UserInputError
from vlmops.models.diskspace import check_free_space, gb, raise_if_disk_full
from vlmops.models.original_layout import CLIP_MEAN, CLIP_STD, SamSpec, SiglipSpec, sam_spec, siglip_spec
from vlmops.models.template import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN
from vlmops.staging import staged_folder

log = logging.getLogger(__name__)

Layout = Literal["original", "native"]
Arch = Literal["deepseek_vl", "deepseek_vl_hybrid"]

NATIVE_MODEL_TYPES = ("deepseek_vl", "deepseek_vl_hybrid")
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3

# Original tensors with no place in the native model, dropped on purpose. Anything that matches neither
# these nor a mapping rule stops the conversion: an unknown tensor means an unknown model.
DROPPED_KEYS: tuple[str, ...] = (
    # SigLIP's attention-pool head: built by timm (global_pool="map"), never run (ignore_head=True).
    r"vision_model\.vision_tower(?:_low\.vision_tower)?\.attn_pool\..+",
    # HybridVisionTower's high_layer_norm / low_layer_norm: created in __init__, unused in forward.
    r"vision_model\.(?:high|low)_layer_norm\.(?:weight|bias)",
    # RoPE inverse frequencies, a buffer some older Llama checkpoints saved; recomputed from the config.
    r"language_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
)
_DROPPED = [re.compile(p) for p in DROPPED_KEYS]

Op = Literal["copy", "squeeze0", "split_qkv"]


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]
    target: str  # a re.sub template; split_qkv targets hold `{qkv}` for q/k/v
    op: Op = "copy"


def _rules(prefix: str, table: list[tuple[str, str, Op]]) -> list[_Rule]:
    return [_Rule(re.compile(re.escape(prefix) + pattern), target, op) for pattern, target, op in table]


def _siglip_rules(prefix: str) -> list[_Rule]:
    out = "model.vision_model."
    return _rules(
        prefix,
        [
            # timm keeps a [1, N, C] parameter; transformers an nn.Embedding of [N, C].
            (r"pos_embed", out + "embeddings.position_embedding.weight", "squeeze0"),
            (r"patch_embed\.proj\.(weight|bias)", out + r"embeddings.patch_embedding.\1", "copy"),
            (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", out + r"encoder.layers.\1.layer_norm\2.\3", "copy"),
            # timm's fused qkv is [q; k; v] along dim 0 (reshape(B, N, 3, heads, head_dim)).
            (
                r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)",
                out + r"encoder.layers.\1.self_attn.{qkv}_proj.\2",
                "split_qkv",
            ),
            (
                r"blocks\.(\d+)\.attn\.proj\.(weight|bias)",
                out + r"encoder.layers.\1.self_attn.out_proj.\2",
                "copy",
            ),
            (r"blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)", out + r"encoder.layers.\1.mlp.fc\2.\3", "copy"),
            (r"norm\.(weight|bias)", out + r"post_layernorm.\1", "copy"),
        ],
    )


def _sam_rules(prefix: str) -> list[_Rule]:
    enc = "model.high_res_vision_model.vision_encoder."
    neck = {"0.weight": "conv1.weight", "2.weight": "conv2.weight"}
    table: list[tuple[str, str, Op]] = [
        (r"pos_embed", enc + "pos_embed", "copy"),  # same [1, H, W, C] shape in both
        (r"patch_embed\.proj\.(weight|bias)", enc + r"patch_embed.projection.\1", "copy"),
        (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", enc + r"layers.\1.layer_norm\2.\3", "copy"),
        (
            r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)",
            enc + r"layers.\1.attn.\2.\3",
            "copy",
        ),  # SAM keeps qkv fused
        (r"blocks\.(\d+)\.attn\.rel_pos_([hw])", enc + r"layers.\1.attn.rel_pos_\2", "copy"),
        (r"blocks\.(\d+)\.mlp\.lin([12])\.(weight|bias)", enc + r"layers.\1.mlp.lin\2.\3", "copy"),
        (r"downsamples\.0\.weight", "model.high_res_vision_proj.conv1.weight", "copy"),
        (r"downsamples\.1\.weight", "model.high_res_vision_proj.conv2.weight", "copy"),
        (r"hd_alpha_downsamples", "model.high_res_vision_alpha", "copy"),
    ]
    for original, native in (("neck", enc + "neck."), ("neck_hd", "model.high_res_vision_neck.")):
        for index, name in neck.items():
            table.append((re.escape(f"{original}.{index}"), native + name, "copy"))
        table.append((re.escape(original) + r"\.1\.(weight|bias)", native + r"layer_norm1.\1", "copy"))
        table.append((re.escape(original) + r"\.3\.(weight|bias)", native + r"layer_norm2.\1", "copy"))
    return _rules(prefix, table)


_LANGUAGE_RULES = _rules(
    "language_model.",
    [
        (r"model\.(embed_tokens\.weight|norm\.weight)", r"model.language_model.\1", "copy"),
        (
            r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj\.(?:weight|bias)|mlp\.(?:gate|up|down)_proj\.weight"
            r"|input_layernorm\.weight|post_attention_layernorm\.weight)",
            r"model.language_model.layers.\1.\2",
            "copy",
        ),
        (r"lm_head\.weight", "lm_head.weight", "copy"),
    ],
)

RULES: dict[Arch, list[_Rule]] = {
    "deepseek_vl": [
        *_siglip_rules("vision_model.vision_tower."),
        *_rules(
            "aligner.",
            [
                (r"layers\.0\.(weight|bias)", r"model.aligner.linear1.\1", "copy"),
                (r"layers\.2\.(weight|bias)", r"model.aligner.linear2.\1", "copy"),
            ],
        ),
        *_LANGUAGE_RULES,
    ],
    "deepseek_vl_hybrid": [
        *_siglip_rules("vision_model.vision_tower_low.vision_tower."),
        *_sam_rules("vision_model.vision_tower_high.vision_tower."),
        *_rules(
            "aligner.",
            [
                (r"low_up_proj\.(weight|bias)", r"model.aligner.vision_proj.\1", "copy"),
                (r"high_up_proj\.(weight|bias)", r"model.aligner.high_res_vision_proj.\1", "copy"),
                (r"layers\.1\.(weight|bias)", r"model.aligner.proj.\1", "copy"),
            ],
        ),
        *_LANGUAGE_RULES,
    ],
}


class ConversionError(UserInputError):
    """The checkpoint cannot be converted; the message names the file or key and what to do."""


@dataclass
class ConversionReport:
    """What a conversion did."""

    src: Path
    dst: Path
    arch: Arch
    tensors_in: int = 0
    tensors_out: int = 0
    dropped: list[str] = field(default_factory=list)
    shards: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


def detect_layout(path: str | os.PathLike[str]) -> Layout:
    """`original` for the release layout (model_type multi_modality), `native` for transformers' own.

    Raises:
        FileNotFoundError: no config.json in `path`.
        ValueError: a config.json of some other model.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: it is not a model checkpoint folder")
    model_type = _read_json(config_file).get("model_type")
    if model_type == "multi_modality":
        return "original"
    if model_type in NATIVE_MODEL_TYPES:
        return "native"
    raise ValueError(
        f"{config_file}: model_type {model_type!r} is neither the DeepSeek-VL release layout "
        f"(multi_modality) nor a native DeepSeek-VL checkpoint ({', '.join(NATIVE_MODEL_TYPES)})"
    )


def map_original_key(key: str, arch: Arch) -> list[tuple[str, Op]] | None:
    """Where an original tensor goes: [(native key, op)], None when it is deliberately dropped.

    Raises:
        ConversionError: the key matches no mapping rule and is not on `DROPPED_KEYS`.
    """
    for rule in RULES[arch]:
        match = rule.pattern.fullmatch(key)
        if match is None:
            continue
        target = match.expand(rule.target)
        if rule.op == "split_qkv":
            return [(target.replace("{qkv}", part), rule.op) for part in ("q", "k", "v")]
        return [(target, rule.op)]
    if any(p.fullmatch(key) for p in _DROPPED):
        return None
    raise ConversionError(
        f"tensor {key!r} is not part of the DeepSeek-VL release layout ({arch}): it matches no conversion "
        "rule and is not on the list of deliberately dropped keys (vlmops.models.convert.DROPPED_KEYS). "
        "The checkpoint is not a DeepSeek-VL release, or it was modified; convert only the original files."
    )


def convert_tensor(key: str, tensor: torch.Tensor, arch: Arch) -> list[tuple[str, torch.Tensor]]:
    """The native (key, tensor) pairs for one original tensor; [] for a dropped one."""
    targets = map_original_key(key, arch)
    if targets is None:
        return []
    op = targets[0][1]
    if op == "squeeze0":
        if tensor.dim() < 1 or tensor.shape[0] != 1:
            raise ConversionError(f"tensor {key!r} has shape {tuple(tensor.shape)}; expected a leading dim of 1")
        return [(targets[0][0], tensor.squeeze(0).contiguous())]
    if op == "split_qkv":
        if tensor.shape[0] % 3:
            raise ConversionError(f"tensor {key!r} has shape {tuple(tensor.shape)}; dim 0 is not q, k, v stacked")
        # clone: safetensors refuses tensors that share storage
        return [(name, part.clone()) for (name, _), part in zip(targets, tensor.chunk(3, dim=0), strict=True)]
    return [(targets[0][0], tensor)]


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    verify: bool = True,
) -> ConversionReport:
    """Convert an original-layout checkpoint folder `src` into a new native folder `dst`.

    Args:
        max_shard_bytes: largest output shard; a model above it is written sharded with an index.
        verify: load the result with the native class and refuse it unless no key is missing or unexpected.

    Raises:
        FileExistsError: `dst` exists (delete it or pick another folder).
        ConversionError: the checkpoint does not fit the release layout; the message names the file/key.
        DiskFullError: not enough disk space (an OSError, errno ENOSPC; the message says how much).
    """
    src_dir, dst_dir = Path(src), Path(dst)
    started = time.perf_counter()
    if detect_layout(src_dir) != "original":
        raise ConversionError(f"{src_dir} is already a native transformers checkpoint: load it as is")
    if dst_dir.exists():
        raise FileExistsError(f"{dst_dir} already exists: delete it or choose another output folder")
    original = _read_json(src_dir / "config.json")
    arch = _arch_of(original, src_dir / "config.json")
    weight_files = _weight_files(src_dir)
    check_free_space(dst_dir.parent, sum(f.stat().st_size for f in weight_files), f"converting into {dst_dir}")

    # Config and tokenizer first: a config the native classes cannot hold fails before any weight is read.
    tokenizer = _build_tokenizer(src_dir, original)
    config = native_config(original, tokenizer, arch, src_dir / "config.json")

    report = ConversionReport(src=src_dir, dst=dst_dir, arch=arch)
    try:
        with staged_folder(dst_dir) as staging:
            writer = _ShardWriter(staging, max_shard_bytes)
            dtype: torch.dtype | None = None
            for key, tensor in _iter_tensors(weight_files):
                report.tensors_in += 1
                converted = convert_tensor(key, tensor, arch)
                if not converted:
                    report.dropped.append(key)
                for name, value in converted:
                    dtype = dtype or value.dtype
                    writer.add(name, value)
            report.tensors_out, report.shards, report.bytes_written = writer.finish()
            config.dtype = dtype or torch.float32  # as stored: bf16 for the release, never silently widened
            config.save_pretrained(staging)
            _write_generation_config(staging, tokenizer)
            _build_processor(src_dir, original, tokenizer, arch).save_pretrained(staging)
            (staging / "vlmops_model.json").write_text(
                json.dumps({"kind": "converted", "arch": arch, "source_layout": "multi_modality"}, indent=2) + "\n"
            )
            if verify:
                verify_native_checkpoint(staging, arch)
    except OSError as err:
        raise_if_disk_full(err, dst_dir.parent, "converting")
        raise
    report.seconds = time.perf_counter() - started
    log.info(
        "converted %s -> %s: %d tensors in, %d out, %d dropped, %d shard(s), %.1fs",
        src_dir,
        dst_dir,
        report.tensors_in,
        report.tensors_out,
        len(report.dropped),
        report.shards,
        report.seconds,
    )
    return report


def verify_native_checkpoint(path: str | os.PathLike[str], arch: Arch) -> None:
    """Load `path` with the native class; raise unless every key matched exactly."""
    from transformers import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration

    model_cls = (
        DeepseekVLForConditionalGeneration if arch == "deepseek_vl" else DeepseekVLHybridForConditionalGeneration
    )
    try:
        # output_loading_info=True makes it return (model, info)
        model, info = model_cls.from_pretrained(  # type: ignore[misc]
            path, output_loading_info=True, dtype="auto"
        )
    except RuntimeError as err:  # shape mismatches
        raise ConversionError(f"the converted checkpoint does not load into {model_cls.__name__}: {err}") from err
    del model
    problems = {
        k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if problems:
        detail = "; ".join(
            f"{k}: {', '.join(map(str, v[:8]))}{' ...' if len(v) > 8 else ''}" for k, v in problems.items()
        )
        raise ConversionError(
            f"the converted checkpoint does not match {model_cls.__name__} ({detail}). "
            "The source config.json and its weights disagree, or this transformers version changed the "
            "layout; report it with both."
        )


# --------------------------------------------------------------------------------------------------------
# config


def _arch_of(original: dict[str, Any], where: Path) -> Arch:
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
    special = _special_ids(tokenizer)
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


def _special_ids(tokenizer: Any) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _write_generation_config(folder: Path, tokenizer: Any) -> None:
    from transformers import GenerationConfig

    GenerationConfig(**_special_ids(tokenizer)).save_pretrained(folder)


# --------------------------------------------------------------------------------------------------------
# processor


def _build_tokenizer(src: Path, original: dict[str, Any]) -> Any:
    """The release tokenizer with BOS, EOS, pad and `<image_placeholder>` as the processor's image token."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer_file = src / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ConversionError(f"{src} has no tokenizer.json; the release ships one. Copy the complete original folder.")
    settings = _read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    bos = _token_text(settings.get("bos_token")) or BOS_TOKEN
    eos = _token_text(settings.get("eos_token")) or EOS_TOKEN
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    for name, token in (("BOS", bos), ("EOS", eos)):
        if token not in vocab:
            raise ConversionError(f"{tokenizer_file}: the {name} token {token!r} is not in the vocabulary")
    pad = _token_text(settings.get("pad_token"))
    if pad is None:
        # The release pads with EOS when its tokenizer names no pad token (VLChatProcessor.pad_id).
        pad = PAD_TOKEN if PAD_TOKEN in vocab else eos
    if IMAGE_TOKEN not in vocab:
        log.info("adding %s to the tokenizer, as the release's processor does", IMAGE_TOKEN)
    # A plain fast tokenizer over tokenizer.json: the class named in tokenizer_config.json
    # (LlamaTokenizerFast) would let transformers rebuild the pipeline as for a SentencePiece Llama.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=int(settings.get("model_max_length", 16384)),
        padding_side="left",  # generation pads on the left, as the release's batchify does
        clean_up_tokenization_spaces=False,
    )
    if settings.get("add_bos_token", True) and tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]:
        bos_id = tokenizer.bos_token_id
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return str(value.get("content")) if value.get("content") else None
    return str(value) if value else None


def _build_processor(src: Path, original: dict[str, Any], tokenizer: Any, arch: Arch) -> Any:
    from transformers import (
        DeepseekVLHybridImageProcessorPil,
        DeepseekVLHybridProcessor,
        DeepseekVLImageProcessorPil,
        DeepseekVLProcessor,
    )
    from transformers.image_utils import PILImageResampling

    params = original["vision_config"].get("params", {})
    released = _read_json(src / "preprocessor_config.json") if (src / "preprocessor_config.json").is_file() else {}
    min_size = int(released.get("min_size", 14))
    released_mean = released.get("image_mean") if released.get("do_normalize", True) else None
    released_std = released.get("image_std") if released.get("do_normalize", True) else None
    if arch == "deepseek_vl":
        siglip = siglip_spec(params)
        mean = params.get("pixel_mean") or released_mean or [0.5, 0.5, 0.5]
        std = params.get("pixel_std") or released_std or [0.5, 0.5, 0.5]
        image_processor: Any = DeepseekVLImageProcessorPil(
            size={"height": siglip.image_size, "width": siglip.image_size},
            image_mean=list(mean),  # explicit: the class default is CLIP's mean/std
            image_std=list(std),
            min_size=min_size,
            resample=PILImageResampling.BICUBIC,
        )
        processor_cls: Any = DeepseekVLProcessor
    else:
        low, high = params["low_res_cfg"], params["high_res_cfg"]
        siglip, sam = siglip_spec(low), sam_spec(high)
        image_processor = DeepseekVLHybridImageProcessorPil(
            size={"height": siglip.image_size, "width": siglip.image_size},
            image_mean=list(low.get("pixel_mean") or [0.5, 0.5, 0.5]),
            image_std=list(low.get("pixel_std") or [0.5, 0.5, 0.5]),
            high_res_size={"height": sam.image_size, "width": sam.image_size},
            high_res_image_mean=list(high.get("pixel_mean") or CLIP_MEAN),
            high_res_image_std=list(high.get("pixel_std") or CLIP_STD),
            min_size=min_size,
            # The release resizes to 1024 with bicubic, then the low-res input is torchvision's bilinear,
            # antialiased Resize of that.
            high_res_resample=PILImageResampling.BICUBIC,
            resample=PILImageResampling.BILINEAR,
        )
        processor_cls = DeepseekVLHybridProcessor
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=siglip.num_patches,
    )


def _jinja_literal(text: str) -> str:
    if "'" in text or "\\" in text:
        raise ValueError(f"cannot embed {text!r} in the chat template")
    return f"'{text}'"


# The `deepseek` format exactly as vlmops.models.template.render writes it (a test compares the two):
# system + "\n\n" unless empty, "User: " + text + "\n\n", "Assistant:" + (" " + text) + EOS, each message's
# text stripped, images as <image_placeholder> where they stand, the whole string stripped. The system
# prompt is a leading system message, else the `system_prompt` template variable, else the released default.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(out='', system=" + _jinja_literal(DEFAULT_SYSTEM_PROMPT) + ", text='') -%}"
    "{%- if system_prompt is defined and system_prompt is not none -%}"
    "{%- set ns.system = system_prompt -%}"
    "{%- endif -%}"
    "{%- set turns = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.text = '' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.text = messages[0]['content'] -%}"
    "{%- else -%}{%- for part in messages[0]['content'] if part['type'] == 'text' -%}"
    "{%- set ns.text = ns.text ~ part['text'] -%}{%- endfor -%}{%- endif -%}"
    "{%- set ns.system = ns.text | trim -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- endif -%}"
    "{%- if ns.system -%}{%- set ns.out = ns.system ~ '\n\n' -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set ns.text = '' -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{%- if message['role'] != 'user' -%}"
    "{{- raise_exception('images are only supported in user turns') -}}"
    "{%- endif -%}"
    "{%- set ns.text = ns.text ~ " + _jinja_literal(IMAGE_TOKEN) + " -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text ~ part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set ns.out = ns.out ~ 'User: ' ~ (ns.text | trim) ~ '\n\n' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set ns.out = ns.out ~ 'Assistant:' ~ ((' ' ~ (ns.text | trim)) if (ns.text | trim) else '') ~ "
    + _jinja_literal(EOS_TOKEN)
    + " -%}"
    "{%- else -%}{{- raise_exception('a system message may only come first') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{%- set ns.out = ns.out ~ 'Assistant:' -%}{%- endif -%}"
    "{{- ns.out | trim -}}"
)


# --------------------------------------------------------------------------------------------------------
# weights in and out


def _weight_files(src: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in index order; safetensors preferred over .bin."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = src / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index} has no weight_map: the index is damaged; download it again")
            files = [src / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ConversionError(
                    f"{index} lists shard(s) {', '.join(missing)} that are not in {src}: the download is "
                    "incomplete; download the model again"
                )
            return files
        if (src / single).is_file():
            return [src / single]
    raise ConversionError(
        f"{src} has no weights: expected model.safetensors, model.safetensors.index.json with its shards, "
        "or pytorch_model.bin"
    )


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open has keys(), no __iter__)
                    yield key, handle.get_tensor(key)
        else:
            # mmap: tensors are paged in as they are read, not all at once
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            for key in list(state):
                yield key, state.pop(key)


class _ShardWriter:
    """Collects tensors into shards of at most `max_bytes` and writes each shard as soon as it is full."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.seen:
            raise ConversionError(f"two original tensors convert to {name!r}: the checkpoint has duplicate keys")
        self.seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"shard-{len(self.shards):05d}.safetensors.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> tuple[int, int, int]:
        """Name the shards as transformers expects; returns (tensors, shards, bytes)."""
        if self.pending:
            self._flush()
        if not self.shards:
            raise ConversionError("the checkpoint has no tensors to convert")
        count = len(self.shards)
        if count == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
        else:
            weight_map = {}
            for index, (path, names) in enumerate(self.shards):
                final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
                path.rename(self.folder / final)
                weight_map.update(dict.fromkeys(names, final))
            index_json = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
        return len(self.seen), count, self.total_bytes


# --------------------------------------------------------------------------------------------------------
# helpers and the command


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON ({err}): the file is damaged; download it again") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} is not a JSON object")
    return data


def convert_command(src: str, dst: str) -> int:
    """`vlmops convert SRC DST`: convert and print a short summary. Returns the exit code."""
    try:
        report = convert_checkpoint(src, dst)
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    dropped = Counter(re.sub(r"\.\d+\.", ".N.", k).rsplit(".", 1)[0] for k in report.dropped)
    print(f"converted {report.src} -> {report.dst} ({report.arch})")
    groups = ", ".join(f"{k} x{n}" for k, n in sorted(dropped.items())) or "none"
    print(
        f"  tensors: {report.tensors_in} read, {report.tensors_out} written "
        f"in {report.shards} shard(s), {gb(report.bytes_written)}"
    )
    print(f"  dropped: {len(report.dropped)} ({groups})")
    print(f"  time:    {report.seconds:.1f}s")
    return 0
