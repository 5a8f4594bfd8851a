"""Prefect flows. `retrain` (flows/retrain.py) is the whole chain: download, validate, train, merge, batch
inference on the eval split, evaluate, register as `@challenger`."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar, cast

from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import FailedRun
from prefect.logging.configuration import ensure_logging_setup
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_LOGGING_EXTRA_LOGGERS
from prefect.states import Failed, State

from vlmops import quiet
from vlmops.outages import retry_delay_setting
from vlmops.redact import redact_log_handlers
from vlmops.train.child import CHILD_OUTPUT_LOGGER, child_output_logger

P = ParamSpec("P")
R = TypeVar("R")


class _InARun(logging.Filter):
    """Only the records of a flow or task run: Prefect's API handler sends nothing else (it warns about each other
    record), and vlmops logs outside runs too (`vlmops run` before and after its flow, a task worker between runs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _own_lines_to_the_run(verbosity: int, levels_before: dict[str, int]) -> None:
    """vlmops's own loggers (quiet.OWN_LOGGERS) log from INFO, as under `vlmops run`, where the root logger is above
    INFO (Prefect's WARNING on a worker): their records reach the root's handlers, Prefect's console among them, at any
    root level. A level the logging config gave them (`levels_before`, e.g. a team's logging.yml) stays;
    VLMOPS_VERBOSE's levels are quiet.configure's. Their lines inside a flow or task run go to the run's log on the
    server too (the UI's), as PREFECT_LOGGING_EXTRA_LOGGERS=vlmops,flows,tasks would send them; where that setting is
    set, it is the list, and vlmops adds no handler of its own to them.

    So do the lines of a step's child process (training, merge, a batch inference job), which the step copies to the
    console and logs through CHILD_OUTPUT_LOGGER: that logger does not propagate (its lines are on the console
    already), so it gets an API handler of its own, unless the setting leaves out every logger it would have reached
    (`vlmops`)."""
    if verbosity == 0:
        floor = logging.INFO if logging.getLogger().level > logging.INFO else logging.NOTSET
        for name, level in levels_before.items():
            logging.getLogger(name).setLevel(level or floor)
    chosen = PREFECT_LOGGING_EXTRA_LOGGERS.value()
    to_the_run = [] if chosen else [logging.getLogger(name) for name in quiet.OWN_LOGGERS]
    if not chosen or any(f"{CHILD_OUTPUT_LOGGER}.".startswith(f"{name}.") for name in chosen):  # it or an ancestor
        to_the_run.append(child_output_logger())
    for logger in to_the_run:
        if not any(isinstance(handler, APILogHandler) for handler in logger.handlers):
            handler = APILogHandler()
            handler.addFilter(_InARun())
            logger.addHandler(handler)


# A worker's flow run (`python -m prefect.engine`, which loads a deployment's entrypoint by its path) and a task
# worker (`python -m flows.batch_inference serve`) start here, not in `vlmops`'s command line: the same defaults, and
# VLMOPS_VERBOSE set on the worker is their level. On top of Prefect's logging, set up first: its handlers (the console,
# the API) stay as they are, and the root logger keeps the level Prefect's settings give it (WARNING unless
# PREFECT_LOGGING_ROOT_LEVEL says otherwise) up to -vv, which is DEBUG; vlmops's own INFO lines show at any root level
# (_own_lines_to_the_run). Under `vlmops run`, main() has configured the same level and refused a VLMOPS_VERBOSE that is
# no level: nothing changes but the lines sent to the server.
quiet.no_usage_reports()
ensure_logging_setup()
# A setting that is no value vlmops can use is not raised here: Prefect prints a failed import's traceback three times
# (the flow run, its engine, and the process that runs the on_crashed hooks, which loads the flow too). A flow refuses
# to run instead (refuses_bad_settings), a task worker to start (flows.batch_inference); tasks.retry's waits keep their
# defaults until then.
_refused: list[str] = []
try:
    _verbosity = quiet.env_verbosity()
except ValueError as err:
    _verbosity = 0
    _refused.append(str(err))
try:
    retry_delay_setting()
except ValueError as err:
    _refused.append(str(err))
SETTINGS_ERROR: str | None = "; ".join(_refused) or None
_levels_before = {name: logging.getLogger(name).level for name in quiet.OWN_LOGGERS}
quiet.configure(_verbosity)
logging.getLogger().setLevel(quiet.root_level(_verbosity, logging.getLogger().level))
_own_lines_to_the_run(_verbosity, _levels_before)
redact_log_handlers()


class _SaidOnce(logging.Filter):
    """Drops the two lines Prefect adds to a refused flow run's "Finished in state Failed(<refusal>)" in its process.
    Its engine then raises the state's error (FailedRun, the state's message) and logs it again with a traceback, as
    "Engine execution exited with unexpected exception" (prefect.flow_engine.run_flow), to the console and the server.
    And its events sender, still connecting when a run this short ends, notes at the exit that it sends the run's first
    heartbeat ("EventsWorker - Still processing items: 1 items remaining..."), which it sends all the same."""

    def __init__(self, refusal: str) -> None:
        super().__init__()
        self.refusal = refusal

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, FailedRun) and str(error) == self.refusal:
            return False
        return not (record.name == "EventsWorker" and record.getMessage().startswith("Still processing items"))


def _refused_run(error: str) -> State[None]:
    """The final state of a flow run refused for `error`, its lines after "Finished in state" dropped (_SaidOnce)."""
    refusal = f"{error} on the worker that runs this flow; it stopped before its first step"
    for name in ("prefect.flow_runs", "EventsWorker"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _SaidOnce) for f in logger.filters):  # a flow with `retries` comes back here
            logger.addFilter(_SaidOnce(refusal))
    return Failed(message=refusal)


def refuses_bad_settings(fn: Callable[P, R]) -> Callable[P, R]:
    """Around a flow (under `@flow`): a flow run whose process has a setting vlmops cannot use (SETTINGS_ERROR: a
    VLMOPS_VERBOSE that is no level, a VLMOPS_RETRY_DELAY_S that is no number of seconds) stops before any step and
    ends Failed, the error its message, which Prefect's engine logs once ("Finished in state Failed(...)": the worker's
    output, the UI's log) without a traceback; its process then ends as after any run. Not by raising the error
    (Prefect logs it with its traceback, twice), nor by ending the process (the worker reports the run Crashed, an
    infrastructure failure, and Prefect's threads raced the exit). A flow given `retries` (none of vlmops's is) is
    refused that many times more in the same process, then ends Failed."""

    @functools.wraps(fn)
    def refusing(*args: P.args, **kwargs: P.kwargs) -> R:
        if SETTINGS_ERROR is not None:
            # Prefect's engine takes a state the flow returns as the run's final state; a caller of the flow (a parent
            # flow, `flow()`) gets the state's error raised, never the state.
            return cast(R, _refused_run(SETTINGS_ERROR))
        return fn(*args, **kwargs)

    return refusing
