"""Quiet by default: known third-party warnings and banners are hidden unless `vlmops --verbose` asks for them.

Each entry below is a message a library prints on every ordinary run that tells the user nothing they can act
on. Only these exact messages are filtered; any other warning still shows. The libraries that report routine work
at INFO (S3's botocore and boto3, HTTP clients) log from WARNING up.

Two levels ask for more, from the command line or the environment (VLMOPS_VERBOSE, which a `vlmops` command,
every child process it starts and a flow run's process on a Prefect worker read, flows/__init__; the larger of the
two counts):
- `-v` / `--verbose` / VLMOPS_VERBOSE=1: everything above, vlmops's own debug lines, and tracebacks on errors;
  not the HTTP clients' line per request, hundreds per flow run (Prefect's client logs each API call).
- `-vv` / VLMOPS_VERBOSE=2: every library's debug lines too, those per-request lines included.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "VLMOPS_VERBOSE"
MAX_VERBOSITY = 2
# VLMOPS_VERBOSE's words for a level; a number above MAX_VERBOSITY is MAX_VERBOSITY, as `-vvv` is `-vv`.
VERBOSE_WORDS = {"": 0, "false": 0, "no": 0, "off": 0, "true": 1, "yes": 1, "on": 1}

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

# vlmops's own code (the core, the flows, the tasks): its debug lines show from the first level.
OWN_LOGGERS = ("vlmops", "flows", "tasks")

# Loggers that report routine work at INFO, which a vlmops command logs at: botocore's "Found credentials in
# environment variables." for every S3 client a command makes, boto3's resources each call. At WARNING their
# warnings and errors still show; the first level shows their INFO lines, also in a worker's flow run, whose root
# logger stays at WARNING (flows/__init__); the second all they log at the process's level.
CHATTY_LOGGERS = ("botocore", "boto3", "s3transfer")

# HTTP clients' one line per request: httpx at INFO (`HTTP Request: POST http://.../api/... "HTTP/1.1 201 Created"`
# for each of Prefect's API calls, hundreds per flow run), httpcore and urllib3 at DEBUG. They would drown what
# the first level is for, so only the second shows them; their warnings and errors always show.
PER_REQUEST_LOGGERS = ("httpx", "httpcore", "urllib3")


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def child_logging(level: int = logging.INFO, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """Logging for a child process's entry point (training, merge, inference workers): as verbose as the `vlmops`
    command that started it (VLMOPS_VERBOSE), with credentials masked (`vlmops.redact`). A `level` above INFO (a
    training rank other than 0, whose other lines repeat rank 0's) keeps the process quiet at every verbosity."""
    from vlmops.redact import redact_log_handlers

    verbosity = env_verbosity() if level <= logging.INFO else 0
    configure(verbosity)
    logging.basicConfig(level=root_level(verbosity, level), format=fmt)
    redact_log_handlers()


def no_usage_reports() -> None:
    """No usage reports from the libraries vlmops drives, unless the environment already says otherwise: DVC's
    analytics, MLflow's telemetry (which also writes ~/.config/mlflow/telemetry.json in every process that imports
    MLflow). For `vlmops` (vlmops.cli.main) and a flow run's process (flows/__init__), which does not start there."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def env_verbosity() -> int:
    """The level VLMOPS_VERBOSE asks for: 0 (unset, empty, 0, false, no, off), 1 (1, true, yes, on), 2 (2 or more).

    Raises:
        ValueError: any other value, named with the values that work.
    """
    value = os.environ.get(VERBOSE_ENV, "").strip().lower()
    if value.isdecimal():
        return min(int(value), MAX_VERBOSITY)
    if value in VERBOSE_WORDS:
        return VERBOSE_WORDS[value]
    raise ValueError(
        f"{VERBOSE_ENV}={os.environ[VERBOSE_ENV]!r} in the environment is not a verbosity: set it to 0 (quiet), "
        f"1 (as --verbose) or 2 (as -vv), or unset it"
    )


def root_level(verbosity: int, quiet_level: int = logging.INFO) -> int:
    """The root logger's level: `quiet_level` (the level a process logs at by default), DEBUG from the second level."""
    return logging.DEBUG if verbosity >= 2 else quiet_level


def configure(verbosity: int) -> None:
    """Hide the known noise at verbosity 0, show some at 1 and all at 2 (see the module docstring); record the level
    in the environment for child processes. The root logger's level is the caller's (`root_level`)."""
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity == 1 else logging.NOTSET)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.NOTSET if verbosity >= 2 else logging.INFO if verbosity else logging.WARNING
        )
    for name in PER_REQUEST_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbosity >= 2 else logging.WARNING)
    if verbosity:
        os.environ[VERBOSE_ENV] = str(verbosity)
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
