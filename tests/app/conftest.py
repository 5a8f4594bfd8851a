"""Tiny models for the chat page, and `vlmops app` run as a real server process for the HTTP and browser tests."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.infer.conftest import make_readable
from vlmops.data.demo import draw_shape
from vlmops.models.tiny import build_tiny_model

STARTUP_TIMEOUT = 240  # imports of torch, transformers and gradio on two busy cores


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose answers are printable words, long enough to watch them stream."""
    return make_readable(build_tiny_model(tmp_path_factory.mktemp("app-models") / "readable", "deepseek_vl", seed=3))


@pytest.fixture(scope="session")
def challenger_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model (another seed) to compare against."""
    return make_readable(build_tiny_model(tmp_path_factory.mktemp("app-models") / "challenger", "deepseek_vl", seed=4))


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two PNGs: a red circle and a blue square."""
    folder = tmp_path_factory.mktemp("app-images")
    rng = random.Random(0)
    paths = {}
    for colour, shape in (("red", "circle"), ("blue", "square")):
        paths[colour] = folder / f"{colour}.png"
        draw_shape(colour, shape, 64, rng).save(paths[colour])
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AppProcess:
    """`vlmops app ARGS --port P` in its own process group: started at once, waited for when needed.

    Starting the servers a test module needs together overlaps their imports (torch, transformers, gradio).
    `stop` kills the whole group; call it in a `finally` so that no server outlives its tests.
    """

    def __init__(self, args: list[str], log_file: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = log_file
        command = [sys.executable, "-m", "vlmops.cli", "app", *args, "--port", str(self.port)]
        environment = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        with log_file.open("w") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
            )

    def wait_ready(self) -> str:
        """The page's URL once the server answers HTTP (401 counts: a page with a login is up)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"vlmops app exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/config", timeout=5).status_code in (200, 401):
                    return self.url
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vlmops app did not answer on {self.url} in {STARTUP_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.5)

    def log(self) -> str:
        return self.log_file.read_text()[-3000:]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
