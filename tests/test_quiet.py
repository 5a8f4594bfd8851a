"""Quiet by default: ordinary commands on the tiny model print no third-party warnings or banners (DeepSpeed's
"Setting accelerator to CPU", deprecations, the Trainer's per-step dicts); `--verbose` (or VLMOPS_VERBOSE=1) lets
them through, but not the HTTP clients' line per request, which `-vv` (VLMOPS_VERBOSE=2) adds."""

from __future__ import annotations

import importlib.util
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
        **{k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "VLMOPS_VERBOSE", *unset)},
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
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


@pytest.mark.parametrize("verbosity", [0, 1, 2])
def test_verbose_lets_the_filtered_warnings_through(verbosity: int) -> None:
    """The filters in vlmops.quiet, in a fresh interpreter: hidden by default, shown with --verbose (and -vv)."""
    script = f"""
import logging, sys, warnings
from vlmops import quiet
quiet.configure({verbosity})
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
    assert ("Setting accelerator to CPU" in done.stderr) is (verbosity > 0)
    assert ("is_gradient_checkpointing" in done.stderr) is (verbosity > 0)


@pytest.mark.parametrize("verbosity", ["0", "1", "2"])
def test_a_child_process_is_as_verbose_as_the_command_that_started_it(verbosity: str) -> None:
    """A child's entry point (training, merge, an inference worker) reads VLMOPS_VERBOSE as `vlmops` set it: its own
    debug lines and the libraries' banners from 1, an HTTP client's line per request (httpx, Prefect's client, here
    asking a real local server) only from 2. A training rank other than 0 stays at its warnings."""
    script = """
import logging, sys, httpx
from vlmops import quiet
quiet.child_logging(logging.WARNING if sys.argv[2] == "rank1" else logging.INFO)
logging.getLogger("vlmops.train.sft").debug("a debug line of vlmops")
logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU.")
httpx.get(sys.argv[1] + "/ok.png").raise_for_status()
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLMOPS_VERBOSE": verbosity}
    level = int(verbosity)
    for rank in ("rank0", "rank1"):
        with serving_images() as server:
            command = [sys.executable, "-c", script, server.url, rank]
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        shows = level if rank == "rank0" else 0
        assert ("DEBUG vlmops.train.sft: a debug line of vlmops" in done.stderr) is (shows >= 1), done.stderr
        assert ("Setting accelerator to CPU" in done.stderr) is (shows >= 1), done.stderr
        assert ("INFO httpx: HTTP Request: GET http://127.0.0.1:" in done.stderr) is (shows == 2), done.stderr


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


# How a level is asked for: on the command line, or in the environment (read by `vlmops` itself, not only by the
# processes it starts).
ASKED = {
    "quiet": ([], {}, 0),
    "--verbose": (["--verbose"], {}, 1),
    "VLMOPS_VERBOSE=1": ([], {"VLMOPS_VERBOSE": "1"}, 1),
    "-vv": (["-vv"], {}, 2),
    "VLMOPS_VERBOSE=2": ([], {"VLMOPS_VERBOSE": "2"}, 2),
    "-v with VLMOPS_VERBOSE=2": (["-v"], {"VLMOPS_VERBOSE": "2"}, 2),
}


