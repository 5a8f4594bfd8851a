"""download_model against the real ModelScope / HF hub clients (talking to a local fake hub), local folders,
tiny models built on demand, and a real S3 server (SeaweedFS, `integration`)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fake_hubs import FakeHub, serve, use_hf_hub, use_modelscope
from tests.snapshot_process import SLOW_GET_S, fetch_snapshot
from vlmops.cli.main import main
from vlmops.config import ModelConfig, StorageConfig
from vlmops.errors import UserInputError
from vlmops.hashing import sha256_file
from vlmops.models.download import (
    ModelDownloadError,
    ModelFolderNotFoundError,
    ModelNotFoundError,
    SnapshotCorruptedError,
    TransferFailedError,
    download_model,
)
from vlmops.models.tiny import build_tiny_model
from vlmops.testing.fake_release import tiny_release_config, write_original_checkpoint

MODEL_FILES = {
    "config.json",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def _load(path: Path) -> Any:
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return model


@pytest.fixture(scope="module")
def release_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model in the ModelScope release layout, sharded, plus files a model does not need."""
    folder = tmp_path_factory.mktemp("release") / "repo"
    write_original_checkpoint(folder, tiny_release_config("deepseek_vl"), seed=2, shard_bytes=60_000)
    (folder / "README.md").write_text("# DeepSeek-VL\n")
    (folder / "images").mkdir()
    (folder / "images" / "sample.jpg").write_bytes(b"\xff\xd8" + os.urandom(2000))
    (folder / "pytorch_model.bin").write_bytes(os.urandom(3000))  # a second copy the download must skip
    return folder


def _shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("model-*.safetensors"))


def _s3_model(s3_env: Any, release: Path, bucket: str, cache: Path) -> tuple[StorageConfig, Any, str, ModelConfig]:
    """The release uploaded to s3://BUCKET/tiny-vl: (storage, S3 client, URI, a model config of it cached in
    `cache`)."""
    from vlmops.storage import s3_client, upload_folder

    storage = StorageConfig(endpoint_url=s3_env.endpoint_url)
    client = s3_client(storage)
    client.create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/tiny-vl"
    upload_folder(client, release, uri, progress=False)
    return storage, client, uri, ModelConfig(name="tiny-vl", source="s3", id=uri, cache_dir=str(cache))


@contextmanager
def _s3_requests(client: Any, operation: str) -> Iterator[list[str]]:
    """The keys or prefixes of the `operation` requests (e.g. ListObjectsV2) `client` sends inside the block, as
    botocore's event hooks see them (the process's `s3_client` is shared: the hook is removed after)."""
    seen: list[str] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        seen.append(params.get("Key") or params.get("Prefix") or "")

    event = f"before-parameter-build.s3.{operation}"
    client.meta.events.register(event, record)
    try:
        yield seen
    finally:
        client.meta.events.unregister(event, record)


def _changed_tokenizer(release: Path, folder: Path) -> Path:
    """`folder` holding the release's tokenizer_config.json with another model_max_length (4096): an object to
    rewrite in place, as a changed upstream model would."""
    folder.mkdir()
    settings = json.loads((release / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 4096}))
    return folder


# ---- ModelScope ------------------------------------------------------------------------------------------


