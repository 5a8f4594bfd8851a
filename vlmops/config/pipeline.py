"""The whole config, one section per step and service, checked together; and how it is written out: as YAML
(`dump_config`, saved with runs) and as dotted keys (MLflow params), passwords in URIs masked."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import field_validator, model_validator

from vlmops.config.section import Section
from vlmops.config.serving import (
    EvalConfig,
    InferConfig,
    RegistryConfig,
    StorageConfig,
    TrackingConfig,
    VersioningConfig,
)
from vlmops.config.training import DataConfig, MergeConfig, ModelConfig, RunConfig, TrainConfig


class PipelineConfig(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    merge: MergeConfig = MergeConfig()
    infer: InferConfig = InferConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()
    versioning: VersioningConfig = VersioningConfig()
    storage: StorageConfig = StorageConfig()

    @field_validator("train")
    @classmethod
    def _lora_targets_not_empty(cls, value: TrainConfig) -> TrainConfig:
        if value.mode == "lora" and not value.lora.targets.strip():
            raise ValueError("train.lora.targets is empty: use qkv, all-linear, ALL or a regex")
        return value

    @model_validator(mode="after")
    def _eval_source(self) -> PipelineConfig:
        if self.data.train is not None and self.data.eval is None and self.data.eval_ratio == 0:
            raise ValueError("no eval data: set data.eval to a file or folder, or data.eval_ratio above 0 (e.g. 0.1)")
        return self

    def to_flat_dict(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params (passwords in URIs masked)."""
        return _flatten(_redacted(self.model_dump(mode="json")))


def dump_config(config: PipelineConfig) -> str:
    """The resolved config as YAML, every key present; passwords in URIs masked (the file is saved with runs
    and logged to MLflow, and credentials belong in the environment)."""
    return yaml.safe_dump(_redacted(config.model_dump(mode="json")), sort_keys=False)


def _redacted(value: Any) -> Any:
    from vlmops.redact import redact_uri

    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return redact_uri(value) if isinstance(value, str) else value


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