@pytest.mark.parametrize("asked", list(ASKED))
def test_s3_clients_info_lines_show_from_the_first_level_their_requests_from_the_second(
    tmp_path: Path, asked: str
) -> None:
    """botocore logs "Found credentials in environment variables." at INFO for every S3 client a command makes; vlmops
    logs at INFO too, so each S3 command printed it. It shows with --verbose, and vlmops's own INFO lines always.
    urllib3's line per request (botocore's HTTP client) shows only with -vv."""
    flags, verbose_env, level = ASKED[asked]
    dataset = tmp_path / "d.jsonl"
    turns = [{"from": "user", "value": "<img>s3://bucket/gone.png</img>What?"}, {"from": "assistant", "value": "A."}]
    dataset.write_text(json.dumps({"conversations": turns}) + "\n")
    credentials = {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_DEFAULT_REGION": "us-east-1"}
    with serving_images() as server:  # an S3 GET of the image is a 404 there: a rejected record
        done = _vlmops(
            *flags,
            "validate",
            str(dataset),
            *("--set", f"run.output_dir={tmp_path / 'outputs'}", "--set", f"model.cache_dir={tmp_path / 'cache'}"),
            *("--set", f"storage.endpoint_url={server.url}", "--set", "data.invalid_records=skip"),
            cwd=tmp_path,
            env={**credentials, **verbose_env},
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rejected: 1 record" in done.stdout  # the image was asked of S3
    assert re.search(r" INFO vlmops\.models\.tiny: built tiny deepseek_vl model", done.stderr)
    found_credentials = "INFO botocore.credentials: Found credentials in environment variables."
    assert (found_credentials in done.stderr) is (level >= 1)
    assert ("DEBUG urllib3.connectionpool: http://127.0.0.1:" in done.stderr) is (level == 2)
    assert ("DEBUG botocore." in done.stderr) is (level == 2)


def test_vlmops_verbose_in_the_environment_shows_tracebacks(tmp_path: Path) -> None:
    """VLMOPS_VERBOSE=1 is --verbose for the command it is set for: an error comes with its traceback."""
    command = ("validate", str(tmp_path / "missing.jsonl"), "--set", f"run.output_dir={tmp_path / 'outputs'}")
    quiet = _vlmops(*command, cwd=tmp_path)
    verbose = _vlmops(*command, cwd=tmp_path, env={"VLMOPS_VERBOSE": "1"})
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr, quiet.stderr[-3000:]
    assert "missing.jsonl does not exist" in quiet.stderr
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr, verbose.stderr[-3000:]
    assert "FileNotFoundError" in verbose.stderr and "missing.jsonl does not exist" in verbose.stderr


def test_a_vlmops_verbose_that_is_no_level_is_refused(tmp_path: Path) -> None:
    done = _vlmops("models", cwd=tmp_path, env={"VLMOPS_VERBOSE": "loud"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == (
        "error: VLMOPS_VERBOSE='loud' in the environment is not a verbosity: set it to 0 (quiet), 1 (as --verbose) "
        "or 2 (as -vv), or unset it"
    )


SOON = "VLMOPS_RETRY_DELAY_S='soon': must be a number of seconds, 0 or more (unset: the defaults)"


def test_a_retry_delay_that_is_no_number_is_refused_by_every_command(tmp_path: Path) -> None:
    """VLMOPS_RETRY_DELAY_S=soon: every command refuses it before it starts (exit 2), not only those whose import of the
    tasks raised it (with a traceback); a command that imported none ran on."""
    done = _vlmops("models", cwd=tmp_path, env={"VLMOPS_RETRY_DELAY_S": "soon"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == f"error: {SOON}"


def test_a_task_worker_refuses_a_retry_delay_that_is_no_number() -> None:
    """A task worker with VLMOPS_RETRY_DELAY_S=soon stops before it serves with the one message, not the traceback of
    the tasks' import (where the waits are read)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"VLMOPS_RETRY_DELAY_S": "soon"}
    command = [sys.executable, "-m", "flows.batch_inference", "serve"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip() == f"error: {SOON}"


def test_a_task_worker_refuses_a_vlmops_verbose_that_is_no_level() -> None:
    """A task worker (`python -m flows.batch_inference serve`) with VLMOPS_VERBOSE=loud stops before it serves, with the
    error `vlmops` gives, not the traceback of the flows package's import."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"VLMOPS_VERBOSE": "loud"}
    command = [sys.executable, "-m", "flows.batch_inference", "serve"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip() == (
        "error: VLMOPS_VERBOSE='loud' in the environment is not a verbosity: set it to 0 (quiet), 1 (as --verbose) "
        "or 2 (as -vv), or unset it"
    )


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


# What a worker's flow run loads: each deployment's entrypoint, by its path.
ENTRYPOINTS = sorted({d["entrypoint"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]})
# VLMOPS_VERBOSE on the worker -> the levels of the root logger (Prefect's WARNING up to -vv), botocore, vlmops, httpx.
FLOW_RUN_LEVELS = {
    "0": "WARNING WARNING INFO WARNING",
    "1": "WARNING INFO DEBUG WARNING",
    "2": "DEBUG NOTSET NOTSET NOTSET",
}


# Each entrypoint once (a process each, 6-15 s), each level once (-vv's debug lines where the imports are fewest).
@pytest.mark.parametrize(("entrypoint", "verbosity"), list(zip(ENTRYPOINTS, ["2", "0", "1"], strict=True)))
def test_a_flow_runs_process_is_set_up_as_vlmops_sets_itself_up(entrypoint: str, verbosity: str) -> None:
    """A worker's flow run loads its deployment's entrypoint as Prefect does (by the file's path, from the folder the
    pull step went to), not `vlmops`'s command line, where the defaults were set: no MLflow telemetry, the quiet levels
    or those VLMOPS_VERBOSE asks for. flows/batch_inference.py imported nothing of the flows package, so a flow run of
    it had none of them. vlmops's own INFO lines show through Prefect's console at its root level, WARNING, as under
    `vlmops run` (before, they showed only with VLMOPS_VERBOSE); outside a flow run they are not sent to the server, so
    Prefect's API handler on them does not warn of a line without a flow run."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "CI")}
    env = {k: v for k, v in env.items() if k not in ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "PYTHONPATH")}
    env["VLMOPS_VERBOSE"] = verbosity
    check = (
        "import logging, sys; from prefect.flows import load_flow_from_entrypoint; "
        "load_flow_from_entrypoint(sys.argv[1]); import mlflow.telemetry.utils as u; "
        "logging.getLogger('vlmops.models.manifest').info('wrote manifest m.json (7 files)'); "
        "print(u.is_telemetry_disabled(), *(logging.getLevelName(logging.getLogger(n).level) for n in sys.argv[2:]))"
    )
    command = [sys.executable, "-c", check, entrypoint, "root", "botocore", "vlmops", "httpx"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"True {FLOW_RUN_LEVELS[verbosity]}"
    assert done.stderr.count("| INFO    | vlmops.models.manifest - wrote manifest m.json (7 files)") == 1, done.stderr
    assert "attempted to send logs to the API" not in done.stderr, done.stderr[-3000:]


def test_a_team_s_logging_settings_stay_in_a_flow_run(tmp_path: Path) -> None:
    """A team's own logging config (PREFECT_LOGGING_SETTINGS_PATH) that gives the `vlmops` logger a level keeps it, and
    a team's PREFECT_LOGGING_EXTRA_LOGGERS is the list of loggers sent to the server: Prefect's API handler on the ones
    it names, none of vlmops's own on the `vlmops` logger (its lines would reach the server twice where the list names
    `vlmops.infer`)."""
    prefect = importlib.util.find_spec("prefect")
    assert prefect is not None and prefect.origin is not None
    config = yaml.safe_load((Path(prefect.origin).parent / "logging" / "logging.yml").read_text())  # Prefect's default
    config["loggers"]["vlmops"] = {"level": "WARNING"}
    settings = tmp_path / "logging.yml"
    settings.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("VLMOPS_VERBOSE", "PYTHONPATH")}
    env |= {"PREFECT_LOGGING_SETTINGS_PATH": str(settings), "PREFECT_LOGGING_EXTRA_LOGGERS": "vlmops.infer"}
    check = (
        "import logging, sys; from prefect.flows import load_flow_from_entrypoint; "
        "from prefect.logging.handlers import APILogHandler; load_flow_from_entrypoint(sys.argv[1]); "
        "logging.getLogger('vlmops.models.manifest').info('wrote manifest m.json (7 files)'); "
        "print(*(logging.getLevelName(logging.getLogger(n).level) for n in ('vlmops', 'flows')), "
        "*(sum(isinstance(h, APILogHandler) for h in logging.getLogger(n).handlers) for n in ('vlmops', 'vlmops.infer')))"
    )
    command = [sys.executable, "-c", check, ENTRYPOINTS[0]]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "WARNING INFO 0 1"
    assert "wrote manifest" not in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("flags", [[], ["-v"], ["-vv"]])
def test_the_flows_set_up_changes_nothing_under_the_command_line(flags: list[str]) -> None:
    """`vlmops run` and `vlmops promote` import the flows package after main() configured the process: its set-up then
    leaves every level, filter, handler and warning filter as the command (and Prefect's logging set-up) left them, but
    for the handler that sends vlmops's own lines in a flow run to the server. A line of vlmops shows once."""
    script = """
import logging, os, sys, warnings
from prefect.logging.handlers import APILogHandler
from vlmops import quiet
from vlmops.cli.main import main

def state():
    names = ["", *quiet.OWN_LOGGERS, *quiet.CHATTY_LOGGERS, *quiet.PER_REQUEST_LOGGERS, *quiet.NOISY_LOG_MESSAGES]
    loggers = [logging.getLogger(name) for name in names]
    return ([(lg.level, len(lg.filters), len([h for h in lg.handlers if not isinstance(h, APILogHandler)]))
             for lg in loggers], len(warnings.filters), os.environ.get(quiet.VERBOSE_ENV))

assert main([*sys.argv[1:], "models"]) == 0
from prefect.logging.configuration import ensure_logging_setup
ensure_logging_setup()  # Prefect's own loggers, handlers and filters: importing any flow module sets them up
before = state()
import flows
logging.getLogger("vlmops.models.manifest").info("wrote manifest m.json (7 files)")
api = [sum(isinstance(h, APILogHandler) for h in logging.getLogger(n).handlers) for n in quiet.OWN_LOGGERS]
print(before == state(), api, before, state())
"""
    env = {k: v for k, v in os.environ.items() if k not in ("VLMOPS_VERBOSE", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", script, *flags], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("True [1, 1, 1] "), done.stdout.strip().splitlines()[-1]
    assert done.stderr.count("INFO vlmops.models.manifest: wrote manifest m.json (7 files)") == 1, done.stderr[-3000:]
    assert "attempted to send logs to the API" not in done.stderr, done.stderr[-3000:]
