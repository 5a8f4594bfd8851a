"""Fetch a model snapshot (`s3_snapshot`, `hub_snapshot`) in a process of its own, for tests of two processes that
fetch one model into one cache at once.

`fetch_snapshot` is the target of a `multiprocessing` spawn child; it reports through a queue what it returned, what
it logged and which objects it fetched from S3. It lives apart from the test modules so that the child imports only
what it needs (a test module imports torch). The child inherits the environment (AWS_*, HF_ENDPOINT) of the test.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

SLOW_GET_S = 2.0
"""How much longer the first S3 GetObject of a `slow_get` child takes: long enough for the other child to start."""


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def fetch_snapshot(
    name: str,
    model: dict[str, Any],
    endpoint: str | None,
    slow_get: Any | None,
    start: Any | None,
    results: Any,
) -> None:
    """Fetch the model `model` (a ModelConfig's fields) and put {name, folder, digest, gets, log} on `results` (or
    {name, error}).

    Args:
        endpoint: the S3 endpoint (`storage.endpoint_url`) of an S3 model.
        slow_get: a multiprocessing Event, set when this child's first S3 GetObject starts; that request then takes
            SLOW_GET_S longer, as on a slow link (botocore's own event hook, in this process only).
        start: a multiprocessing Event to wait for before fetching (imports and set-up are done by then).
    """
    lines = _Lines()
    logging.getLogger("vlmops").addHandler(lines)
    logging.getLogger("vlmops").setLevel(logging.INFO)
    try:
        from vlmops.config import ModelConfig, StorageConfig
        from vlmops.models.catalog import resolve
        from vlmops.models.hubs import HuggingFace, ModelScope, hub_snapshot, s3_snapshot
        from vlmops.models.manifest import manifest_digest
        from vlmops.storage import s3_client

        config = ModelConfig(**model)
        cache = Path(config.cache_dir)
        resolved = resolve(config, cache)
        storage = StorageConfig(endpoint_url=endpoint)
        gets: list[str] = []

        def on_get(params: dict[str, Any], **_: Any) -> None:
            gets.append(params["Key"])
            if slow_get is not None and not slow_get.is_set():
                slow_get.set()
                time.sleep(SLOW_GET_S)

        s3_client(storage).meta.events.register("before-parameter-build.s3.GetObject", on_get)
        if start is not None and not start.wait(60):
            raise TimeoutError("the test never said to start")
        if resolved.source == "s3":
            folder, _, manifest = s3_snapshot(resolved, storage, cache, refresh=False)
        else:
            hub = HuggingFace() if resolved.source == "huggingface" else ModelScope()
            folder, _, manifest = hub_snapshot(resolved, cache, False, hub)
        results.put(
            {"name": name, "folder": str(folder), "digest": manifest_digest(manifest), "gets": gets, "log": lines.lines}
        )
    except BaseException:
        results.put({"name": name, "error": traceback.format_exc(), "log": lines.lines})
