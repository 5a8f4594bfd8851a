"""The registered model's life after training: its lineage tags, restoring it elsewhere, and promotion."""
