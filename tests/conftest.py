"""Shared fixtures: tiny models and demo data built once per session, offline settings for every test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
# The outages the tests stage end when the test says so: a retry need not wait 5-30 s for a server to come back
# (tasks/retry.py). Set before the tasks are imported; the processes the tests start inherit it.
os.environ.setdefault("VLMOPS_RETRY_DELAY_S", "1")

# On pytest-xdist workers, each worker's torch (and every process it starts, which inherit the variable) gets its
# share of the cores. torch's default is a thread per core in every process; its OpenMP threads spin while they
# wait, so two trainings at once on two cores with two threads each crawl (measured on a busy 2-core machine:
# 3.3 samples/s each with 2 threads against 87-104 with 1). Set before torch is imported; an explicit
# OMP_NUM_THREADS is kept.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _XDIST_WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS)))


@pytest.fixture(scope="session", autouse=True)
def _compile_cache_of_this_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """torch.compile's caches in this run's temporary folder, for the tests and every process they start: training
    and batch jobs would otherwise point them at the product's default (`~/.cache/vlmops/torch-compile`), and a
    later run would find kernels an earlier one compiled. A folder the user set is kept (torch's own default, which
    torch writes into the variable itself, is not the user's)."""
    from vlmops.models.compile_cache import ENV, users_compile_cache

    if users_compile_cache() is not None:
        yield
        return
    before = os.environ.get(ENV)
    os.environ[ENV] = str(tmp_path_factory.mktemp("torch-compile"))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def pytest_report_header(config: pytest.Config) -> str | None:
    """Where CUDA is visible, a reminder that the tests not marked `gpu` were written (and their numbers pinned) for
    the CPU path: `make test` hides CUDA from them and runs the `gpu` tests apart."""
    import torch

    if not torch.cuda.is_available() or config.option.markexpr.strip() == "gpu":
        return None
    return (
        "CUDA is visible: the tests not marked gpu expect the CPU path (make test runs them with "
        "CUDA_VISIBLE_DEVICES= and then pytest -m gpu)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if hasattr(config, "workerinput"):  # a pytest-xdist worker: see "Two workers" below
        _longest_first(items)
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
    from prefect.concurrency.services import (
        ConcurrencySlotAcquisitionService,
        ConcurrencySlotAcquisitionWithLeaseService,
    )
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # a loaded CI machine starts the server slowly
        # Prefect keeps one slot-acquiring service per set of limit names, its client bound to the API of its first
        # use: a test before this one that held a `gpu` slot outside any API (tasks/gpu.py on the ephemeral server)
        # would have this module's flows ask that server for their slots. Drained, the next use binds to the harness.
        for service in (ConcurrencySlotAcquisitionService, ConcurrencySlotAcquisitionWithLeaseService):
            service.drain_all(timeout=60)
        yield


# -- Two workers (pytest-xdist) ----------------------------------------------------------------------------------
# `make test` runs pytest on two workers with `--dist loadscope`: a module goes to one worker whole, so its
# module-scoped fixtures (a trained run, a registry, a flow's results) are built once, as in a serial run. The
# team stack's modules share one session-scoped stack and workflow: they are one unit. Units are handed out
# in the order the workers collected them, which puts the modules that take longest first, so that no worker
# is left with a long one at the end while the other waits.
LONGEST_FIRST = ("team", "e2e", "slow", "integration")
"""Markers of the modules that take longest, longest first; the rest keep their order, after them."""


def _unit(nodeid: str) -> str:
    """The scheduling unit of a test: its module, or `tests/team` for the team stack's modules."""
    return "tests/team" if nodeid.startswith("tests/team/") else nodeid.split("::", 1)[0]


def _longest_first(items: list[pytest.Item]) -> None:
    rank: dict[str, int] = {}
    for item in items:
        marked = [i for i, name in enumerate(LONGEST_FIRST) if item.get_closest_marker(name)]
        unit = _unit(item.nodeid)
        rank[unit] = min([rank.get(unit, len(LONGEST_FIRST)), *marked])
    items.sort(key=lambda item: rank[_unit(item.nodeid)])  # stable: the order within a rank is kept


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadscope` with the team stack's modules as one unit and the units in collection order."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return ModuleScheduling(config, log)
