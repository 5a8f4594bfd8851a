"""model.shared_compile_cache: workers on fresh machines share what torch.compile compiled, through S3.

Each "machine" is a fresh process with an empty local compile cache of its own, running a job's shards through the
fast engine with its decode step compiled (inductor's C++ backend on CPU; Triton on a GPU) and the shared cache set:
the first compiles and publishes after its first shard, the second loads the file and compiles nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vlmops.models.compile_cache import SharedCompileCache, artifacts_name

MACHINE = """
import json, sys
from pathlib import Path
import torch
from vlmops.config import load_config
from vlmops.infer.fast_engine import FastEngine
from vlmops.infer.job import ShardRunner
from vlmops.infer.planning import plan_job
from vlmops.infer.job_output import open_job, pending_shards
from vlmops.infer.job_plan import ModelInfo
from vlmops.infer.output import open_output
from vlmops.models.compile_cache import SharedCompileCache, compiled_graphs
from vlmops.models.loading import load_model
from torch._dynamo.utils import counters

model, prompts, out, local, shared = sys.argv[1:]
config = load_config(None, {"infer.max_new_tokens": 3, "infer.shard_size": 3, "model.compile_cache": local,
                            "model.shared_compile_cache": shared})
loaded = load_model(model, compile_cache=config.model.compile_cache)
share = SharedCompileCache(shared, config.storage, loaded.device)
found = share.fetch()
engine = FastEngine(loaded, config.infer, max_batch=4, prefill_batch=2, max_context=256, compile=True)
output = open_output(out)
plan = open_job(plan_job(ModelInfo(model, None, "sha256:x"), prompts, config), output)
answers = sum(s.results for s in ShardRunner(loaded, engine, config, compile_share=share).run_many(
    plan, pending_shards(plan, output), output))
print(json.dumps({"found": found, "answers": answers, "compiled": compiled_graphs(),
                  "hits": counters["inductor"]["fxgraph_cache_hit"]}))
"""


def run_machine(model: Path, prompts: Path, work: Path, shared: str, env: dict[str, str]) -> dict[str, Any]:
    """One fresh machine: its own empty local compile cache and output folder."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    clean = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    command = [sys.executable, "-c", MACHINE, str(model), str(prompts), str(work / "out"), str(work / "cc"), shared]
    proc = subprocess.run(command, env={**clean, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.integration
def test_a_fresh_machine_loads_what_the_first_compiled_and_compiles_nothing(
    tiny_model: Path, images: dict[str, Path], tmp_path: Path, s3_server: Any
) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="fleet")
    shutil.copy(images["red"], tmp_path / "red.png")
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"r{i}", "query": f"<img>red.png</img>Colour {i}?"}) + "\n" for i in range(6))
    )
    shared = "s3://fleet/compile-cache"
    key = f"compile-cache/{artifacts_name(__import__('torch').device('cpu'))}"

    first = run_machine(tiny_model, prompts, tmp_path / "one", shared, s3_server.env())
    assert first["found"] is False and first["answers"] == 6 and first["compiled"] > 0
    published = client.head_object(Bucket="fleet", Key=key)
    assert published["ContentLength"] > 0

    second = run_machine(tiny_model, prompts, tmp_path / "two", shared, s3_server.env())
    assert second == {"found": True, "answers": 6, "compiled": 0, "hits": first["compiled"]}
    # Nothing new compiled: the file is left as the first machine wrote it.
    assert client.head_object(Bucket="fleet", Key=key)["ETag"] == published["ETag"]


def test_a_damaged_or_missing_file_leaves_the_job_compiling(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    share = SharedCompileCache(str(tmp_path / "shared"))
    assert share.fetch() is False  # nothing there yet
    target = Path(share.uri)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not torch's artifacts")
    assert share.fetch() is False
    assert any("could not be loaded" in r.getMessage() and share.uri in r.getMessage() for r in caplog.records)
    assert share.publish_new() is False  # nothing compiled since: nothing written over it
    assert target.read_bytes() == b"not torch's artifacts"


@pytest.mark.integration
def test_only_the_publishing_worker_of_a_machine_writes_the_file(tmp_path: Path) -> None:
    """`infer.workers` processes of one machine compile the same kernels: the first publishes, the rest only fetch."""
    import torch

    writer = SharedCompileCache(str(tmp_path / "shared"))
    reader = SharedCompileCache(str(tmp_path / "other"), publish=False)
    torch.compile(lambda x: x * 3 + 1)(torch.arange(5.0))  # one graph compiled after both were made
    assert reader.publish_new() is False and not Path(reader.uri).exists()
    assert writer.publish_new() is True and Path(writer.uri).stat().st_size > 0
