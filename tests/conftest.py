"""Shared fixtures: tiny models and demo data built once per session, offline settings for every test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3_server"]

# No hub, no telemetry: tests must never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 1.3b-style DeepSeek-VL checkpoint folder."""
    from vlmops.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-deepseek-vl", "deepseek_vl", seed=0)


@pytest.fixture(scope="session")
def tiny_hybrid_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 7b-style (SigLIP + SAM) DeepSeek-VL checkpoint folder."""
    from vlmops.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-deepseek-vl-hybrid", "deepseek_vl_hybrid", seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_model: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) of a small demo dataset."""
    from vlmops.data.demo import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_train=48, num_eval=8, seed=0)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's test harness (a temporary API server on SQLite), started once for every flow test of the session.

    Its start costs 10-20 s; the modules that run flows share it and keep their own result storage. Tests read
    back only what their own flow runs made (by flow-run id or artifact description).
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # a loaded CI machine starts the server slowly
        yield
