"""pipeline.yaml schema: every error at once with its key path and line; dotted overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmops.config import ConfigError, PipelineConfig, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate() -> None:
    config = load_config()
    assert isinstance(config, PipelineConfig)
    assert config.train.lora.targets == "qkv"


def test_every_problem_reported_with_path_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  mode: lorra\n  epocs: 3\n  lora:\n    r: 0\nmodel:\n  dtype: fp8\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    text = str(info.value)
    assert len(info.value.problems) == 4
    assert f"{bad}:2: train.mode: must be 'lora' or 'full'" in text
    assert f"{bad}:3: train.epocs: unknown key" in text
    assert f"{bad}:5: train.lora.r:" in text
    assert f"{bad}:7: model.dtype:" in text


def test_dotted_overrides_parse_yaml_values() -> None:
    config = load_config(
        None, ["train.epochs=2", "train.lora.targets=ALL", "model.revision=null", "data.num_workers=2"]
    )
    assert config.train.epochs == 2.0
    assert config.train.lora.targets == "ALL"
    assert config.model.revision is None
    assert config.data.num_workers == 2
    assert load_config(None, {"infer.batch_size": 3}).infer.batch_size == 3


def test_unknown_override_names_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key train\.epoch; valid keys there: .*epochs"):
        load_config(None, ["train.epoch=2"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.epochs"])


def test_bad_override_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=zero"])


def test_base_file_is_extended(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 4\n  lr: 0.01\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\ntrain:\n  lr: 0.5\n")
    config = load_config(tmp_path / "top.yaml")
    assert (config.train.epochs, config.train.lr) == (4.0, 0.5)


def test_user_data_without_eval_split_is_refused() -> None:
    with pytest.raises(ConfigError, match="data.eval_ratio"):
        load_config(None, ["data.train=x.jsonl", "data.eval_ratio=0"])


def test_dump_roundtrips(tmp_path: Path) -> None:
    config = load_config(None, ["train.epochs=3"])
    out = tmp_path / "resolved.yaml"
    out.write_text(dump_config(config))
    assert load_config(out) == config


@pytest.mark.parametrize(
    "path", sorted([ROOT / "pipeline.yaml", *(ROOT / "configs").glob("*.yaml")]), ids=lambda p: p.name
)
def test_every_shipped_config_validates(path: Path) -> None:
    load_config(path)
