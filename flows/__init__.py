"""Prefect flows. `retrain` (flows/retrain.py) is the whole chain: download, validate, train, merge, batch
inference on the eval split, evaluate, register as `@challenger`."""

import logging

from prefect.logging.configuration import ensure_logging_setup

from vlmops import quiet

# A worker's flow run (`python -m prefect.engine`, which loads a deployment's entrypoint by its path) and a task
# worker (`python -m flows.batch_inference serve`) start here, not in `vlmops`'s command line: the same defaults, and
# VLMOPS_VERBOSE set on the worker is their level (a value that is no level stops the flow run as it loads, naming the
# variable, before any step). On top of Prefect's logging, set up first: its handlers (the console, the API) stay as
# they are, and the root logger keeps the level Prefect's settings give it (WARNING unless PREFECT_LOGGING_ROOT_LEVEL
# says otherwise) up to -vv, which is DEBUG. Under `vlmops run`, main() has configured the same level: nothing changes.
quiet.no_usage_reports()
ensure_logging_setup()
_verbosity = quiet.env_verbosity()
quiet.configure(_verbosity)
logging.getLogger().setLevel(quiet.root_level(_verbosity, logging.getLogger().level))
