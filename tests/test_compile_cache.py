"""model.compile_cache: torch.compile's caches in a lasting folder, found again by the next process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from vlmops.models.compile_cache import ENV, describe_compile_cache, use_compile_cache
from vlmops.models.loading import load_model

# A fresh process compiles a small function with inductor (its C++ backend on CPU) after pointing the caches at a
# folder, and says how many FX graphs it compiled and how many it found in the cache. torch has looked for its cache
# folder before (as some versions do on import), which writes its default into the variable.
COMPILE = """
import json, sys
import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir
cache_dir()
from vlmops.models.compile_cache import use_compile_cache
use_compile_cache(sys.argv[1])
f = torch.compile(lambda x: torch.nn.functional.silu(x) * x + 1)
f(torch.randn(8, 16))
from torch._dynamo.utils import counters
print(json.dumps({"miss": counters["inductor"]["fxgraph_cache_miss"], "hit": counters["inductor"]["fxgraph_cache_hit"]}))
"""


def compile_in_fresh_process(folder: Path) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "TRITON_CACHE_DIR")}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE, str(folder)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_second_process_finds_what_the_first_compiled(tmp_path: Path) -> None:
    folder = tmp_path / "compile-cache"
    first = compile_in_fresh_process(folder)
    assert first == {"miss": 1, "hit": 0}
    assert any(folder.rglob("*")), f"nothing cached under {folder}"
    second = compile_in_fresh_process(folder)
    assert second == {"miss": 0, "hit": 1}


def test_the_log_line_says_where_the_cache_is_and_what_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, str(tmp_path))
    assert describe_compile_cache() == f"{tmp_path} (empty)"
    (tmp_path / "fxgraph").mkdir()
    (tmp_path / "fxgraph" / "entry").write_bytes(b"x" * 3_000_000)
    assert describe_compile_cache() == f"{tmp_path} (3 MB)"


def test_the_users_variable_wins_and_null_keeps_torchs_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert use_compile_cache(None) is None
    assert use_compile_cache("") is None
    assert ENV not in os.environ
    # torch's own default, which torch itself writes into the variable once it has looked: not the user's choice.
    monkeypatch.setenv(ENV, default_cache_dir())
    assert use_compile_cache(tmp_path / "ours") == tmp_path / "ours"
    monkeypatch.setenv(ENV, str(tmp_path / "users"))
    assert use_compile_cache(tmp_path / "theirs") == tmp_path / "users"
    assert os.environ[ENV] == str(tmp_path / "users")
    assert not (tmp_path / "theirs").exists()


def test_loading_a_model_points_the_caches_at_the_setting(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    load_model(tiny_model, compile_cache=tmp_path / "cc")
    assert os.environ[ENV] == str((tmp_path / "cc").resolve())