def test_modelscope_download_resume_convert_then_offline_verify(
    release_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub(repos={("deepseek-ai/deepseek-vl-1.3b-chat", "master"): release_repo})
    shards = _shards(release_repo)
    hub.truncate_once.add(shards[1])  # the first transfer of this shard breaks off halfway
    config = ModelConfig(name="deepseek-vl-1.3b-chat", cache_dir=str(tmp_path / "cache"))
    with serve(hub):
        use_modelscope(monkeypatch, hub.url)
        snap = download_model(config, None, tmp_path / "out")

    assert (snap.source, snap.id, snap.revision) == (
        "modelscope",
        "deepseek-ai/deepseek-vl-1.3b-chat",
        "master",
    )
    fetched = {r.query["FilePath"] for r in hub.requests if r.query.get("FilePath")}
    assert fetched == MODEL_FILES | set(shards)  # no README, images or duplicate .bin
    resumed = [r for r in hub.downloads(shards[1]) if r.range]
    assert resumed and resumed[0].range.startswith("bytes=")  # the real client resumed with a Range request
    for name in MODEL_FILES | set(shards):
        assert sha256_file(snap.original_path / name) == sha256_file(release_repo / name)

    manifest = json.loads(snap.manifest_path.read_text())
    assert snap.converted and snap.path.parent == tmp_path / "cache" / "converted"
    assert manifest["source_digest"]  # the converted folder's manifest points at the download's
    source_manifests = list((tmp_path / "cache" / "manifests" / "modelscope").rglob("*.json"))
    assert len(source_manifests) == 1
    recorded = json.loads(source_manifests[0].read_text())["files"]
    assert set(recorded) == MODEL_FILES | set(shards)
    assert recorded[shards[0]]["sha256"] == sha256_file(release_repo / shards[0])
    assert not any(p.name.endswith(".json") and "manifest" in p.name for p in snap.original_path.iterdir())
    _load(snap.path)

    # Later runs: the hub is gone (nothing listens on that port any more); the snapshot is verified offline
    converted_weights = snap.path / "model.safetensors"
    stamp = converted_weights.stat().st_mtime_ns
    again = download_model(config, None, tmp_path / "out")
    assert again == snap
    assert converted_weights.stat().st_mtime_ns == stamp  # not converted a second time

    # A damaged weight file is caught, named, and the fix is in the message
    _flip_bytes(snap.original_path / shards[0])
    with pytest.raises(SnapshotCorruptedError, match=rf"{shards[0]}: corrupted.*Delete .* or rerun with refresh"):
        download_model(config, None, tmp_path / "out")

    with serve(hub):
        use_modelscope(monkeypatch, hub.url)
        repaired = download_model(config, None, tmp_path / "out", refresh=True)
    assert sha256_file(repaired.original_path / shards[0]) == sha256_file(release_repo / shards[0])
    assert repaired.digest == snap.digest


def test_the_download_step_is_not_reused_after_vlmops_download_refresh(
    release_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None
) -> None:
    """The release changed upstream and `vlmops download --refresh` fetched and converted it again: the retrain
    flow's download step, whose cache key has not changed, runs again rather than serve its cached snapshot (the
    conversion of the old release, still on disk, and its digest); once run, it is Cached again."""
    import shutil

    from prefect import flow
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from tasks.download import fetch_base_model

    repo = ("deepseek-ai/deepseek-vl-1.3b-chat", "master")
    hub = FakeHub(repos={repo: release_repo})
    changed = tmp_path / "changed"
    shutil.copytree(release_repo, changed)
    (_changed_tokenizer(release_repo, tmp_path / "tokenizer") / "tokenizer_config.json").replace(
        changed / "tokenizer_config.json"
    )
    config = ModelConfig(name="deepseek-vl-1.3b-chat", cache_dir=str(tmp_path / "cache"))

    @flow
    def download_step() -> tuple[Any, bool]:
        return fetch_base_model(config, StorageConfig(), str(tmp_path / "out"), None)

    with serve(hub), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}):
        use_modelscope(monkeypatch, hub.url)
        first, first_cached = download_step()
        hub.repos[repo] = changed
        refreshed = download_model(config, None, tmp_path / "out", refresh=True)  # vlmops download --refresh
        second, second_cached = download_step()
        third, third_cached = download_step()
    assert refreshed.path != first.path and first.path.is_dir()  # the old conversion is still there
    assert (second, second_cached) == (refreshed, False)
    assert json.loads((second.path / "tokenizer_config.json").read_text())["model_max_length"] == 4096
    assert (first_cached, third_cached) == (False, True) and third == refreshed


