"""Prefect flows. `retrain` (flows/retrain.py) is the whole chain: download, validate, train, merge, batch
inference on the eval split, evaluate, register as `@challenger`."""
