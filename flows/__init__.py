"""Prefect flows. `retrain` (flows/retrain.py) is the whole chain: download, validate, train, merge, batch
inference on the eval split, evaluate, register as `@challenger`."""

from vlmops import quiet

# A worker's flow run starts here, not in `vlmops`'s command line: the same defaults.
quiet.no_usage_reports()
