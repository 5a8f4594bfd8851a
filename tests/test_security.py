"""Security defaults: only safetensors weights load unless model.allow_pickle; no remote code; every weight load
in the code says so; credentials masked in URIs, free text and log records."""

from __future__ import annotations

import ast
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmops.app.access import AUTH_ENV
from vlmops.models.loading import PickleWeightsError, load_model, safe_weights
from vlmops.redact import MASK, RedactingFilter, redact_text, redact_uri

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("vlmops", "tasks", "flows") for p in (ROOT / d).rglob("*.py")]


class _Payload:
    """Unpickling this writes a file: what a hostile pytorch_model.bin could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.write_text, (self.marker, "code ran"))


def test_pickle_weights_are_refused_before_anything_is_unpickled(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({**state, "payload": _Payload(marker)}, folder / "pytorch_model.bin")

    with pytest.raises(PickleWeightsError, match=r"pickle weights only \(pytorch_model\.bin\).*model\.allow_pickle"):
        load_model(folder)
    assert not marker.exists()
    assert safe_weights(tiny_model) == {"use_safetensors": True}  # transformers itself refuses .bin too
    assert safe_weights(folder, allow_pickle=True) == {}


def test_allow_pickle_loads_plain_pickle_weights(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    loaded = load_model(folder, allow_pickle=True)
    key = next(iter(state))
    assert torch.equal(loaded.model.state_dict()[key], state[key])


def _calls(tree: ast.AST, attr: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
    ]


def test_every_weight_load_in_the_code_is_safe() -> None:
    """Model `from_pretrained` calls pass `**safe_weights(...)`; `torch.load` passes weights_only=True;
    `trust_remote_code` appears nowhere (a remote repository's code never runs)."""
    unsafe: list[str] = []
    for path in SOURCES:
        text = path.read_text()
        where = path.relative_to(ROOT)
        if "trust_remote_code" in text:
            unsafe.append(f"{where}: trust_remote_code")
        tree = ast.parse(text)
        for call in _calls(tree, "from_pretrained"):
            owner = ast.unparse(call.func.value)  # type: ignore[attr-defined]
            if any(name in owner for name in ("Processor", "Tokenizer", "Config", "PeftModel")):
                continue  # no weights (peft adapters are checked with safe_weights before the call)
            if not any(k.arg is None and "safe_weights" in ast.unparse(k.value) for k in call.keywords):
                unsafe.append(f"{where}:{call.lineno}: {owner}.from_pretrained without **safe_weights(...)")
        for call in _calls(tree, "load"):
            if ast.unparse(call.func) == "torch.load" and not any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in call.keywords
            ):
                unsafe.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
    assert not unsafe, "\n".join(unsafe)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://alice:s3cret@mlflow:5000/api", f"http://alice:{MASK}@mlflow:5000/api"),
        ("postgresql+asyncpg://prefect:pw-123@db/prefect", f"postgresql+asyncpg://prefect:{MASK}@db/prefect"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("http://host/path?token=abc&x=1", f"http://host/path?token={MASK}&x=1"),
        ("sqlite:////tmp/a:b@c/mlflow.db", "sqlite:////tmp/a:b@c/mlflow.db"),  # a path, not userinfo
    ],
)
def test_redact_uri(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected


def test_redact_text_masks_environment_secrets_and_log_records(caplog: pytest.LogCaptureFixture) -> None:
    env = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG", "HF_TOKEN": "hf_abcdefgh", "PGPASSWORD": "x"}
    text = "key wJalrXUtnFEMI/K7MDENG token hf_abcdefgh at http://u:pw@h:1 pass x"
    assert redact_text(text, env) == f"key {MASK} token {MASK} at http://u:{MASK}@h:1 pass x"  # "x": too short

    logger = logging.getLogger("vlmops.test_redact")
    handler = caplog.handler
    handler.addFilter(RedactingFilter())
    try:
        with caplog.at_level(logging.INFO, logger="vlmops.test_redact"):
            logger.info("tracking at %s", "http://bob:hunter22@mlflow:5000")
    finally:
        handler.removeFilter(handler.filters[-1])
    assert "hunter22" not in caplog.text and f"http://bob:{MASK}@mlflow:5000" in caplog.text


def test_a_logged_traceback_is_masked(caplog: pytest.LogCaptureFixture) -> None:
    """An exception logged with its traceback (Prefect's 'Encountered exception during execution'): the errors of its
    chain name the URL they were given, login included."""
    logger = logging.getLogger("vlmops.test_redact")
    caplog.handler.addFilter(RedactingFilter())
    try:
        with caplog.at_level(logging.INFO, logger="vlmops.test_redact"):
            try:
                try:
                    raise ConnectionError("API request to http://bob:hunter22@mlflow:5000/api failed")
                except ConnectionError as err:
                    raise ValueError("the registry did not answer") from err
            except ValueError:
                logger.exception("step failed")
    finally:
        caplog.handler.removeFilter(caplog.handler.filters[-1])
    assert "hunter22" not in caplog.text
    assert f"ConnectionError: API request to http://bob:{MASK}@mlflow:5000/api failed" in caplog.text
    assert "ValueError: the registry did not answer" in caplog.text


# The settings in .env.example that are no credentials (places, names, ports, sizes); every other name there is one.
PLAIN_SETTINGS = frozenset(
    {
        "VLMOPS_STACK_DIR",
        "VLMOPS_PG_OS_USER",
        "POSTGRES_USER",
        "POSTGRES_PORT",
        "AWS_DEFAULT_REGION",
        "S3_PORT",
        "VLMOPS_BUCKET",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_PORT",
        "PREFECT_PORT",
        "GPU_SLOTS",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY",
        "VLMOPS_CRASHED_AFTER_S",
    }
)
# A word of an environment variable's name that says it holds a credential.
CREDENTIAL_WORDS = frozenset({"PASSWORD", "PGPASSWORD", "PASSWD", "PASS", "SECRET", "TOKEN", "AUTH", "KEY"})
# Names in the code with such a word that hold no credential, and what they hold instead.
NOT_CREDENTIALS = {"MLFLOW_AUTH_CONFIG_PATH": "the path of MLflow's basic-auth config file"}
UNMASKED = "add it to SECRET_ENV_NAMES in vlmops/redact.py"


def _masked(name: str) -> bool:
    """Whether a value of the variable `name` is masked in free text."""
    value = f"{name.lower()}-value-1234"
    return redact_text(f"{name}={value};", {name: value}) == f"{name}={MASK};"


def test_every_credential_in_env_example_is_redacted() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    names = [line.partition("=")[0].strip() for line in lines if "=" in line and not line.lstrip().startswith("#")]
    assert set(names) >= PLAIN_SETTINGS, "PLAIN_SETTINGS names a variable that .env.example no longer has"
    assert not [name for name in PLAIN_SETTINGS if CREDENTIAL_WORDS & set(name.split("_"))]
    credentials = [name for name in names if name not in PLAIN_SETTINGS]
    # the file is read right: the stack's required secrets are among them
    assert {"POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"} <= set(
        credentials
    )
    unmasked = [name for name in credentials if not _masked(name)]
    assert not unmasked, f"credentials in .env.example not redacted: {unmasked}; {UNMASKED} (or, if one is no "
    "credential, to PLAIN_SETTINGS here)"


def test_every_credential_variable_the_code_names_is_redacted() -> None:
    """Every string in vlmops/, tasks/, flows/ and infra/ that names an environment variable with a
    credential word (what the code reads, or sets for the servers it starts) is masked."""
    strings = {
        node.value
        for path in SOURCES + list((ROOT / "infra").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    names = {
        text
        for text in strings
        if re.fullmatch(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*", text) and CREDENTIAL_WORDS & set(text.split("_"))
    } - set(NOT_CREDENTIALS)
    # the scan finds what it must: the chat page's login, the servers' own credentials
    assert {AUTH_ENV, "PREFECT_SERVER_API_AUTH_STRING", "MLFLOW_AUTH_ADMIN_PASSWORD", "AWS_SECRET_ACCESS_KEY"} <= names
    unmasked = sorted(name for name in names if not _masked(name))
    assert not unmasked, f"credential variables not redacted: {unmasked}; {UNMASKED}"
