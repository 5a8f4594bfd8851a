"""Prefect flows. `retrain` (flows/retrain.py) is the whole chain: download, validate, train, merge, batch
inference on the eval split, evaluate, register as `@challenger`."""

import os

# As `vlmops` itself does (vlmops.cli.main): no usage reports from the libraries a flow drives, unless the worker's
# environment says otherwise. MLflow's would also write ~/.config/mlflow/telemetry.json in every flow run's process.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
