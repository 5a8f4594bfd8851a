"""Quiet by default: known third-party warnings and banners are hidden unless `vlmops --verbose` asks for them.

Each entry below is a message a library prints on every ordinary run that tells the user nothing they can act
on. Only these exact messages are filtered; any other warning still shows. The libraries that report routine work
at INFO (S3's botocore and boto3, HTTP clients) log from WARNING up. `--verbose` (or VLMOPS_VERBOSE=1 in
the environment, which the training child inherits) shows them all.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "VLMOPS_VERBOSE"

# (category, message regex, module regex) for `warnings.filterwarnings`.
NOISY_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # peft asks `model.is_gradient_checkpointing`, which transformers 5 renamed.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\..*"),
    # Prefect/pydantic and MLflow deprecations in their own code paths, not in ours.
    (DeprecationWarning, r".*", r"(prefect|mlflow|dvc|pydantic|google|pkg_resources)(\..*)?"),
    (FutureWarning, r".*", r"(mlflow|dvc)(\..*)?"),
)

# logger name -> message fragments to drop. DeepSpeed's logger has its own handler and does not propagate,
# so a level set before its import would be reset: a filter on the logger object survives its set-up.
NOISY_LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    # accelerate imports DeepSpeed whenever it is installed (to unwrap a model), and DeepSpeed then announces
    # the accelerator it picked; on a CPU machine that is a warning about the machine, not about the run.
    "DeepSpeed": ("Setting accelerator to CPU",),
    # The ephemeral Prefect API's start/stop lines, with a link to the server docs on every `vlmops run`.
    "prefect": ("Starting temporary server on", "Stopping temporary server on"),
    # GPU steps hold a slot of the team stack's `gpu` limit (tasks/gpu.py); the embedded default has none, and
    # Prefect says so at every such step.
    "prefect.task_runs": ("Concurrency limits ['gpu'] do not exist",),
    # DVC prints this itself and logs it again; vlmops.versioning says where it initialised the repository.
    "dvc.repo.init": ("Initialized DVC repository",),
}
# Dropped only on the embedded default: on a team server (PREFECT_API_URL set) a missing `gpu` limit is a
# set-up mistake worth seeing.
EMBEDDED_ONLY_NOISE = {"prefect.task_runs"}

# Loggers that report routine work at INFO, which a vlmops command logs at: botocore's "Found credentials in
# environment variables." for every S3 client a command makes, boto3's resources each call, Prefect's HTTP client
# (httpx) every API request. At WARNING their warnings and errors still show; --verbose shows all they log.
CHATTY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "httpx")


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def child_logging(level: int = logging.INFO, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """Logging for a child process's entry point (training, merge, inference workers): as quiet as the `vlmops`
    command that started it (VLMOPS_VERBOSE), with credentials masked (`vlmops.redact`)."""
    from vlmops.redact import redact_log_handlers

    configure(is_verbose())
    logging.basicConfig(level=level, format=fmt)
    redact_log_handlers()


def no_usage_reports() -> None:
    """No usage reports from the libraries vlmops drives, unless the environment already says otherwise: DVC's
    analytics, MLflow's telemetry (which also writes ~/.config/mlflow/telemetry.json in every process that imports
    MLflow). For `vlmops` (vlmops.cli.main) and a flow run's process (flows/__init__), which does not start there."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def configure(verbose: bool) -> None:
    """Hide the known noise unless `verbose`; record the choice in the environment for child processes."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ.pop(VERBOSE_ENV, None)
    for category, message, module in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    on_server = bool(os.environ.get("PREFECT_API_URL"))
    for name, fragments in NOISY_LOG_MESSAGES.items():
        if on_server and name in EMBEDDED_ONLY_NOISE:
            continue
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
