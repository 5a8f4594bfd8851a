"""The key-rule table: where every tensor of the DeepSeek-VL release goes in transformers' native model.

One rule per tensor family, for SigLIP (timm), SAM, the MlpProjector aligner and the Llama LLM
(DESIGN.md §5), plus `DROPPED_KEYS`: the release tensors with no place in the native model, each with the
reason. A key that matches neither stops the conversion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from vlmops.models.layout import Arch, ConversionError

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
        "rule and is not on the list of deliberately dropped keys (vlmops.models.convert_keys.DROPPED_KEYS). "
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
