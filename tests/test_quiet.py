"""Quiet by default: ordinary commands on the tiny model print no third-party warnings or banners (DeepSpeed's
"Setting accelerator to CPU", deprecations, the Trainer's per-step dicts); `--verbose` lets them through."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.image_server import serving_images

ROOT = Path(__file__).resolve().parents[1]
# What third-party noise looks like: Python warnings, logged warnings, DeepSpeed's banner, Prefect's links.
NOISE = re.compile(r"Warning\b|\bWARNING\b|[Dd]eprecat|Setting accelerator|See https?://|\{'loss'|\{'eval_loss'")


def _vlmops(
    *args: str, cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("PYTHONWARNINGS", "VLMOPS_VERBOSE", *unset):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "vlmops.cli", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
    )


# vlmops's own warnings say something to the user (two runs at once registering: which version the alias names).
OWN = re.compile(r"\bWARNING vlmops\.")


def _noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if NOISE.search(line) and not OWN.search(line)]


def test_ordinary_commands_print_no_third_party_warnings(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"output_dir": str(tmp_path / "outputs"), "name": "q"},
                "model": {"name": "tiny-deepseek-vl", "cache_dir": str(tmp_path / "cache")},
                "data": {"demo": {"num_train": 16, "num_eval": 4, "image_size": 32}},
                "train": {"max_steps": 2, "gradient_checkpointing": False, "logging_steps": 1},
            }
        )
    )
    run_dir = tmp_path / "run"
    commands = {
        "help": (["--help"], None),
        "validate": (["validate", "--config", str(config)], None),
        "sft": (["sft", "--config", str(config), "--run-dir", str(run_dir)], None),
        "infer": (["infer", "--ckpt", str(run_dir)], "<img>nothing.png</img>What colour?\nWhat colour?\nquit\n"),
    }
    for name, (args, stdin) in commands.items():
        done = _vlmops(*args, cwd=tmp_path, stdin=stdin)
        assert done.returncode == 0, f"vlmops {name}:\n{done.stderr[-3000:]}"
        assert not _noise(done.stderr), f"vlmops {name} printed:\n" + "\n".join(_noise(done.stderr))
    train_log = (run_dir / "train.log").read_text()
    assert "loss=" in train_log and "{'loss'" not in train_log  # numbers on the progress bar, no dict per step


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_lets_the_filtered_warnings_through(verbose: bool) -> None:
    """The filters in vlmops.quiet, in a fresh interpreter: hidden by default, shown with --verbose."""
    script = f"""
import logging, sys, warnings
from vlmops import quiet
quiet.configure({verbose})
logging.basicConfig(stream=sys.stderr)
logger = logging.getLogger("DeepSpeed")
logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
logger.warning("another DeepSpeed warning")
warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "m.py", 1, module="transformers.x")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "another DeepSpeed warning" in done.stderr  # only the known messages are filtered
    assert ("Setting accelerator to CPU" in done.stderr) is verbose
    assert ("is_gradient_checkpointing" in done.stderr) is verbose


@pytest.mark.parametrize("server", ["", "http://127.0.0.1:4200/api"])
def test_a_missing_gpu_limit_is_hidden_only_on_the_embedded_default(server: str) -> None:
    script = """
import logging, sys
from vlmops import quiet
quiet.configure(False)
logging.basicConfig(stream=sys.stderr)
logging.getLogger("prefect.task_runs").warning("Concurrency limits ['gpu'] do not exist - skipping acquisition.")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": server}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("Concurrency limits ['gpu'] do not exist" in done.stderr) is bool(server)


@pytest.mark.parametrize("verbose", [False, True])
def test_s3_clients_info_lines_show_only_with_verbose(tmp_path: Path, verbose: bool) -> None:
    """botocore logs "Found credentials in environment variables." at INFO for every S3 client a command makes; vlmops
    logs at INFO too, so each S3 command printed it. It shows with --verbose, and vlmops's own INFO lines always."""
    dataset = tmp_path / "d.jsonl"
    turns = [{"from": "user", "value": "<img>s3://bucket/gone.png</img>What?"}, {"from": "assistant", "value": "A."}]
    dataset.write_text(json.dumps({"conversations": turns}) + "\n")
    credentials = {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_DEFAULT_REGION": "us-east-1"}
    with serving_images() as server:  # an S3 GET of the image is a 404 there: a rejected record
        done = _vlmops(
            *(["--verbose"] if verbose else []),
            "validate",
            str(dataset),
            *("--set", f"run.output_dir={tmp_path / 'outputs'}", "--set", f"model.cache_dir={tmp_path / 'cache'}"),
            *("--set", f"storage.endpoint_url={server.url}", "--set", "data.invalid_records=skip"),
            cwd=tmp_path,
            env=credentials,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rejected: 1 record" in done.stdout  # the image was asked of S3
    assert re.search(r" INFO vlmops\.models\.tiny: built tiny deepseek_vl model", done.stderr)
    assert ("INFO botocore.credentials: Found credentials in environment variables." in done.stderr) is verbose


def test_a_command_leaves_nothing_in_the_home_folder(tmp_path: Path) -> None:
    """MLflow's telemetry wrote ~/.config/mlflow/telemetry.json from any command that imports MLflow (`validate` does),
    outside the CI and test environments it recognises, which are taken out of this run's environment."""
    home = tmp_path / "home"
    dataset = tmp_path / "d.jsonl"
    turns = [{"from": "user", "value": "Hi?"}, {"from": "assistant", "value": "A."}]
    dataset.write_text(json.dumps({"conversations": turns}) + "\n")
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache")}
    unset = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "CI", "PYTEST_CURRENT_TEST", "GITHUB_ACTIONS")
    done = _vlmops("validate", str(dataset), "--set", f"run.output_dir={tmp_path / 'outputs'}", cwd=tmp_path, env=env,
                   unset=unset)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert not home.exists() or sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []


def test_a_flow_runs_process_sends_no_mlflow_telemetry() -> None:
    """A worker's flow run imports the flows package, not `vlmops`'s command line, which is where the default was set."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "CI")}
    env = {k: v for k, v in env.items() if k not in ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS")}
    env["PYTHONPATH"] = str(ROOT)
    check = "import flows.retrain, mlflow.telemetry.utils as u; print(u.is_telemetry_disabled())"
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "True"
