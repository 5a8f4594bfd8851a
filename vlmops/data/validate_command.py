"""`vlmops validate`: check the configured dataset with the base model's tokenizer and print the report."""

from __future__ import annotations

from pathlib import Path

from vlmops.config import load_config


def validate_command(config_path: str | None, overrides: list[str]) -> int:
    from transformers import AutoProcessor

    from vlmops.data.prepare import prepare_from_config
    from vlmops.models.download import download_model

    config = load_config(config_path, overrides)
    snapshot = download_model(config.model, config.storage, Path(config.run.output_dir))
    prepared = prepare_from_config(config, AutoProcessor.from_pretrained(snapshot.path))
    print(prepared.report.summary())
    print(f"snapshot: {prepared.path}")
    print(f"report:   {prepared.path / 'report.json'}")
    return 0
