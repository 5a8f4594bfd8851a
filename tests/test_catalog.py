"""The model catalog: entries, name and source resolution, and the released architectures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmops.cli.main import main
from vlmops.config import ModelConfig
from vlmops.models.catalog import CATALOG, get_entry, resolve
from vlmops.testing.architectures import architecture_config

RELEASED = ("deepseek-vl-1.3b-chat", "deepseek-vl-7b-chat", "deepseek-vl-1.3b-base", "deepseek-vl-7b-base")


def test_entries() -> None:
    assert set(CATALOG) == {*RELEASED, "tiny-deepseek-vl", "tiny-deepseek-vl-hybrid"}
    for name in RELEASED:
        entry = get_entry(name)
        assert entry.default_source == "modelscope"
        assert entry.modelscope_id == f"deepseek-ai/{name}"
        assert entry.hf_id == f"deepseek-community/{name}"
        assert entry.modelscope_revision and entry.hf_revision
        assert entry.tiny_variant is None
        assert entry.arch == ("deepseek_vl" if "1.3b" in name else "deepseek_vl_hybrid")
    seven = get_entry("deepseek-vl-7b-chat")
    assert (seven.lora_sft_gib, seven.full_sft_gib_per_gpu, seven.full_sft_gpus) == (20.5, 70.0, 4)
    tiny = get_entry("tiny-deepseek-vl-hybrid")
    assert (tiny.default_source, tiny.tiny_variant, tiny.modelscope_id) == (
        "local",
        "deepseek_vl_hybrid",
        None,
    )


def test_unknown_name_lists_the_catalog_and_the_local_folder_way() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'deepseek-vl-2'.*deepseek-vl-7b-chat.*model\.source: local"):
        get_entry("deepseek-vl-2")
    with pytest.raises(ValueError, match="unknown model"):
        resolve(ModelConfig(name="my-model"), "out")


def test_resolve_defaults_and_overrides(tmp_path: Path) -> None:
    released = resolve(ModelConfig(name="deepseek-vl-7b-chat"), tmp_path)
    assert (released.source, released.id, released.revision) == (
        "modelscope",
        "deepseek-ai/deepseek-vl-7b-chat",
        "master",
    )
    hf = resolve(ModelConfig(name="deepseek-vl-1.3b-chat", source="huggingface"), tmp_path)
    assert (hf.source, hf.id, hf.revision) == (
        "huggingface",
        "deepseek-community/deepseek-vl-1.3b-chat",
        "main",
    )
    pinned = resolve(ModelConfig(name="deepseek-vl-1.3b-chat", revision="a1b2c3"), tmp_path)
    assert pinned.revision == "a1b2c3"
    tiny = resolve(ModelConfig(name="tiny-deepseek-vl"), tmp_path)
    assert (tiny.source, tiny.id, tiny.revision) == (
        "local",
        str(tmp_path / "models" / "tiny-deepseek-vl"),
        None,
    )
    own = resolve(ModelConfig(name="my-finetune", source="local", id="/data/ckpt"), tmp_path)
    assert (own.source, own.id, own.entry) == ("local", "/data/ckpt", None)
    bucket = resolve(ModelConfig(name="deepseek-vl-7b-chat", source="s3", id="s3://models/7b"), tmp_path)
    assert (bucket.source, bucket.id, bucket.revision) == ("s3", "s3://models/7b", None)
    assert bucket.entry is get_entry("deepseek-vl-7b-chat")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ModelConfig(name="deepseek-vl-7b-chat", source="local"), "no local id.*model.id to a folder"),
        (ModelConfig(name="deepseek-vl-7b-chat", source="s3"), r"no s3 id.*s3://bucket/prefix"),
        (ModelConfig(name="x", source="s3", id="/data/x"), "not an s3://bucket/prefix"),
        (ModelConfig(name="x", source="modelscope", id="/data/x"), "is not a modelscope id"),
        (
            ModelConfig(name="tiny-deepseek-vl", source="huggingface"),
            "no huggingface id.*model.source: local",
        ),
    ],
)
def test_resolve_refuses_impossible_sources(config: ModelConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve(config, "out")


def test_released_architectures() -> None:
    small, big = architecture_config("deepseek-vl-1.3b-chat"), architecture_config("deepseek-vl-7b-base")
    assert (small.model_type, big.model_type) == ("deepseek_vl", "deepseek_vl_hybrid")
    for config in (small, big):
        vision = config.vision_config
        assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
        assert (vision.intermediate_size, vision.image_size, vision.patch_size) == (4096, 384, 16)
        assert vision.hidden_act == "gelu" and vision.vision_use_head is False
        assert config.tie_word_embeddings is False and config.text_config.tie_word_embeddings is False
        assert config.text_config.vocab_size == 102400
        assert config.image_token_id == 100015
    text = small.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads) == (
        2048,
        5632,
        24,
        16,
    )
    text = big.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads) == (
        4096,
        11008,
        30,
        32,
    )
    sam = big.high_res_vision_config
    assert (sam.hidden_size, sam.num_hidden_layers, sam.num_attention_heads, sam.mlp_dim) == (
        768,
        12,
        12,
        3072,
    )
    assert (sam.window_size, list(sam.global_attn_indexes), sam.output_channels, sam.image_size) == (
        14,
        [2, 5, 8, 11],
        256,
        1024,
    )


@pytest.mark.parametrize("name", ["deepseek-vl-1.3b-chat", "deepseek-vl-7b-chat"])
def test_parameter_counts_match_the_catalog(name: str) -> None:
    from transformers import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration

    config = architecture_config(name)
    cls = (
        DeepseekVLForConditionalGeneration
        if config.model_type == "deepseek_vl"
        else DeepseekVLHybridForConditionalGeneration
    )
    with torch.device("meta"):
        model = cls(config)
    assert sum(p.numel() for p in model.parameters()) == get_entry(name).params
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight


def test_tiny_architecture_builds() -> None:
    from transformers import DeepseekVLHybridForConditionalGeneration

    config = architecture_config("tiny-deepseek-vl-hybrid")
    model = DeepseekVLHybridForConditionalGeneration(config)
    assert config.image_token_id == 3 and config.text_config.vocab_size == 640
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_models_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in CATALOG:
        assert name in out
    assert "deepseek-ai/deepseek-vl-7b-chat" in out and "7.33B" in out and "20.5 GiB" in out
