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


def test_a_key_set_twice_is_refused_not_settled_silently(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys: `epochs: 1` then `epochs: 3` trained 3 epochs without a word."""
    bad = tmp_path / "twice.yaml"
    bad.write_text("train:\n  epochs: 1\n  lora:\n    r: 8\n  epochs: 3\nmodel:\n  dtype: auto\ntrain:\n  mode: full\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.problems == [
        f"{bad}:5: train.epochs is set twice (first on line 2); keep one of them",
        f"{bad}:8: train is set twice (first on line 1); keep one of them",
    ]
    # the same key in two sections, or once here and once in a base, is not a repeat
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  epochs: 1\n")
    (tmp_path / "own.yaml").write_text("base: base.yaml\ntrain:\n  epochs: 2\ndata:\n  num_workers: 2\n")
    assert load_config(tmp_path / "own.yaml").train.epochs == 2


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


def test_a_bad_override_value_names_the_override_and_the_value_it_gave(tmp_path: Path) -> None:
    """`--set infer.max_new_tokens=four` said only 'infer.max_new_tokens: Input should be a valid integer', as if the
    config file were wrong; a list key given one path did not say how to write a list."""
    config = tmp_path / "pipeline.yaml"
    config.write_text("infer:\n  max_new_tokens: 8\n  temperature: -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(config, ["infer.max_new_tokens=four", "data.allowed_roots=/data/images"])
    assert info.value.problems == [
        "override data.allowed_roots=/data/images: Input should be a valid list (a YAML list: "
        "data.allowed_roots=[a, b], quoted in a shell)",
        "override infer.max_new_tokens=four: Input should be a valid integer, unable to parse string as an integer",
        f"{config}:3: infer.temperature: Input should be greater than or equal to 0",
    ]


def test_a_max_context_without_room_for_a_prompt_is_a_config_error(tmp_path: Path) -> None:
    """`infer.max_context` at or below `infer.max_new_tokens` holds no prompt beside the answer: refused where the config
    is read, with the file and line (or the override) and both numbers, before any command resolves a model (a
    batch job refused it only after downloading and hashing one). The validator's own words, without pydantic's
    "Value error, " before them."""
    config = tmp_path / "pipeline.yaml"
    config.write_text("infer:\n  max_new_tokens: 16\n  max_context: 16\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    (problem,) = info.value.problems
    assert problem.startswith(
        f"{config}:3: infer.max_context: infer.max_context 16 leaves no room for a prompt beside infer.max_new_tokens "
        "16 (a request holds its prompt and its answer): every record would be rejected. Raise infer.max_context"
    ), problem
    with pytest.raises(ConfigError) as info:
        load_config(None, ["infer.max_context=8"])  # below the default answer of 64
    assert info.value.problems[0].startswith("override infer.max_context=8: infer.max_context 8 leaves no room for a")
    assert "infer.max_new_tokens 64 " in info.value.problems[0]
    assert load_config(config, ["infer.max_new_tokens=15"]).infer.max_context == 16  # one token of room: allowed
    assert load_config(None, ["infer.max_new_tokens=4096"]).infer.max_context is None  # unset: sized to the job


def test_an_override_holding_a_credential_is_refused() -> None:
    """Overrides become flow-run parameters (stored by the Prefect server): credentials go in the environment."""
    with pytest.raises(ConfigError, match=r"override tracking\.uri: holds a password.*MLFLOW_TRACKING_PASSWORD"):
        load_config(None, ["tracking.uri=http://alice:hunter2pw@mlflow:5000"])
    with pytest.raises(ConfigError, match=r"override data\.train"):
        load_config(None, {"data.train": "https://x/d.jsonl?token=abcdef123"})
    assert load_config(None, ["tracking.uri=http://alice@mlflow:5000"]).tracking.uri == "http://alice@mlflow:5000"


def test_base_file_is_extended(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 4\n  lr: 0.01\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\ntrain:\n  lr: 0.5\n")
    config = load_config(tmp_path / "top.yaml")
    assert (config.train.epochs, config.train.lr) == (4.0, 0.5)


def test_an_error_in_a_base_file_names_that_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "team").mkdir()
    team = tmp_path / "team" / "base.yaml"
    team.write_text("run:\n  name: team\ntrain:\n  lr: 0.01\n  epocs: 4\n")
    top = tmp_path / "top.yaml"
    top.write_text("base: team/base.yaml\ntrain:\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(top)
    assert len(info.value.problems) == 2
    assert f"{team.resolve()}:5: train.epocs: unknown key" in str(info.value)
    assert f"{top}:3: train.batch_size:" in str(info.value)


def test_a_value_over_a_base_section_takes_its_place(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("train:\n  lora:\n    r: 0\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\ntrain:\n  lora:\n    r: -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "top.yaml")
    assert f"{tmp_path / 'top.yaml'}:4: train.lora.r:" in str(info.value)  # the file whose value failed


def test_a_base_cycle_is_refused_naming_the_chain(tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{n}.yaml" for n in "abc")
    a.write_text("base: b.yaml\n")
    b.write_text("train:\n  lr: 0.1\nbase: c.yaml\n")
    c.write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="makes a cycle") as info:
        load_config(a)
    assert f"{c.resolve()}:1: base: b.yaml makes a cycle: {b.resolve()} -> {c.resolve()} -> {b.resolve()}" in str(
        info.value
    )
    a.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=f"cycle: {a.resolve()} -> {a.resolve()}"):
        load_config(a)


def test_a_missing_base_names_the_file_that_asks_for_it(tmp_path: Path) -> None:
    (tmp_path / "top.yaml").write_text("run:\n  name: x\nbase: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'top.yaml'}:3: base: .*nowhere.yaml does not exist"):
        load_config(tmp_path / "top.yaml")


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


# configs/team.yaml is not a model config: it layers the team servers over the demo (base: ../pipeline.yaml).
@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("deepseek-vl-*.yaml")), ids=lambda p: p.name)
def test_real_model_configs_stand_alone(path: Path) -> None:
    """A real-model config reads top to bottom: a header (what, what it needs, how to launch), no base: on the
    demo, and only keys whose values differ from the schema's defaults."""
    import yaml

    text = path.read_text()
    header = text.split("\n\n", 1)[0]  # the comment block before the first key
    assert all(line.startswith("#") for line in header.splitlines())
    assert "Needs:" in header and f"vlmops sft --config configs/{path.name}" in header
    data = yaml.safe_load(text)
    assert "base" not in data
    defaults = PipelineConfig().to_flat_dict()
    flat = load_config(path).to_flat_dict()
    set_keys = [k for k in flat if _lookup(data, k) is not _MISSING]
    assert set_keys and all(flat[k] != defaults[k] for k in set_keys), [k for k in set_keys if flat[k] == defaults[k]]


_MISSING = object()


def _lookup(data: dict, dotted: str) -> object:  # type: ignore[type-arg]
    node: object = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def test_auto_dtype_is_bf16_only_on_gpus_that_compute_in_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`model.dtype: auto` on a V100 or T4 (compute capability 7) is float16: bf16 is only emulated there, and
    torch's `is_bf16_supported()` says yes to it by default. Each device is asked about itself."""
    import torch

    from vlmops.models.loading import resolve_dtype

    capability = {"cuda:0": (7, 0), "cuda:1": (9, 0)}  # a V100 beside an H100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[str(device)])
    assert resolve_dtype("auto", "cuda:0") == torch.float16
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cuda:0") == torch.bfloat16  # asked for: as asked