def test_modelscope_unknown_id(release_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = FakeHub(repos={("deepseek-ai/deepseek-vl-1.3b-chat", "master"): release_repo})
    config = ModelConfig(name="mine", source="modelscope", id="deepseek-ai/no-such-model", cache_dir=str(tmp_path))
    with serve(hub):
        use_modelscope(monkeypatch, hub.url)
        with pytest.raises(ModelNotFoundError, match="ModelScope has no model 'deepseek-ai/no-such-model'"):
            download_model(config, None, tmp_path / "out")


def test_modelscope_unreachable_says_to_use_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_modelscope(monkeypatch, "http://127.0.0.1:9")  # the discard port: nothing listens
    config = ModelConfig(name="deepseek-vl-7b-chat", cache_dir=str(tmp_path))
    with pytest.raises(TransferFailedError, match=r"ModelScope is unreachable.*model\.source: local"):
        download_model(config, None, tmp_path / "out")


def test_not_enough_disk_space_is_refused_before_downloading(
    release_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = _shards(release_repo)
    hub = FakeHub(repos={("deepseek-ai/deepseek-vl-1.3b-chat", "master"): release_repo})
    hub.listed_sizes[shards[0]] = 10**16  # 10 PB
    config = ModelConfig(name="deepseek-vl-1.3b-chat", cache_dir=str(tmp_path / "cache"))
    with serve(hub):
        use_modelscope(monkeypatch, hub.url)
        with pytest.raises(OSError, match=r"not enough disk space.*model\.cache_dir") as caught:
            download_model(config, None, tmp_path / "out")
    assert caught.value.errno == errno.ENOSPC
    assert not any(r.query.get("FilePath") for r in hub.requests)  # nothing was fetched


# ---- HF hub ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = build_tiny_model(tmp_path_factory.mktemp("native") / "repo", variant="deepseek_vl_hybrid", seed=4)
    (folder / "README.md").write_text("model card\n")
    return folder


def test_hf_hub_download_native_then_offline(
    native_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub(repos={("deepseek-community/deepseek-vl-7b-chat", "main"): native_repo})
    config = ModelConfig(name="deepseek-vl-7b-chat", source="huggingface", cache_dir=str(tmp_path / "cache"))
    with serve(hub):
        use_hf_hub(monkeypatch, hub.url)
        snap = download_model(config, None, tmp_path / "out")
    assert (snap.source, snap.id, snap.revision, snap.converted) == (
        "huggingface",
        "deepseek-community/deepseek-vl-7b-chat",
        "main",
        False,
    )
    assert snap.path == snap.original_path and (snap.path / "config.json").is_file()
    assert not (snap.path / "README.md").exists()
    assert {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path} == {
        p.name for p in native_repo.iterdir() if p.name != "README.md"
    }
    _load(snap.path)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert download_model(config, None, tmp_path / "out") == snap
    _flip_bytes(snap.path / "model.safetensors")
    with pytest.raises(SnapshotCorruptedError, match=r"model\.safetensors: corrupted"):
        download_model(config, None, tmp_path / "out")

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with serve(hub):
        use_hf_hub(monkeypatch, hub.url)
        repaired = download_model(config, None, tmp_path / "out", refresh=True)
    assert repaired.digest == snap.digest  # the damaged blob was fetched again, not relinked


def test_hf_hub_unknown_repo(native_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = FakeHub(repos={("deepseek-community/deepseek-vl-7b-chat", "main"): native_repo})
    config = ModelConfig(name="x", source="huggingface", id="someone/nothing", cache_dir=str(tmp_path))
    with serve(hub):
        use_hf_hub(monkeypatch, hub.url)
        with pytest.raises(ModelNotFoundError, match="the HF hub has no model 'someone/nothing'"):
            download_model(config, None, tmp_path / "out")


def test_hf_hub_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_hf_hub(monkeypatch, "http://127.0.0.1:9")
    config = ModelConfig(name="deepseek-vl-1.3b-chat", source="huggingface", cache_dir=str(tmp_path))
    with pytest.raises(TransferFailedError, match=r"the HF hub is unreachable.*model\.source: local.*HF_ENDPOINT"):
        download_model(config, None, tmp_path / "out")


# ---- local folders and tiny models -----------------------------------------------------------------------


def test_tiny_entry_is_built_once_and_its_manifest_stays_out_of_the_folder(tmp_path: Path) -> None:
    config = ModelConfig(name="tiny-deepseek-vl", cache_dir=str(tmp_path / "cache"))
    snap = download_model(config, None, tmp_path / "out")
    folder = tmp_path / "out" / "models" / "tiny-deepseek-vl"
    assert (snap.source, snap.path, snap.converted) == ("local", folder, False)
    # its manifest beside it in the run's output folder, not in the model cache
    assert snap.manifest_path.is_relative_to(tmp_path / "out" / "models" / "manifests" / "local")
    assert not (tmp_path / "cache").exists()
    files = sorted(p.name for p in folder.iterdir())
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = download_model(config, None, tmp_path / "out")
    assert again == snap
    assert sorted(p.name for p in folder.iterdir()) == files  # nothing written into the model folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt

    # the folder is the user's: a change is re-hashed, not refused
    settings = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**settings, "max_new_tokens": 7}))
    changed = download_model(config, None, tmp_path / "out")
    assert changed.digest != snap.digest


def test_a_broken_link_in_a_local_model_folder_is_named_not_left_out(tmp_path: Path) -> None:
    """A model file linked to what is gone (a hub cache's blob deleted, a mount not there) was left out of the
    manifest without a word, and the model loaded without it or failed later; now the folder's check names it."""
    config = ModelConfig(name="tiny-deepseek-vl", cache_dir=str(tmp_path / "cache"))
    folder = download_model(config, None, tmp_path / "out").path
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(tmp_path / "gone" / "tokenizer.json")
    with pytest.raises(UserInputError) as refused:
        download_model(config, None, tmp_path / "out")
    assert str(refused.value) == (
        f"cannot read 1 file: {folder}/tokenizer.json is a broken symlink to {tmp_path}/gone/tokenizer.json (No such "
        "file or directory): restore the target or remove the link"
    )
    assert refused.value.exit_code == 2


def test_local_release_layout_is_converted_once(tmp_path: Path) -> None:
    source = write_original_checkpoint(
        tmp_path / "mine", tiny_release_config("deepseek_vl_hybrid"), dtype=torch.float32
    )
    before = sorted(p.name for p in source.iterdir())
    config = ModelConfig(name="my-vl", source="local", id=str(source), cache_dir=str(tmp_path / "cache"))
    snap = download_model(config, None, tmp_path / "out")
    assert snap.converted and snap.original_path == source
    assert snap.path.name.startswith("my-vl-")
    assert sorted(p.name for p in source.iterdir()) == before
    model = _load(snap.path)
    assert type(model).__name__ == "DeepseekVLHybridForConditionalGeneration"
    stamp = (snap.path / "model.safetensors").stat().st_mtime_ns
    assert download_model(config, None, tmp_path / "out") == snap
    assert (snap.path / "model.safetensors").stat().st_mtime_ns == stamp


def test_missing_local_folder(tmp_path: Path) -> None:
    config = ModelConfig(name="mine", source="local", id=str(tmp_path / "nope"), cache_dir=str(tmp_path))
    with pytest.raises(ModelFolderNotFoundError, match="nope does not exist"):
        download_model(config, None, tmp_path / "out")


def test_download_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = ["--set", f"model.cache_dir={tmp_path / 'cache'}", "--set", f"run.output_dir={tmp_path / 'out'}"]
    assert main(["download", "--config", "pipeline.yaml", *overrides]) == 0
    out = capsys.readouterr().out
    assert "tiny-deepseek-vl: local" in out and "manifest:" in out
    # an unknown model is the user's to fix: exit 2, with the catalog's names
    assert main(["download", "--config", "pipeline.yaml", "--set", "model.name=deepseek-vl-99b"]) == 2
    assert "unknown model 'deepseek-vl-99b'" in capsys.readouterr().err
    assert main(["download", "deepseek-vl-99b", "--config", "pipeline.yaml", *overrides]) == 2
    assert "unknown model 'deepseek-vl-99b'. Known models: deepseek-vl-1.3b-chat" in capsys.readouterr().err


def test_download_command_fetches_a_catalog_name_and_refresh_repairs_it(
    release_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vlmops download NAME` (the hint `vlmops infer` gives) and `--refresh` (the hint a corrupted snapshot
    gives), through the real parser, against the fake ModelScope."""
    hub = FakeHub(repos={("deepseek-ai/deepseek-vl-1.3b-chat", "master"): release_repo})
    cache = tmp_path / "cache"
    # the config's model (the tiny local default) is not touched: NAME takes the config's cache only
    args = ["--config", "pipeline.yaml", "--set", f"model.cache_dir={cache}", "--set", f"run.output_dir={tmp_path}"]
    with serve(hub):
        use_modelscope(monkeypatch, hub.url)
        assert main(["download", "deepseek-vl-1.3b-chat", *args]) == 0
    out = capsys.readouterr().out
    assert "model deepseek-vl-1.3b-chat: modelscope deepseek-ai/deepseek-vl-1.3b-chat@master" in out
    assert f"converted:       {cache / 'converted'}" in out
    assert not (tmp_path / "models").exists()  # the config's tiny model was not built
    downloaded = next((cache / "modelscope").rglob("config.json")).parent
    shard = _shards(release_repo)[0]

    # offline, the snapshot is verified and reused; a damaged file is refused with the --refresh hint
    assert main(["download", "deepseek-vl-1.3b-chat", *args]) == 0
    capsys.readouterr()
    _flip_bytes(downloaded / shard)
    assert main(["download", "deepseek-vl-1.3b-chat", *args]) == 1
    err = capsys.readouterr().err
    assert f"{shard}: corrupted" in err and "`vlmops download NAME --refresh`" in err

    with serve(hub):
        use_modelscope(monkeypatch, hub.url)
        before = len(hub.downloads(shard))
        assert main(["download", "deepseek-vl-1.3b-chat", "--refresh", *args]) == 0
        assert len(hub.downloads(shard)) > before  # fetched again, not trusted
    assert sha256_file(downloaded / shard) == sha256_file(release_repo / shard)
    capsys.readouterr()
    assert main(["download", "deepseek-vl-1.3b-chat", *args]) == 0  # and offline again afterwards


def test_download_command_applies_model_overrides_to_the_named_model(
    native_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vlmops download NAME --set model.source=huggingface` fetches NAME from the HF hub: the override was dropped
    with the config's own model section (another model's) and NAME came from ModelScope, the catalog's default."""
    hub = FakeHub(repos={("deepseek-community/deepseek-vl-7b-chat", "main"): native_repo})
    use_modelscope(monkeypatch, "http://127.0.0.1:9")  # nothing answers there
    args = ["--config", "pipeline.yaml", "--set", f"model.cache_dir={tmp_path / 'cache'}"]
    with serve(hub):
        use_hf_hub(monkeypatch, hub.url)
        assert main(["download", "deepseek-vl-7b-chat", *args, "--set", "model.source=huggingface"]) == 0
    assert (
        "model deepseek-vl-7b-chat: huggingface deepseek-community/deepseek-vl-7b-chat@main" in capsys.readouterr().out
    )


def test_batch_infer_applies_model_overrides_to_the_catalog_model_it_names(
    native_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vlmops batch-infer --model deepseek-vl-7b-chat --set model.source=huggingface` (and `vlmops infer`, `vlmops
    app`) fetch that model from the HF hub, as `vlmops download NAME` does: the override went with the config's own
    model section (pipeline.yaml's tiny one), and the model came from ModelScope, the catalog's default."""
    hub = FakeHub(repos={("deepseek-community/deepseek-vl-7b-chat", "main"): native_repo})
    use_modelscope(monkeypatch, "http://127.0.0.1:9")  # nothing answers there
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "query": "Say hello."}) + "\n")
    settings = [f"model.cache_dir={tmp_path / 'cache'}", "model.source=huggingface", "infer.max_new_tokens=2"]
    args = ["--input", str(prompts), "--output", str(tmp_path / "answers"), "--config", "pipeline.yaml"]
    with serve(hub):
        use_hf_hub(monkeypatch, hub.url)
        assert main(["batch-infer", "--model", "deepseek-vl-7b-chat", *args, *(f"--set={s}" for s in settings)]) == 0
    assert hub.downloads("model.safetensors") and "1 answered" in capsys.readouterr().out.replace("  ", " ")


def test_download_errors_say_whose_move_it_is() -> None:
    assert ModelNotFoundError("x").exit_code == 2 and isinstance(ModelNotFoundError("x"), ModelDownloadError)
    assert ModelFolderNotFoundError("x").exit_code == 2 and isinstance(ModelFolderNotFoundError("x"), FileNotFoundError)
    assert TransferFailedError("x").exit_code == 1 and SnapshotCorruptedError("x").exit_code == 1


# ---- S3 (SeaweedFS) --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_s3_download_convert_and_resync(release_repo: Path, tmp_path: Path, s3_env: Any) -> None:
    from vlmops.storage import s3_client, upload_folder

    storage = StorageConfig(endpoint_url=s3_env.endpoint_url)
    client = s3_client(storage)
    client.create_bucket(Bucket="models")
    upload_folder(client, release_repo, "s3://models/releases/tiny-vl", progress=False)
    config = ModelConfig(
        name="tiny-vl", source="s3", id="s3://models/releases/tiny-vl", cache_dir=str(tmp_path / "cache")
    )

    snap = download_model(config, storage, tmp_path / "out")
    assert snap.converted and snap.original_path == tmp_path / "cache" / "s3" / "models" / "releases" / "tiny-vl"
    assert not (snap.original_path / "README.md").exists() and not (snap.original_path / "pytorch_model.bin").exists()
    _load(snap.path)

    # later runs need no S3 at all
    offline = StorageConfig(endpoint_url="http://127.0.0.1:9")
    assert download_model(config, offline, tmp_path / "out") == snap

    # an object changed upstream: refresh copies only that one, and the new content gets its own conversion
    shard = _shards(release_repo)[0]
    untouched = snap.original_path / _shards(release_repo)[1]
    stamp = untouched.stat().st_mtime_ns
    changed = _changed_tokenizer(release_repo, tmp_path / "changed")
    upload_folder(client, changed, "s3://models/releases/tiny-vl", progress=False)
    client.delete_object(Bucket="models", Key="releases/tiny-vl/special_tokens_map.json")
    refreshed = download_model(config, storage, tmp_path / "out", refresh=True)
    assert untouched.stat().st_mtime_ns == stamp
    assert not (snap.original_path / "special_tokens_map.json").exists()  # gone upstream, gone here
    assert (snap.original_path / shard).is_file()
    assert refreshed.digest != snap.digest and refreshed.path != snap.path
    assert json.loads((refreshed.path / "tokenizer_config.json").read_text())["model_max_length"] == 4096


@pytest.mark.integration
def test_s3_model_changed_upstream_is_fetched_again_without_refresh(
    release_repo: Path, tmp_path: Path, s3_env: Any
) -> None:
    """A cached S3 copy is used while the prefix's listing (keys and ETags) is the one it was copied from; a changed
    object is copied again (only it), a removed one removed, and the new content gets its own conversion."""
    from vlmops.storage import upload_folder

    storage, client, uri, config = _s3_model(s3_env, release_repo, "models-changed", tmp_path / "cache")
    with _s3_requests(client, "ListObjectsV2") as listed:
        snap = download_model(config, storage, tmp_path / "out")
    assert listed == ["tiny-vl/"]  # one listing for the check and the copy (it was two)
    untouched = snap.original_path / _shards(release_repo)[0]
    stamp = untouched.stat().st_mtime_ns
    assert download_model(config, storage, tmp_path / "out") == snap  # same listing: the cached copy as is

    changed = _changed_tokenizer(release_repo, tmp_path / "changed")
    upload_folder(client, changed, uri, progress=False)
    client.delete_object(Bucket="models-changed", Key="tiny-vl/special_tokens_map.json")
    with _s3_requests(client, "ListObjectsV2") as listed:
        fresh = download_model(config, storage, tmp_path / "out")
    assert listed == ["tiny-vl/"]
    assert fresh.digest != snap.digest and fresh.path != snap.path
    assert json.loads((fresh.path / "tokenizer_config.json").read_text())["model_max_length"] == 4096
    assert not (snap.original_path / "special_tokens_map.json").exists()
    assert untouched.stat().st_mtime_ns == stamp  # unchanged objects are not copied again

    # S3 out of reach: the verified copy of the last listing, with a warning
    assert download_model(config, StorageConfig(endpoint_url="http://127.0.0.1:9"), tmp_path / "out") == fresh


@pytest.mark.integration
def test_the_download_task_is_not_reused_after_an_s3_model_changed(
    release_repo: Path, tmp_path: Path, s3_env: Any, prefect_harness: None
) -> None:
    """The download step's cache key follows an S3 model's listing (keys and ETags): a prefix rewritten in place is
    downloaded again by the retrain flow, not served as Cached from the run before."""
    from prefect import flow
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from tasks.download import download_model as download_task
    from vlmops.storage import upload_folder

    storage, client, uri, config = _s3_model(s3_env, release_repo, "models-task", tmp_path / "cache")
    changed = _changed_tokenizer(release_repo, tmp_path / "changed")

    @flow
    def download_three_times() -> list[tuple[str | None, str]]:
        states = []
        for _ in range(3):
            state = download_task(config, storage, str(tmp_path / "out"), None, return_state=True)
            states.append((state.name, state.result().digest))
            upload_folder(client, changed, uri, progress=False)  # after the first: changed; after the second: same
        return states

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}):
        (first, old), (second, new), (third, same) = download_three_times()
    assert (first, second, third) == ("Completed", "Completed", "Cached")
    assert old != new == same


def test_a_file_added_to_a_local_folder_changes_its_digest_and_conversion(tmp_path: Path) -> None:
    """The manifest of a local folder covers every model file in it: one added since (a tokenizer file put in
    later) is part of the content, so the folder is re-hashed and converted again rather than served from the
    conversion of the files it held before."""
    source = write_original_checkpoint(tmp_path / "mine", tiny_release_config("deepseek_vl"), dtype=torch.float32)
    settings = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").unlink()  # optional for the converter: its defaults stand in
    config = ModelConfig(name="my-vl", source="local", id=str(source), cache_dir=str(tmp_path / "cache"))
    snap = download_model(config, None, tmp_path / "out")
    (source / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 4096}))
    again = download_model(config, None, tmp_path / "out")
    assert again.digest != snap.digest and again.path != snap.path
    assert json.loads((again.path / "tokenizer_config.json").read_text())["model_max_length"] == 4096


@pytest.mark.integration
def test_s3_prefixes_whose_safe_names_meet_keep_their_own_manifests(
    release_repo: Path, tmp_path: Path, s3_env: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """'m/a/b' and 'm/a--b' (or '' and 'root') spelled one manifest file: each download of one replaced the other's,
    so going back to the first copied its files again (checked them all) as if it had changed."""
    import logging

    from vlmops.storage import s3_client, upload_folder

    storage = StorageConfig(endpoint_url=s3_env.endpoint_url)
    client = s3_client(storage)
    client.create_bucket(Bucket="models-names")
    changed = _changed_tokenizer(release_repo, tmp_path / "changed")
    configs = []
    for prefix in ("m/a/b", "m/a--b"):
        upload_folder(client, release_repo, f"s3://models-names/{prefix}", progress=False)
        configs.append(
            ModelConfig(name="tiny-vl", source="s3", id=f"s3://models-names/{prefix}", cache_dir=str(tmp_path / "c"))
        )
    upload_folder(client, changed, "s3://models-names/m/a--b", progress=False)  # another model there
    first = download_model(configs[0], storage, tmp_path / "out")
    assert download_model(configs[1], storage, tmp_path / "out").digest != first.digest
    caplog.set_level(logging.INFO, logger="vlmops.models.hubs")
    caplog.clear()  # what the calls above logged (vlmops's INFO lines show once flows is imported)
    assert download_model(configs[0], storage, tmp_path / "out") == first
    assert "changed since" not in caplog.text
    assert len(list((tmp_path / "c" / "manifests" / "s3" / "models-names").glob("*.json"))) == 2  # and their locks


@pytest.mark.integration
def test_an_s3_model_damaged_on_the_way_is_a_failed_run_that_a_rerun_repairs(
    tmp_path: Path, s3_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A shard that arrives damaged (a proxy flips a byte on the way; it is fetched in ranges, so only the ETag check
    after the copy sees it) fails the download as a transfer: `TransferFailedError`, exit 1, which the download task's
    retry condition retries. It was a ValueError: exit 2, "bad input", and never retried, though the input was fine
    and running again is the fix. Straight to the server, the same command then passes."""
    from tests.corrupting_proxy import corrupting_proxy
    from vlmops.outages import is_transient
    from vlmops.storage import MIB, s3_client, upload_folder

    client = s3_client(StorageConfig(endpoint_url=s3_env.endpoint_url))
    client.create_bucket(Bucket="models-damaged")
    src = tmp_path / "src"
    src.mkdir()
    marker = b"<<a byte flipped on the way>>"
    (src / "config.json").write_text('{"model_type": "deepseek_vl"}')
    (src / "model.safetensors").write_bytes(os.urandom(5 * MIB) + marker + os.urandom(4 * MIB))
    upload_folder(client, src, "s3://models-damaged/vl", progress=False)
    settings = {"model.source": "s3", "model.id": "s3://models-damaged/vl", "model.cache_dir": tmp_path / "cache"}
    port = int(s3_env.endpoint_url.rsplit(":", 1)[1])

    def download(endpoint: str) -> int:
        overrides = {**settings, "storage.endpoint_url": endpoint, "run.output_dir": tmp_path / "out"}
        args = [f"--set={key}={value}" for key, value in overrides.items()]
        return main(["download", "--config", "pipeline.yaml", *args])

    with corrupting_proxy(port, marker) as url:
        model = ModelConfig(name="vl", source="s3", id=settings["model.id"], cache_dir=str(tmp_path / "cache"))
        with pytest.raises(TransferFailedError, match=r"model\.safetensors arrived corrupted") as raised:
            download_model(model, StorageConfig(endpoint_url=url), tmp_path / "out")
        assert is_transient(raised.value)
        assert download(url) == 1
    assert "s3://models-damaged/vl/model.safetensors arrived corrupted" in capsys.readouterr().err
    assert download(s3_env.endpoint_url) == 0
    folder = tmp_path / "cache" / "s3" / "models-damaged" / "vl"
    assert (folder / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def _fetch_in_two_processes(
    model: dict[str, Any], endpoint: str | None, release: Callable[[Any], Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What two processes fetching `model` at once report (`tests.snapshot_process`): the first starts fetching, the
    second once `start` is set: by the first's first S3 GetObject (which then takes SLOW_GET_S longer), or by
    `release(start)`, called here meanwhile. Fails with their tracebacks if either raised."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    slow_get = None if release else start
    processes = [
        ctx.Process(target=fetch_snapshot, args=("first", model, endpoint, slow_get, None, results)),
        ctx.Process(target=fetch_snapshot, args=("second", model, endpoint, None, start, results)),
    ]
    for process in processes:
        process.start()
    try:
        if release is not None:
            release(start)
        reports = {r["name"]: r for r in (results.get(timeout=120) for _ in processes)}
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    errors = [f"{name}:\n{r['error']}" for name, r in reports.items() if "error" in r]
    assert not errors, "\n".join(errors)
    return reports["first"], reports["second"]


@pytest.mark.integration
def test_two_processes_fetching_one_s3_model_download_it_once(tmp_path: Path, s3_env: Any) -> None:
    """A scheduled retrain and a batch job that start together fetch the same S3 model into one cache: the second
    waits for the first's sync (and says so), then uses the copy it verified; nothing is downloaded twice. Without a
    lock both copied every object through the same hidden `.NAME.part` files (one could rename the other's away
    before that one checked it), and either could delete the manifest the other had just written."""
    from vlmops.storage import MIB, s3_client, upload_folder

    storage = StorageConfig(endpoint_url=s3_env.endpoint_url)
    client = s3_client(storage)
    client.create_bucket(Bucket="models-shared")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "deepseek_vl"}')
    (src / "model.safetensors").write_bytes(os.urandom(11 * MIB))  # two 8 MiB parts, fetched in two ranges
    upload_folder(client, src, "s3://models-shared/vl", progress=False)
    model = {"name": "vl", "source": "s3", "id": "s3://models-shared/vl", "cache_dir": str(tmp_path / "cache")}

    first, second = _fetch_in_two_processes(model, s3_env.endpoint_url)
    assert sorted(set(first["gets"])) == ["vl/config.json", "vl/model.safetensors"]
    assert second["gets"] == []  # it used the first one's copy
    assert any("waiting for another process" in line for line in second["log"])
    folder = Path(first["folder"])
    assert (second["folder"], second["digest"]) == (first["folder"], first["digest"])
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == {
        "config.json": (src / "config.json").read_bytes(),
        "model.safetensors": (src / "model.safetensors").read_bytes(),
    }  # and no partial files


def test_two_processes_fetching_one_hub_model_download_it_once(
    native_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a hub model: the second process waits for the first's download, then uses its snapshot and
    manifest without asking the hub anything (it listed the repository and checked every file again, and a
    `refresh` in either could delete the snapshot the other was reading)."""
    hub = FakeHub(repos={("deepseek-community/deepseek-vl-7b-chat", "main"): native_repo})
    hub.hold["model.safetensors"] = SLOW_GET_S
    model = {"name": "deepseek-vl-7b-chat", "source": "huggingface", "cache_dir": str(tmp_path / "cache")}
    asked: list[int] = []

    def release_when_downloading(start: Any) -> None:
        hub.held.wait(60)  # a first process that failed before says why in its report
        asked.append(len(hub.requests))  # the first's listing is done: its files are being fetched
        start.set()

    with serve(hub):
        use_hf_hub(monkeypatch, hub.url)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)  # huggingface_hub reads it as HF_HUB_OFFLINE
        first, second = _fetch_in_two_processes(model, None, release_when_downloading)
    # After the first's listing, only its file requests: the second did not list the repository (nor fetch a file)
    assert [r for r in hub.requests[asked[0] :] if "/resolve/" not in r.path] == []
    assert all(len(hub.downloads(p.name)) == 1 for p in native_repo.iterdir() if p.name != "README.md")
    assert any("waiting for another process" in line for line in second["log"])
    assert (second["folder"], second["digest"]) == (first["folder"], first["digest"])


def test_an_s3_model_id_with_a_dot_dot_part_is_refused(tmp_path: Path) -> None:
    """The copy goes to <cache_dir>/s3/<bucket>/<prefix>: 's3://b/x/../../../../escape' named a folder outside the
    cache, which the sync would have filled (and pruned)."""
    for model_id in ("s3://b/x/../../../../escape", "s3://b/x//y", "s3://b/./x"):
        config = ModelConfig(name="tiny-vl", source="s3", id=model_id, cache_dir=str(tmp_path / "cache"))
        with pytest.raises(UserInputError, match=r"empty, '\.' or '\.\.' part .*write it as s3://bucket/some/prefix"):
            download_model(config, StorageConfig(endpoint_url="http://127.0.0.1:9"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
