"""dvc.yaml: every stage's command parses and its `deps` cover the code it runs; and `dvc repro` in a fresh
copy of the repository runs demo_data -> sft -> merge -> eval, learns, and reruns only what a change touches.

The e2e run shrinks the demo in the copy's pipeline.yaml (240 train records, 6 epochs: under a minute of
training on two idle CPU cores, and enough to learn the colours) and runs the real `vlmops` and `dvc`
commands from this environment, with the copy's own code first on PYTHONPATH.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlmops.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("demo_data", "sft", "merge", "eval")
SHRUNK = {
    "data.demo.num_train": 240,
    "data.demo.num_eval": 24,
    "data.demo.image_size": 32,
    "train.epochs": 6,
}
MAX_NEW_TOKENS = 2  # infer.max_new_tokens: a setting in eval's params only


def dvc_stages() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def interpolate(cmd: str, params: dict[str, Any]) -> str:
    """The stage command with `${a.b}` replaced by pipeline.yaml's values, as `vars:` does."""
    return re.sub(r"\$\{([^}]+)\}", lambda m: str(lookup(params, m.group(1))), cmd)


def module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return path / "__init__.py" if (path / "__init__.py").is_file() else None


def vlmops_imports(source: str) -> set[str]:
    """Every `vlmops...` name imported anywhere in `source`, function-level (lazy) imports included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "vlmops"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vlmops":
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def code_files(names: set[str]) -> set[str]:
    """The repository files of `names` and of everything they import, their packages' __init__ included."""
    seen: set[Path] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        file = module_file(name)
        if file is None or file in seen:
            continue
        seen.add(file)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += vlmops_imports(file.read_text())
    return {f.relative_to(ROOT).as_posix() for f in seen if f.read_text().strip()}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_command_parses_and_deps_cover_its_code(stage: str) -> None:
    spec = dvc_stages()[stage]
    params = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    for group in spec["params"]:
        for key in group["pipeline.yaml"]:
            lookup(params, key)  # KeyError: a stage names a setting pipeline.yaml does not have
    argv = shlex.split(interpolate(spec["cmd"], params))
    assert argv[0] == "vlmops"
    args = build_parser().parse_args(argv[1:])  # SystemExit: a flag the command does not take

    imported = code_files(vlmops_imports(inspect.getsource(args.handler)))
    deps = [d.rstrip("/") for d in spec["deps"]]
    uncovered = sorted(f for f in imported if not any(f == d or f.startswith(d + "/") for d in deps))
    assert not uncovered, f"stage {stage} runs code its deps in dvc.yaml leave out: add {uncovered}"


@dataclass
class Repro:
    repo: Path
    first: str
    second: str
    status_after_first: dict[str, Any]
    status_after_edit: dict[str, Any]
    third: str
    locks: list[dict[str, Any]]
    """dvc.lock after each of the three repros."""
    sft_result_mtimes: list[int]


