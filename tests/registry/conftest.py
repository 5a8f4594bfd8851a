"""A registry with real versions: two tiny readable models pushed to a local DVC remote, the dataset snapshot
they are evaluated on pushed too, and a config that names it all. The eval set's reference answers are model
A's own answers, so A scores 100% and B (another seed) does not: a real, deterministic gap for the gate."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.infer.conftest import make_readable
from vlmops.config import PipelineConfig, load_config
from vlmops.data.demo import draw_shape
from vlmops.data.prepare import snapshot_hash
from vlmops.models.tiny import build_tiny_model
from vlmops.registry.lineage import version_tags
from vlmops.tracking import RegisteredVersion, Tracker
from vlmops.versioning import DvcStore, DvcVersion, write_pointer

NAME = "vlmops-test"
QUESTION = "What colour is the shape?"
SHAPES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]


@dataclass
class Registry:
    """Everything a test needs: the config (file and parsed), the models, the pushed data and a way to register."""

    root: Path
    config_file: Path
    config: PipelineConfig
    model_a: Path
    model_b: Path
    snapshot_copy: Path
    """A copy of the dataset snapshot as it was pushed (the tracked folder itself is deleted)."""
    references: list[str]
    data_version: DvcVersion
    versions: dict[str, DvcVersion]
    remote: Path

    def register(self, model: str, name: str = NAME) -> RegisteredVersion:
        """A new version of `name` (alias challenger) pointing at model `a` or `b` in the DVC remote."""
        tracker = Tracker(self.config.tracking)
        pushed = self.versions[model]
        with tracker.run(f"register-{model}") as run_id:
            tags = version_tags(
                config=self.config,
                run={
                    "git_commit": "test",
                    "prefect_flow_run_id": "",
                    "prefect_deployment": "none",
                    "mlflow_run_id": run_id,
                },
                base_model={"id": "tiny", "revision": None, "source": "local", "manifest_hash": "test"},
                dataset_path=str(Path(self.data_version.path)),
                dataset_hash=snapshot_hash(self.snapshot_copy),
                data_version=self.data_version,
                model_version=pushed,
            )
            pointer = self.root / f"pointer-{run_id}"
            write_pointer(pushed, pointer)
            return tracker.register_model(run_id, pointer, name, "challenger", tags=tags)


def _answers(model: Path, prompts: Path, out: Path, config: PipelineConfig) -> list[str]:
    from vlmops.infer.batch_job import run_batch_job
    from vlmops.infer.job_output import iter_results
    from vlmops.infer.output import open_output

    run_batch_job(str(model), str(prompts), str(out), config, progress=False)
    return [r["response"] for r in sorted(iter_results(open_output(str(out))), key=lambda r: r["source"])]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("registry")
    outputs = root / "outputs"
    config_file = root / "pipeline.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "run": {"output_dir": str(outputs)},
                "model": {"cache_dir": str(root / "cache")},
                "infer": {"max_new_tokens": 3, "batch_size": 1, "workers": 1},
                "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "registry-test"},
                "registry": {"model_name": NAME},
                "versioning": {"remote_url": str(root / "remote")},
            }
        )
    )
    config = load_config(config_file)
    model_a = make_readable(build_tiny_model(root / "models" / "a", "deepseek_vl", seed=3))
    model_b = make_readable(build_tiny_model(root / "models" / "b", "deepseek_vl", seed=11))

    # The snapshot: eval.jsonl (images under images/), its answers being model A's.
    snapshot = outputs / "datasets" / "snapshot"
    (snapshot / "images").mkdir(parents=True)
    rng = random.Random(0)
    for colour, shape in SHAPES:
        draw_shape(colour, shape, 32, rng).save(snapshot / "images" / f"{colour}.png")
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps(
                {"conversations": [{"from": "user", "value": f"<img>{snapshot}/images/{c}.png</img>{QUESTION}"}]}
            )
            + "\n"
            for c, _ in SHAPES
        )
    )
    references = _answers(model_a, prompts, root / "reference-job", config)
    assert all(r.strip() for r in references), references
    (snapshot / "eval.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "conversations": [
                        {"from": "user", "value": f"<img>images/{c}.png</img>{QUESTION}"},
                        {"from": "assistant", "value": answer},
                    ]
                }
            )
            + "\n"
            for (c, _), answer in zip(SHAPES, references)
        )
    )
    snapshot_copy = root / "snapshot-copy"
    shutil.copytree(snapshot, snapshot_copy)

    store = DvcStore(outputs, "local", str(root / "remote"))
    data_version = store.track(snapshot)
    versions = {}
    for label, model in (("a", model_a), ("b", model_b)):
        shutil.copytree(model, outputs / "models" / label)
        versions[label] = store.track(outputs / "models" / label)
    # Only the remote has the snapshot now: promotion must restore it from there.
    shutil.rmtree(snapshot)
    return Registry(
        root, config_file, config, model_a, model_b, snapshot_copy, references, data_version, versions, root / "remote"
    )
