"""Conversion of the original DeepSeek-VL release layout to transformers' native classes.

Tiny checkpoints are written in the original layout (`vlmops.testing.fake_release`), converted, loaded, and compared
against a forward pass assembled by hand from the ORIGINAL tensors with the original code's semantics
(timm SigLIP, SAM with windowed attention and decomposed relative positions, MlpProjector, Llama).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlmops.cli.main import main
from vlmops.conversation import ImageRef, Message
from vlmops.models.convert import (
    CHAT_TEMPLATE,
    DROPPED_KEYS,
    ConversionError,
    convert_checkpoint,
    detect_layout,
    map_original_key,
)
from vlmops.models.original_layout import sam_spec, siglip_spec
from vlmops.models.template import EOS_TOKEN, IMAGE_TOKEN, encode, render
from vlmops.testing.fake_release import original_shapes, tiny_release_config, write_original_checkpoint

ARCHES = ("deepseek_vl", "deepseek_vl_hybrid")


def _original_state(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


@pytest.fixture(scope="module", params=ARCHES)
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny original checkpoint (sharded, float32) and its conversion (sharded too)."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    config = tiny_release_config(arch)
    write_original_checkpoint(root / "original", config, seed=1, dtype=torch.float32, shard_bytes=150_000)
    report = convert_checkpoint(root / "original", root / "native", max_shard_bytes=200_000)
    return {
        "arch": arch,
        "config": config,
        "original": _original_state(root / "original"),
        "native_dir": root / "native",
        "report": report,
        "root": root,
    }


def _load(folder: Path, arch: str) -> Any:
    from transformers import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration

    cls = DeepseekVLForConditionalGeneration if arch == "deepseek_vl" else DeepseekVLHybridForConditionalGeneration
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


def test_loads_with_no_missing_or_unexpected_keys(converted: dict[str, Any]) -> None:
    model, info = _load(converted["native_dir"], converted["arch"])
    assert info["missing_keys"] == [] or info["missing_keys"] == set()
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert model.config.tie_word_embeddings is False
    assert model.config.text_config.tie_word_embeddings is False
    assert model.config.vision_config.hidden_act == "gelu"
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)


def test_report_accounts_for_every_original_tensor(converted: dict[str, Any]) -> None:
    report, original = converted["report"], converted["original"]
    assert report.tensors_in == len(original) == len(original_shapes(converted["config"]))
    assert report.shards > 1  # the tiny output was sharded at 200 kB
    assert (converted["native_dir"] / "model.safetensors.index.json").is_file()
    dropped = set(report.dropped)
    assert dropped == {k for k in original if "attn_pool" in k or "_layer_norm." in k}
    # qkv of SigLIP splits in three; everything else maps one to one
    siglip_qkv = sum(1 for k in original if "attn.qkv" in k and "vision_tower_high" not in k)
    assert report.tensors_out == len(original) - len(dropped) + 2 * siglip_qkv
    assert not list(converted["root"].glob(".staging-*"))


def _native(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                state[key] = handle.get_tensor(key)
    return state


def test_named_tensors_land_where_they_should(converted: dict[str, Any]) -> None:
    o, n = converted["original"], _native(converted["native_dir"])
    hybrid = converted["arch"] == "deepseek_vl_hybrid"
    sig = "vision_model.vision_tower_low.vision_tower." if hybrid else "vision_model.vision_tower."
    qkv_w, qkv_b = o[sig + "blocks.1.attn.qkv.weight"], o[sig + "blocks.1.attn.qkv.bias"]
    width = qkv_w.shape[1]
    for i, part in enumerate("qkv"):
        assert torch.equal(
            n[f"model.vision_model.encoder.layers.1.self_attn.{part}_proj.weight"],
            qkv_w[i * width : (i + 1) * width],
        )
        assert torch.equal(
            n[f"model.vision_model.encoder.layers.1.self_attn.{part}_proj.bias"],
            qkv_b[i * width : (i + 1) * width],
        )
    assert torch.equal(
        n["model.vision_model.encoder.layers.0.self_attn.out_proj.weight"],
        o[sig + "blocks.0.attn.proj.weight"],
    )
    assert torch.equal(n["model.vision_model.embeddings.position_embedding.weight"], o[sig + "pos_embed"][0])
    assert torch.equal(n["model.vision_model.embeddings.patch_embedding.weight"], o[sig + "patch_embed.proj.weight"])
    assert torch.equal(n["model.vision_model.encoder.layers.1.layer_norm2.bias"], o[sig + "blocks.1.norm2.bias"])
    assert torch.equal(n["model.vision_model.encoder.layers.0.mlp.fc2.weight"], o[sig + "blocks.0.mlp.fc2.weight"])
    assert torch.equal(n["model.vision_model.post_layernorm.weight"], o[sig + "norm.weight"])
    assert torch.equal(
        n["model.language_model.layers.1.mlp.down_proj.weight"],
        o["language_model.model.layers.1.mlp.down_proj.weight"],
    )
    assert torch.equal(n["model.language_model.embed_tokens.weight"], o["language_model.model.embed_tokens.weight"])
    assert torch.equal(n["lm_head.weight"], o["language_model.lm_head.weight"])
    if not hybrid:
        assert torch.equal(n["model.aligner.linear1.weight"], o["aligner.layers.0.weight"])
        assert torch.equal(n["model.aligner.linear2.bias"], o["aligner.layers.2.bias"])
        return
    sam, enc = "vision_model.vision_tower_high.vision_tower.", "model.high_res_vision_model.vision_encoder."
    assert torch.equal(n["model.aligner.vision_proj.weight"], o["aligner.low_up_proj.weight"])
    assert torch.equal(n["model.aligner.high_res_vision_proj.bias"], o["aligner.high_up_proj.bias"])
    assert torch.equal(n["model.aligner.proj.weight"], o["aligner.layers.1.weight"])
    assert torch.equal(n[enc + "layers.1.attn.qkv.weight"], o[sam + "blocks.1.attn.qkv.weight"])  # not split
    assert torch.equal(n[enc + "layers.0.attn.rel_pos_h"], o[sam + "blocks.0.attn.rel_pos_h"])
    assert torch.equal(n[enc + "pos_embed"], o[sam + "pos_embed"])
    assert torch.equal(n[enc + "patch_embed.projection.weight"], o[sam + "patch_embed.proj.weight"])
    for index, name in enumerate(("conv1.weight", "layer_norm1.weight", "conv2.weight", "layer_norm2.weight")):
        assert torch.equal(n[enc + "neck." + name], o[f"{sam}neck.{index}.weight"])
        assert torch.equal(n["model.high_res_vision_neck." + name], o[f"{sam}neck_hd.{index}.weight"])
    assert torch.equal(n["model.high_res_vision_neck.layer_norm2.bias"], o[sam + "neck_hd.3.bias"])
    assert torch.equal(n["model.high_res_vision_proj.conv1.weight"], o[sam + "downsamples.0.weight"])
    assert torch.equal(n["model.high_res_vision_proj.conv2.weight"], o[sam + "downsamples.1.weight"])
    assert torch.equal(n["model.high_res_vision_alpha"], o[sam + "hd_alpha_downsamples"])


# ---- a forward pass assembled by hand from the original tensors -----------------------------------------


def _siglip_forward(o: dict[str, torch.Tensor], p: str, params: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """timm VisionTransformer.forward_features as the release builds it (no class token, final norm)."""
    s = siglip_spec(params)
    x = F.conv2d(x, o[p + "patch_embed.proj.weight"], o[p + "patch_embed.proj.bias"], stride=s.patch_size)
    x = x.flatten(2).transpose(1, 2) + o[p + "pos_embed"]
    batch, tokens, width = x.shape
    for i in range(s.layers):
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, (width,), o[b + "norm1.weight"], o[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, o[b + "attn.qkv.weight"], o[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, tokens, 3, s.heads, width // s.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.softmax((q * (width // s.heads) ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v
        x = x + F.linear(
            attn.transpose(1, 2).reshape(batch, tokens, width),
            o[b + "attn.proj.weight"],
            o[b + "attn.proj.bias"],
        )
        h = F.layer_norm(x, (width,), o[b + "norm2.weight"], o[b + "norm2.bias"], eps=1e-6)
        h = F.linear(
            F.gelu(F.linear(h, o[b + "mlp.fc1.weight"], o[b + "mlp.fc1.bias"])),
            o[b + "mlp.fc2.weight"],
            o[b + "mlp.fc2.bias"],
        )
        x = x + h
    return F.layer_norm(x, (width,), o[p + "norm.weight"], o[p + "norm.bias"], eps=1e-6)


def _layer_norm_2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return weight[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + bias[:, None, None]


def _neck(o: dict[str, torch.Tensor], p: str, x: torch.Tensor) -> torch.Tensor:
    x = _layer_norm_2d(F.conv2d(x, o[p + "0.weight"]), o[p + "1.weight"], o[p + "1.bias"])
    return _layer_norm_2d(F.conv2d(x, o[p + "2.weight"], padding=1), o[p + "3.weight"], o[p + "3.bias"])


def _rel_pos(size: int, table: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size)[:, None] - torch.arange(size)[None, :] + (size - 1)
    return table[coords]


def _sam_attention(o: dict[str, torch.Tensor], b: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, height, width, channels = x.shape
    qkv = F.linear(x, o[b + "attn.qkv.weight"], o[b + "attn.qkv.bias"])
    qkv = qkv.reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * heads, height * width, -1).unbind(0)
    attn = (q * (channels // heads) ** -0.5) @ k.transpose(-2, -1)
    r_q = q.reshape(batch * heads, height, width, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, _rel_pos(height, o[b + "attn.rel_pos_h"]))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, _rel_pos(width, o[b + "attn.rel_pos_w"]))
    attn = attn.view(batch * heads, height, width, height, width) + rel_h[..., None] + rel_w[..., None, :]
    attn = attn.view(batch * heads, height * width, height * width).softmax(dim=-1)
    out = (attn @ v).view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return F.linear(out, o[b + "attn.proj.weight"], o[b + "attn.proj.bias"])


def _sam_forward(o: dict[str, torch.Tensor], params: dict[str, Any], x: torch.Tensor, grid: int) -> torch.Tensor:
    """sam.py ImageEncoderViT.forward with the HD branch. `grid` is SigLIP's: the release hard-codes the
    resize to 96 = 4 x 24, the native model to 4 x grid."""
    s, p = sam_spec(params), "vision_model.vision_tower_high.vision_tower."
    x = F.conv2d(x, o[p + "patch_embed.proj.weight"], o[p + "patch_embed.proj.bias"], stride=s.patch_size)
    x = x.permute(0, 2, 3, 1) + o[p + "pos_embed"]
    first_global = None
    for i in range(s.layers):
        b = f"{p}blocks.{i}."
        shortcut = x
        h = F.layer_norm(x, (s.width,), o[b + "norm1.weight"], o[b + "norm1.bias"], eps=1e-6)
        if i in s.global_attn_indexes:
            h = _sam_attention(o, b, h, s.heads)
        else:  # non-overlapping windows (the tiny grid divides evenly: no padding)
            n, hh, ww, c = h.shape
            w = s.window_size
            win = h.view(n, hh // w, w, ww // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, c)
            win = _sam_attention(o, b, win, s.heads)
            h = win.view(n, hh // w, ww // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(n, hh, ww, c)
        x = shortcut + h
        h = F.layer_norm(x, (s.width,), o[b + "norm2.weight"], o[b + "norm2.bias"], eps=1e-6)
        x = x + F.linear(
            F.gelu(F.linear(h, o[b + "mlp.lin1.weight"], o[b + "mlp.lin1.bias"])),
            o[b + "mlp.lin2.weight"],
            o[b + "mlp.lin2.bias"],
        )
        if i in s.global_attn_indexes and first_global is None:
            first_global = x

    def down(features: torch.Tensor) -> torch.Tensor:
        features = F.interpolate(features, size=(4 * grid, 4 * grid), mode="bilinear", align_corners=False)
        features = F.conv2d(features, o[p + "downsamples.0.weight"], stride=2, padding=1)
        return F.conv2d(features, o[p + "downsamples.1.weight"], stride=2, padding=1)

    assert first_global is not None
    out = down(_neck(o, p + "neck.", x.permute(0, 3, 1, 2)))
    out = out + down(_neck(o, p + "neck_hd.", first_global.permute(0, 3, 1, 2))) * o[p + "hd_alpha_downsamples"]
    return out.flatten(2).transpose(1, 2)  # b c h w -> b (h w) c


def _image_embeddings(converted: dict[str, Any], low: torch.Tensor, high: torch.Tensor | None) -> torch.Tensor:
    o, params = converted["original"], converted["config"]["vision_config"]["params"]
    if converted["arch"] == "deepseek_vl":
        features = _siglip_forward(o, "vision_model.vision_tower.", params, low)
        hidden = F.gelu(F.linear(features, o["aligner.layers.0.weight"], o["aligner.layers.0.bias"]))
        return F.linear(hidden, o["aligner.layers.2.weight"], o["aligner.layers.2.bias"])
    low_params = params["low_res_cfg"]
    low_features = _siglip_forward(o, "vision_model.vision_tower_low.vision_tower.", low_params, low)
    grid = low_params["image_size"] // low_params["patch_size"]
    assert high is not None
    high_features = _sam_forward(o, params["high_res_cfg"], high, grid)
    mixed = torch.cat(
        [
            F.linear(high_features, o["aligner.high_up_proj.weight"], o["aligner.high_up_proj.bias"]),
            F.linear(low_features, o["aligner.low_up_proj.weight"], o["aligner.low_up_proj.bias"]),
        ],
        dim=-1,
    )
    return F.linear(F.gelu(mixed), o["aligner.layers.1.weight"], o["aligner.layers.1.bias"])


def _llama(converted: dict[str, Any]) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    language = {k: v for k, v in converted["config"]["language_config"].items() if k != "torch_dtype"}
    llama = LlamaForCausalLM(LlamaConfig(**language, tie_word_embeddings=False))
    state = {
        k[len("language_model.") :]: v for k, v in converted["original"].items() if k.startswith("language_model.")
    }
    llama.load_state_dict(state, strict=True)
    return llama.eval()


def _pixels(converted: dict[str, Any], count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    params = converted["config"]["vision_config"]["params"]
    generator = torch.Generator().manual_seed(7)
    if converted["arch"] == "deepseek_vl":
        return torch.randn(count, 3, params["image_size"], params["image_size"], generator=generator), None
    low, high = params["low_res_cfg"]["image_size"], params["high_res_cfg"]["image_size"]
    return torch.randn(count, 3, low, low, generator=generator), torch.randn(count, 3, high, high, generator=generator)


@torch.no_grad()
def test_image_features_match_a_hand_assembled_forward(converted: dict[str, Any]) -> None:
    model, _ = _load(converted["native_dir"], converted["arch"])
    low, high = _pixels(converted, 2)
    expected = _image_embeddings(converted, low, high)
    args = (low,) if high is None else (low, high)
    actual = model.model.get_image_features(*args).pooler_output
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_logits_match_a_plain_llama_with_the_hand_assembled_image(converted: dict[str, Any]) -> None:
    model, _ = _load(converted["native_dir"], converted["arch"])
    llama = _llama(converted)
    image_token_id = model.config.image_token_id
    tokens = 16  # tiny SigLIP: (32 / 8) ** 2

    # text only: the converted model is exactly the original Llama
    text_ids = torch.tensor([[0, 45, 97, 301, 12, 7, 88]])
    torch.testing.assert_close(model(input_ids=text_ids).logits, llama(input_ids=text_ids).logits, rtol=1e-5, atol=1e-5)

    # two images inside the prompt, their embeddings computed by hand and put in place for the plain Llama
    ids = torch.tensor([[0, 45, *[image_token_id] * tokens, 97, *[image_token_id] * tokens, 301, 12]])
    low, high = _pixels(converted, 2)
    embeds = llama.get_input_embeddings()(ids)
    embeds[ids == image_token_id] = _image_embeddings(converted, low, high).reshape(-1, embeds.shape[-1])
    expected = llama(inputs_embeds=embeds).logits
    extra = {} if high is None else {"high_res_pixel_values": high}
    actual = model(input_ids=ids, pixel_values=low, **extra).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


# ---- inputs: .bin, sharding; refusals ---------------------------------------------------------------------


def test_pytorch_bin_input_converts_to_the_same_tensors(tmp_path: Path) -> None:
    config = tiny_release_config("deepseek_vl")
    write_original_checkpoint(tmp_path / "st", config, seed=3, dtype=torch.bfloat16)
    write_original_checkpoint(tmp_path / "bin", config, seed=3, dtype=torch.bfloat16, weights_format="bin")
    assert not (tmp_path / "bin" / "model.safetensors").exists()
    convert_checkpoint(tmp_path / "st", tmp_path / "st-out")
    with pytest.raises(ConversionError, match=r"pickle weights only \(pytorch_model\.bin\).*model\.allow_pickle: true"):
        convert_checkpoint(tmp_path / "bin", tmp_path / "bin-out")  # unpickling can run code: refused by default
    assert not (tmp_path / "bin-out").exists()
    convert_checkpoint(tmp_path / "bin", tmp_path / "bin-out", allow_pickle=True)
    from_st, from_bin = (
        load_file(tmp_path / "st-out" / "model.safetensors"),
        load_file(tmp_path / "bin-out" / "model.safetensors"),
    )
    assert from_st.keys() == from_bin.keys()
    assert all(torch.equal(from_st[k], from_bin[k]) for k in from_st)
    assert {t.dtype for t in from_st.values()} == {torch.bfloat16}  # dtype kept, not silently widened
    assert json.loads((tmp_path / "st-out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_an_unknown_tensor_is_refused_and_nothing_is_left_behind(tmp_path: Path) -> None:
    write_original_checkpoint(tmp_path / "original", tiny_release_config("deepseek_vl"), dtype=torch.float32)
    state = load_file(tmp_path / "original" / "model.safetensors")
    state["vision_model.vision_tower.blocks.0.attn.extra_scale"] = torch.ones(3)
    save_file(state, str(tmp_path / "original" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ConversionError, match=r"vision_model\.vision_tower\.blocks\.0\.attn\.extra_scale.*DROPPED_KEYS"
    ):
        convert_checkpoint(tmp_path / "original", tmp_path / "native")
    assert not (tmp_path / "native").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".native")]


def test_dropped_keys_are_explicit() -> None:
    assert map_original_key("vision_model.vision_tower.attn_pool.latent", "deepseek_vl") is None
    assert (
        map_original_key("vision_model.vision_tower_low.vision_tower.attn_pool.mlp.fc1.weight", "deepseek_vl_hybrid")
        is None
    )
    assert map_original_key("vision_model.high_layer_norm.bias", "deepseek_vl_hybrid") is None
    assert map_original_key("language_model.model.layers.3.self_attn.rotary_emb.inv_freq", "deepseek_vl") is None
    assert len(DROPPED_KEYS) == 3
    # the 1.3b has no high-res tower: its keys are unknown there, not silently dropped
    with pytest.raises(ConversionError, match="vision_tower_high"):
        map_original_key("vision_model.vision_tower_high.vision_tower.neck.0.weight", "deepseek_vl")
    assert map_original_key("vision_model.vision_tower.blocks.4.attn.qkv.bias", "deepseek_vl") == [
        (f"model.vision_model.encoder.layers.4.self_attn.{p}_proj.bias", "split_qkv") for p in "qkv"
    ]


def test_config_that_disagrees_with_the_native_model_is_refused(tmp_path: Path) -> None:
    config = tiny_release_config("deepseek_vl")
    config["aligner_config"]["params"]["n_embed"] = 48  # the LLM is 64 wide
    write_original_checkpoint(tmp_path / "original", tiny_release_config("deepseek_vl"))
    (tmp_path / "original" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="n_embed 48 differs from the LLM hidden size 64"):
        convert_checkpoint(tmp_path / "original", tmp_path / "native")


def test_missing_shard_is_named(tmp_path: Path) -> None:
    write_original_checkpoint(tmp_path / "original", tiny_release_config("deepseek_vl"), shard_bytes=50_000)
    shards = sorted((tmp_path / "original").glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(ConversionError, match=r"download the model again") as info:
        convert_checkpoint(tmp_path / "original", tmp_path / "native")
    assert f"lists 1 shard not in {tmp_path / 'original'} ({shards[1].name}): the download is" in str(info.value)


def test_detect_layout(converted: dict[str, Any], tmp_path: Path) -> None:
    assert detect_layout(converted["root"] / "original") == "original"
    assert detect_layout(converted["native_dir"]) == "native"
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        detect_layout(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ValueError, match="'llava' is neither"):
        detect_layout(tmp_path)


def test_convert_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_original_checkpoint(tmp_path / "original", tiny_release_config("deepseek_vl_hybrid"))
    assert main(["convert", str(tmp_path / "original"), str(tmp_path / "native")]) == 0
    out = capsys.readouterr().out
    assert "deepseek_vl_hybrid" in out and "119 read" in out and "dropped: 17" in out and "attn_pool" in out
    assert re.search(r"119 read, \d+ written in 1 shard, ", out), out
    # an existing output folder is the user's to move: exit 2, and the message says what to do
    assert main(["convert", str(tmp_path / "original"), str(tmp_path / "native")]) == 2
    assert "already exists: delete it or choose another output folder" in capsys.readouterr().err


# ---- processor: tokenizer, image processor, chat template ------------------------------------------------


def test_processor_settings(converted: dict[str, Any]) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(converted["native_dir"])
    tokenizer = processor.tokenizer
    assert processor.num_image_tokens == 16
    assert tokenizer.image_token == IMAGE_TOKEN
    assert processor.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer("User: hi")["input_ids"][0] == tokenizer.bos_token_id  # BOS prepended, as released
    image_processor = processor.image_processor
    assert list(image_processor.image_mean) == [0.5, 0.5, 0.5] and list(image_processor.image_std) == [
        0.5,
        0.5,
        0.5,
    ]
    assert image_processor.size["height"] == 32
    if converted["arch"] == "deepseek_vl_hybrid":
        assert image_processor.high_res_size["height"] == 64
        assert list(image_processor.high_res_image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    generation = json.loads((converted["native_dir"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id


def _to_hf(messages: list[Message]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        parts = [{"type": "image"} if isinstance(p, ImageRef) else {"type": "text", "text": p} for p in message.parts]
        out.append({"role": message.role, "content": parts})
    return out


CONVERSATIONS = [
    [Message("user", [ImageRef("a.png"), "What is this?"])],
    [
        Message("user", ["  Hi there  "]),
        Message("assistant", [" Hello! "]),
        Message("user", ["Describe ", ImageRef("b.png"), " and ", ImageRef("c.png"), "\n"]),
    ],
    [
        Message("system", ["  Be brief.  "]),
        Message("user", ["Count: ", ImageRef("a.png")]),
        Message("assistant", ["three"]),
    ],
    [Message("user", [ImageRef("a.png"), ImageRef("b.png"), "What differs?"]), Message("assistant", [""])],
    [
        Message("user", ["text only"]),
        Message("assistant", ["yes"]),
        Message("user", ["and then?"]),
        Message("assistant", ["done"]),
    ],
]


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation", [False, True])
def test_chat_template_renders_what_template_render_renders(index: int, generation: bool) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    messages = CONVERSATIONS[index]
    if generation and messages[-1].role == "assistant":
        messages = messages[:-1]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    template = env.from_string(CHAT_TEMPLATE)
    rendered = template.render(
        messages=_to_hf(messages), add_generation_prompt=generation, raise_exception=raise_exception
    )
    assert rendered == render(messages, add_generation_prompt=generation)
    for system_prompt in ("", "You see images."):
        with_system = template.render(
            messages=_to_hf(messages),
            add_generation_prompt=generation,
            system_prompt=system_prompt,
            raise_exception=raise_exception,
        )
        assert with_system == render(messages, system_prompt=system_prompt, add_generation_prompt=generation)


def test_processor_chat_template_and_tokens_match_template_encode(converted: dict[str, Any]) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(converted["native_dir"])
    messages = [Message("user", ["Compare ", ImageRef("a.png"), " with ", ImageRef("b.png"), " please"])]
    prompt = processor.apply_chat_template(_to_hf(messages), tokenize=False, add_generation_prompt=True)
    assert prompt == render(messages, add_generation_prompt=True)
    assert prompt.endswith("Assistant:")
    from PIL import Image

    images = [Image.new("RGB", (40, 24), "red"), Image.new("RGB", (20, 30), "blue")]
    batch = processor(text=prompt, images=images, return_tensors="pt")
    expected = encode(messages, processor.tokenizer, processor.num_image_tokens, add_generation_prompt=True)
    assert batch["input_ids"][0].tolist() == expected.input_ids
    with pytest.raises(Exception, match="images are only supported in user turns"):
        processor.apply_chat_template([{"role": "assistant", "content": [{"type": "image"}]}], tokenize=False)
