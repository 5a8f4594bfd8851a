"""From what a user names (a folder, a training run, a registered model) to the folders to load.

/path/to/checkpoint        a native transformers DeepSeek-VL checkpoint (e.g. a merged model)
/path/to/RUN_DIR           a `vlmops sft` run folder or one of its checkpoint-N folders: the trained
                           adapter on the run's base model, or the run's full weights
models:/NAME@ALIAS         a registered model version (MLflow registry), by alias or by number;
models:/NAME/VERSION       its artifacts (a merged checkpoint, or a pointer to the copy pushed to the DVC
                           remote, which is pulled from there) are downloaded once into a cache

deepseek-vl-7b-chat        a catalog name: downloaded (and converted) once through `download_model`,
                           as `swift infer --model_type deepseek-vl-7b-chat` does (`catalog_resolver`)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmops.config import InferConfig, ModelConfig, PipelineConfig
from vlmops.errors import RunFailed, UserInputError
from vlmops.filenames import safe_name
from vlmops.redact import redact_uri
from vlmops.staging import build_lock, staged_folder
from vlmops.tracking import resolve_tracking_uri
from vlmops.train.rundir import CONFIG_FILE, RUN_INFO, TrainedRun, open_run
from vlmops.versioning import POINTER_FILE, checkout_pointer

log = logging.getLogger(__name__)

REGISTRY_SCHEME = "models:/"
REGISTRY_MANIFEST = "vlmops_registry.json"
RETRAIN_MODEL_DIR = "merged"
"""A retrain flow run folder's model (`outputs/runs/<run>/merged`: the merged, parity-checked weights it ships)."""
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")

ResolveModel = Callable[[str], Path]


@dataclass(frozen=True)
class ModelSource:
    """What to load: a checkpoint folder, optionally a peft adapter on it, and the run they came from."""

    checkpoint: Path
    adapter: Path | None = None
    run: TrainedRun | None = None

    def describe(self) -> str:
        return f"{self.checkpoint} + adapter {self.adapter}" if self.adapter else str(self.checkpoint)


def default_registry_cache() -> Path:
    """Where registered model versions are downloaded: `registry/` beside the model cache."""
    return Path(ModelConfig().cache_dir).expanduser() / "registry"


def catalog_resolver(config: PipelineConfig) -> ResolveModel:
    """`resolve_model_ref` that also takes catalog names, fetching them with the config's cache and storage."""
    from vlmops.models.catalog import CATALOG, catalog_model_config
    from vlmops.models.download import download_model

    def resolve(ref: str) -> Path:
        if ref not in CATALOG:
            # Registered versions go beside the config's model cache (the default one: ~/.cache/vlmops/...).
            registry_cache = Path(config.model.cache_dir).expanduser() / "registry"
            return resolve_model_ref(
                ref,
                tracking_uri=resolve_tracking_uri(config.tracking.uri),
                cache_dir=registry_cache,
                dvc_remote_url=config.versioning.remote_url,
            )
        return download_model(catalog_model_config(config, ref), config.storage, config.run.output_dir).path

    return resolve


def config_for_model(config: PipelineConfig, ref: str, overrides: Sequence[str]) -> PipelineConfig:
    """`config` for a command that names the model `ref` (`--model`): where `ref` is a catalog name, its `model:`
    section is `ref`'s, with the command line's `--set model.*` (source, id, revision) applied to it
    (`catalog_model_config`); the config's own model section is another model's."""
    from vlmops.models.catalog import CATALOG, catalog_model_config

    if ref not in CATALOG:
        return config
    return config.model_copy(update={"model": catalog_model_config(config, ref, overrides)})