def _copy_repository(dst: Path) -> None:
    """dvc.yaml, pipeline.yaml, .gitignore and the code the stages depend on."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dvc.yaml", "pipeline.yaml", ".gitignore", "vlmops"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dst / name, ignore=ignore)
        else:
            shutil.copy2(source, dst / name)


def _edit(config_file: Path, settings: dict[str, Any]) -> None:
    """Set dotted keys in a config file (its comments are not kept)."""
    config = yaml.safe_load(config_file.read_text())
    for dotted, value in settings.items():
        *parents, leaf = dotted.split(".")
        section = config
        for key in parents:
            section = section[key]
        section[leaf] = value
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory) -> Repro:
    bin_dir = Path(sys.executable).parent
    for tool in ("vlmops", "dvc"):
        if not (bin_dir / tool).is_file():
            pytest.fail(f"{tool} is not installed beside {sys.executable}: pip install -e '.[dev]' in this environment")
    repo = tmp_path_factory.mktemp("dvc-repo")
    _copy_repository(repo)
    _edit(repo / "pipeline.yaml", SHRUNK)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
        "PYTHONPATH": str(repo),  # the stages run the copy's code, the code their deps hash
        "DVC_NO_ANALYTICS": "1",
    }

    def run(*command: str) -> str:
        done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
        return done.stdout + done.stderr

    def status() -> dict[str, Any]:
        return json.loads(run("dvc", "status", "--json").strip() or "{}")

    def lock() -> dict[str, Any]:
        return yaml.safe_load((repo / "dvc.lock").read_text())

    def sft_mtime() -> int:
        return (repo / "stages" / "sft" / "result.json").stat().st_mtime_ns

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    first = run("dvc", "repro")
    status_after_first, locks, mtimes = status(), [lock()], [sft_mtime()]
    second = run("dvc", "repro")
    locks.append(lock())
    mtimes.append(sft_mtime())
    _edit(repo / "pipeline.yaml", {"infer.max_new_tokens": MAX_NEW_TOKENS})
    status_after_edit = status()
    third = run("dvc", "repro")
    locks.append(lock())
    mtimes.append(sft_mtime())
    return Repro(repo, first, second, status_after_first, status_after_edit, third, locks, mtimes)


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_every_stage_runs_and_the_fine_tuned_model_learned(repro: Repro) -> None:
    for stage in STAGES:
        assert f"Running stage '{stage}'" in repro.first
    assert set(repro.locks[0]["stages"]) == set(STAGES)
    assert repro.status_after_first == {}  # `dvc status`: data and pipelines are up to date

    metrics = json.loads((repro.repo / "stages" / "eval" / "metrics.json").read_text())
    tuned, base = metrics["finetuned"], metrics["base"]
    assert tuned["total"] == base["total"] == SHRUNK["data.demo.num_eval"]
    assert tuned["accuracy"] >= 0.75  # 1.0 on this machine; a random tiny model cannot name the colours
    assert base["accuracy"] <= 0.25
    assert metrics["comparison"]["gain"] == pytest.approx(tuned["accuracy"] - base["accuracy"])
    # eval found the split training held out, through the merged folder's run.json
    assert Path(metrics["eval_file"]).parent.parent == repro.repo / "stages" / "datasets"


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_outputs_live_under_stages_and_git_ignores_them(repro: Repro) -> None:
    stages = repro.repo / "stages"
    info = json.loads((stages / "sft" / "run.json").read_text())
    assert info["base_model"] == str(stages / "models" / "tiny-deepseek-vl")  # built by the sft stage
    assert json.loads((stages / "merged" / "run.json").read_text())["merged_from"] == str(stages / "sft" / "final")

    listed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "stages"],
        cwd=repro.repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    # Only what belongs in git: DVC's .gitignore entries and the metrics (cache: false)
    assert sorted(line.removeprefix("?? ") for line in listed) == [
        "stages/.gitignore",
        "stages/eval/.gitignore",
        "stages/eval/metrics.json",
    ]


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_a_second_repro_runs_nothing(repro: Repro) -> None:
    assert "Running stage" not in repro.second
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in repro.second
    assert repro.locks[1] == repro.locks[0]
    assert repro.sft_result_mtimes[1] == repro.sft_result_mtimes[0]


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_an_eval_setting_reruns_only_eval(repro: Repro) -> None:
    assert set(repro.status_after_edit) == {"eval"}
    assert "Running stage 'eval'" in repro.third
    for stage in ("demo_data", "sft", "merge"):
        assert f"Stage '{stage}' didn't change, skipping" in repro.third
        assert repro.locks[2]["stages"][stage] == repro.locks[0]["stages"][stage]
    assert repro.locks[2]["stages"]["eval"]["params"]["pipeline.yaml"]["infer"]["max_new_tokens"] == MAX_NEW_TOKENS
    assert repro.sft_result_mtimes[2] == repro.sft_result_mtimes[0]
    predictions = (repro.repo / "stages" / "eval" / "predictions.jsonl").read_text().splitlines()
    assert predictions and all(json.loads(line)["generated_tokens"] <= MAX_NEW_TOKENS for line in predictions)
