"""The schema of pipeline.yaml: one typed config for every step, loaded with dotted overrides.

Unknown keys and bad values are errors; all of them are reported at once, each with its key path and,
when it came from a file, the file and line.

The sections are defined in `training` (run, model, data, train, merge) and `serving` (infer, eval, tracking,
registry, versioning, storage), on the base in `section`; the whole config and its dump in `pipeline`; reading a
file with its overrides in `loading`. Import them from here.
"""

from vlmops.config.loading import ConfigError, load_config
from vlmops.config.pipeline import PipelineConfig, dump_config
from vlmops.config.serving import (
    EvalConfig,
    InferConfig,
    PromotionConfig,
    RegistryConfig,
    StorageConfig,
    TrackingConfig,
    VersioningConfig,
    dvc_url_login_refused,
    no_room_for_a_prompt,
)
from vlmops.config.training import (
    DEFAULT_SYSTEM_PROMPT,
    DataConfig,
    DemoDataConfig,
    FreezeConfig,
    LoraConfig,
    MergeConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    resolve_num_workers,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "ConfigError",
    "DataConfig",
    "DemoDataConfig",
    "EvalConfig",
    "FreezeConfig",
    "InferConfig",
    "LoraConfig",
    "MergeConfig",
    "ModelConfig",
    "PipelineConfig",
    "PromotionConfig",
    "RegistryConfig",
    "RunConfig",
    "StorageConfig",
    "TrackingConfig",
    "TrainConfig",
    "VersioningConfig",
    "dump_config",
    "dvc_url_login_refused",
    "load_config",
    "no_room_for_a_prompt",
    "resolve_num_workers",
]