def resolve_model_ref(
    ref: str,
    tracking_uri: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    dvc_remote_url: str | None = None,
) -> Path:
    """A local folder for `ref`: a checkpoint or training run folder as it is, a retrain flow run folder's `merged/`
    model, a `models:/` URI downloaded (`dvc_remote_url`: the config's `versioning.remote_url`, see
    `download_registered_model`).

    Raises:
        FileNotFoundError: `ref` is neither an existing folder nor a `models:/` URI (a catalog name that was
            not downloaded yet, or a typo), or a folder that holds no model.
        ValueError: a malformed `models:/` URI or an unknown registered model, version or alias.
    """
    if not ref.strip():
        raise ValueError("empty model reference: pass a checkpoint folder, run folder or models:/NAME@ALIAS")
    if ref.startswith(REGISTRY_SCHEME):
        return download_registered_model(ref, tracking_uri, cache_dir, dvc_remote_url)
    folder = Path(ref).expanduser()
    if folder.is_dir():
        model = _retrain_model(folder) or folder
        if not (model / "config.json").is_file() and not (model / RUN_INFO).is_file():
            raise FileNotFoundError(
                f"model {ref}: not a model folder (no config.json, no run.json): pass a checkpoint folder (config.json "
                "beside the weights), a `vlmops sft` run or checkpoint folder, a retrain run folder (with merged/), a "
                "models:/NAME@ALIAS URI or a catalog name (`vlmops models`)"
            )
        return model
    if folder.exists():
        raise FileNotFoundError(f"model {ref}: is a file; pass the checkpoint folder that holds config.json")
    if "/" not in ref and "\\" not in ref:
        raise FileNotFoundError(
            f"model {ref!r} is not a local folder, a run folder or a models:/NAME@ALIAS URI. If it is a "
            f"catalog name, it is not yet downloaded: run `vlmops download {ref}` and pass the folder "
            "it prints"
        )
    raise FileNotFoundError(f"model folder {ref} does not exist")


def _retrain_model(folder: Path) -> Path | None:
    """A retrain flow run folder's (outputs/runs/<run>) model, its merged/; None for any other folder."""
    shipped = folder / RETRAIN_MODEL_DIR
    if not (folder / "config.json").exists() and not (folder / RUN_INFO).exists() and shipped.is_dir():
        return shipped
    return None


def saved_run_folder(ref: str) -> str | None:
    """The folder whose saved config comes with the model `ref` names: a `vlmops sft` run or checkpoint folder, or a
    retrain flow run folder's merged/ model (config.yaml beside run.json); None for anything else (a plain checkpoint,
    a `models:/` URI, a catalog name)."""
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        return None
    folder = _retrain_model(folder) or folder
    return str(folder) if (folder / RUN_INFO).is_file() and (folder / CONFIG_FILE).is_file() else None


GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
"""The `infer` settings a model brings in its saved config (how its answers are generated); batch settings (engine,
batch and shard sizes, workers) belong to the machine and the job, not the model."""


def with_saved_settings(config: PipelineConfig, source: ModelSource) -> PipelineConfig:
    """`config` with the generation settings (`infer.` GENERATION_KEYS), `model.system_prompt` and `data.max_length`
    (the longest conversation the chat page takes) saved with the model (a run folder, a retrain run's merged model, a
    registered version of one) wherever `config` leaves them unset: what its file or `--set` gives wins.
    `ChatModel.load` takes the generation settings and system prompt so; a model without a saved config changes
    nothing."""
    if source.run is None:
        return config
    saved = source.run.config
    model = {} if "system_prompt" in config.model.model_fields_set else {"system_prompt": saved.model.system_prompt}
    data = {} if "max_length" in config.data.model_fields_set else {"max_length": saved.data.max_length}
    return config.model_copy(
        update={
            "infer": with_saved_generation(config.infer, saved.infer),
            "model": config.model.model_copy(update=model),
            "data": config.data.model_copy(update=data),
        }
    )


def with_saved_generation(infer: InferConfig, saved: InferConfig) -> InferConfig:
    """`infer` with the generation settings (GENERATION_KEYS) of `saved` wherever `infer` leaves them unset (the keys
    it was given: `model_fields_set`)."""
    unset = {key: getattr(saved, key) for key in GENERATION_KEYS if key not in infer.model_fields_set}
    return infer.model_copy(update=unset)


def model_source(
    model: str, adapter: str | None = None, resolve_model: ResolveModel = resolve_model_ref
) -> ModelSource:
    """Work out the checkpoint and adapter to load for `model` (any form above) and an optional `adapter`.

    `adapter` is a peft adapter folder or a LoRA run folder; its adapter is applied to `model`, which then
    must be a plain checkpoint (e.g. the run's base model found at another path on this machine).
    """
    folder = resolve_model(model)
    source = _run_source(open_run(folder), resolve_model) if (folder / RUN_INFO).is_file() else ModelSource(folder)
    if adapter is None:
        return source
    if source.adapter is not None or source.run is not None:
        raise ValueError(
            f"model {model} is a training run folder and already says what to load; pass its base model as "
            f"the model to apply the adapter {adapter} to another copy of the base"
        )
    adapter_folder = Path(adapter).expanduser()
    if (adapter_folder / RUN_INFO).is_file():
        run = open_run(adapter_folder)
        if not run.is_adapter:
            raise ValueError(
                f"{adapter} is a full fine-tuning run (no adapter in {run.weights}); load it as the model instead"
            )
        return ModelSource(source.checkpoint, run.weights, run)
    if not (adapter_folder / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"adapter {adapter}: no adapter_config.json there; pass a peft adapter folder or a LoRA run folder"
        )
    return ModelSource(source.checkpoint, adapter_folder)


