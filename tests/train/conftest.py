"""Training-test fixtures, on top of the session's tiny models and demo data (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmops.data.prepare import PreparedDataset, prepare_dataset


@pytest.fixture(scope="session")
def tiny_models(tiny_model: Path, tiny_hybrid_model: Path) -> dict[str, Path]:
    return {"deepseek_vl": tiny_model, "deepseek_vl_hybrid": tiny_hybrid_model}


@pytest.fixture(scope="session")
def snapshot(tmp_path_factory: pytest.TempPathFactory, tiny_processor, demo_data: tuple[Path, Path]) -> PreparedDataset:  # type: ignore[no-untyped-def]
    """The demo data (48 train / 8 eval records) validated into a snapshot, as `train()` reads it."""
    from vlmops.config import DataConfig
    from vlmops.models.template import token_counter

    train_file, eval_file = demo_data
    return prepare_dataset(
        DataConfig(),
        train_file,
        eval_file,
        tmp_path_factory.mktemp("datasets"),
        token_counter(tiny_processor.tokenizer, tiny_processor.num_image_tokens),
        tiny_processor.num_image_tokens,
    )
