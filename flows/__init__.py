"""Prefect flows: retrain (the whole chain), batch_inference and promote."""