def _run_source(run: TrainedRun, resolve_model: ResolveModel) -> ModelSource:
    if run.is_adapter:
        return ModelSource(resolve_model(run.info.base_model), run.weights, run)
    if not (run.weights / "config.json").is_file():
        raise FileNotFoundError(
            f"{run.weights} holds neither an adapter (adapter_config.json) nor a checkpoint (config.json)"
        )
    if not (run.weights / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"{run.weights} holds full weights but no tokenizer/processor files; copy them from the base "
            f"model {run.info.base_model} (processor.save_pretrained) next to the weights"
        )
    return ModelSource(run.weights, None, run)


@dataclass
class RegisteredVersion:
    """The registry's model version a `models:/` URI names, and the client that found it."""

    name: str
    version: Any
    """mlflow's ModelVersion (its `version`, `tags`, `aliases`, `run_id`)."""
    registry: str
    client: Any


def registered_version(uri: str, tracking_uri: str | None = None) -> RegisteredVersion:
    """Look up `models:/NAME@ALIAS` or `models:/NAME/VERSION` in the registry (an alias to its version).

    Raises:
        ValueError: a malformed URI, or a name, version or alias the registry does not know.
        RunFailed: the registry did not answer.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    match = _REGISTRY_URI.match(uri)
    if match is None:
        raise ValueError(f"model {uri}: write a registered model as models:/NAME@ALIAS or models:/NAME/VERSION")
    name = match.group("name")
    registry = tracking_uri or mlflow.get_registry_uri()
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry)
    try:
        if match.group("alias"):
            version = client.get_model_version_by_alias(name, match.group("alias"))
        else:
            version = client.get_model_version(name, match.group("version"))
    except MlflowException as err:
        raise _registry_error(uri, registry, err) from err
    return RegisteredVersion(name, version, registry, client)


def pinned_model_ref(ref: str, config: PipelineConfig) -> str:
    """`ref` with a registry alias looked up once, now: `models:/NAME@ALIAS` -> `models:/NAME/N`, the version the alias
    names; any other reference as it is (no lookup).

    A job that loads its model in more than one place (the batch-inference flow, which reads the model's saved settings,
    and its child process; the task workers that answer its shards) hands them this rather than the alias: a promotion
    meanwhile (`vlmops promote` moving the alias) would otherwise give the job the settings of one version and the
    weights of the next, or one version on some workers and another on the rest.

    Raises:
        ValueError: an alias or model the registry does not know.
        RunFailed: the registry did not answer.
    """
    match = _REGISTRY_URI.match(ref)
    if match is None or match.group("alias") is None:
        return ref
    found = registered_version(ref, resolve_tracking_uri(config.tracking.uri))
    return f"{REGISTRY_SCHEME}{found.name}/{found.version.version}"


def registry_alias_version(alias_uri: str, version: str | None) -> str | None:
    """`models:/NAME/VERSION` for the alias URI `models:/NAME@ALIAS` taken at `version`; None for any other reference
    (or no version)."""
    match = _REGISTRY_URI.match(alias_uri)
    if match is None or match.group("alias") is None or version is None:
        return None
    return f"{REGISTRY_SCHEME}{match.group('name')}/{version}"


def check_pinned_from(named_as: str, ref: str) -> None:
    """Refuse to record the model `ref` as `named_as` unless `ref` is a version of the registered model `named_as` is an
    alias of (what `pinned_model_ref` makes of it).

    Raises:
        UserInputError: `named_as` is not a `models:/NAME@ALIAS`, or `ref` not a `models:/NAME/VERSION` of that NAME.
    """
    named, pinned = _REGISTRY_URI.match(named_as), _REGISTRY_URI.match(ref)
    if (
        named is None
        or pinned is None
        or named.group("alias") is None
        or pinned.group("version") is None
        or named.group("name") != pinned.group("name")
    ):
        raise UserInputError(
            f"model {ref} named as {named_as}: a model is named as the alias it was pinned from only, "
            "models:/NAME@ALIAS for models:/NAME/VERSION of the same NAME; leave the name out for any other model"
        )


REGISTRY_OUTAGE_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})
"""MLflow error codes of a registry that did not answer (MLflow's client says INTERNAL_ERROR for a refused
connection), as against one that answered that it does not know the model."""


def _registry_error(uri: str, registry: str, err: Any) -> Exception:
    """What to raise for an MlflowException `err` of a registry lookup: the registry's outage as such (RunFailed: a
    rerun may pass), or a model it does not know (ValueError). Every outage read as 'not found in the registry',
    pointing at the model name rather than the server."""
    status = err.get_http_status_code()
    if err.error_code in REGISTRY_OUTAGE_CODES or status >= 500 or status == 429:
        return RunFailed(
            redact_uri(
                f"model {uri}: the registry at {registry} could not be reached ({err.message}): start it (or fix "
                "tracking.uri) and run again"
            )
        )
    return ValueError(redact_uri(f"model {uri}: not found in the registry at {registry} ({err.message})"))


def download_registered_model(
    uri: str,
    tracking_uri: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    dvc_remote_url: str | None = None,
) -> Path:
    """Download a registered model version's artifacts (a merged checkpoint) once; return the local folder.

    An alias is resolved to its version number first, so moving the alias is seen on the next load while an
    unchanged version is never downloaded twice. The cache is keyed on the registry, name and version, and a
    cached copy is reused only if its recorded source still matches the registry's. A version whose artifact is a
    DVC pointer is pulled from its DVC remote; `dvc_remote_url` (the config's `versioning.remote_url`) gives that
    remote's password, which the pointer never records (`checkout_pointer`).
    """
    from mlflow.exceptions import MlflowException

    found = registered_version(uri, tracking_uri)
    name, version, registry = found.name, found.version, found.registry
    try:
        source = found.client.get_model_version_download_uri(name, version.version)
    except MlflowException as err:
        raise _registry_error(uri, registry, err) from err

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_registry_cache()
    registry_key = hashlib.sha256(registry.encode()).hexdigest()[:12]
    target = root / registry_key / safe_name(name) / f"v{version.version}"
    # Recorded with any login of the URIs masked: the cache may sit on a disk others read (the folder's name is a
    # hash of the whole registry URI, so another login still gets its own copy).
    manifest = {
        "registry": redact_uri(registry),
        "name": name,
        "version": str(version.version),
        "source": redact_uri(source),
    }
    cached = _cached_checkpoint(target, manifest)
    if cached is not None:
        log.info("%s is version %s, cached at %s", uri, version.version, cached)
        return cached

    # One download of a version at a time into one cache: the processes that need it at once (a distributed job's
    # task workers on one machine, each loading its model as the job starts) wait for the first and use its copy,
    # where each would download it and publish its own over the folder another is reading.
    with build_lock(target, f"downloading {redact_uri(uri)} (version {version.version})"):
        cached = _cached_checkpoint(target, manifest)
        if cached is not None:
            log.info("%s is version %s, cached at %s by another process meanwhile", uri, version.version, cached)
            return cached
        with staged_folder(target) as staging:
            log.info("downloading %s (version %s) from %s", uri, version.version, manifest["source"])
            local = Path(_download(source, staging, tracking_uri))
            if (local / POINTER_FILE).is_file():  # the version points at the copy in the DVC remote
                local = checkout_pointer(local / POINTER_FILE, staging / "dvc", dvc_remote_url)
            if not (local / "config.json").is_file():
                raise ValueError(
                    f"model {uri}: version {version.version}'s artifacts ({source}) are not a checkpoint folder "
                    "(no config.json); register the merged model folder itself"
                )
            manifest["folder"] = local.relative_to(staging).as_posix()
            (staging / REGISTRY_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return target / manifest["folder"]


def _download(source: str, dst: Path, tracking_uri: str | None) -> str:
    import mlflow

    return str(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri))


def _cached_checkpoint(target: Path, manifest: dict[str, str]) -> Path | None:
    manifest_file = target / REGISTRY_MANIFEST
    if not manifest_file.is_file():
        return None
    saved = json.loads(manifest_file.read_text())
    # A copy cached before the URIs were masked in it holds them whole: compared masked, it is reused.
    if any(redact_uri(str(saved.get(key))) != value for key, value in manifest.items()):
        log.warning(
            "cached %s was downloaded from %s, the registry now says %s: downloading again",
            target,
            redact_uri(str(saved.get("source"))),
            manifest["source"],
        )
        return None
    folder = target / saved["folder"]
    return folder if (folder / "config.json").is_file() else None
