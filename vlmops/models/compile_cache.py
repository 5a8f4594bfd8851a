"""Where torch.compile keeps what it compiled (`model.compile_cache`), so that a later process skips the compiling.

torch.compile's on-disk caches (inductor's generated code and FX graphs, AOTAutograd's graphs, the Triton kernels and
their autotuning results) live under one folder, `TORCHINDUCTOR_CACHE_DIR`, by default `/tmp/torchinductor_<user>`:
gone with a fresh machine or container, so every batch job on a new GPU worker compiled the fast engine's towers and
decode step again (the 7b's first shard took ~80 s longer with that cache empty than filled, bench/RESULTS.md session
20). Pointed at a lasting folder (a persistent volume, as `model.cache_dir`), the next job finds them. Entries are
keyed by torch, Triton and the GPU, so one folder can serve several kinds of machine; each is written aside and then
renamed, so a crash leaves none half-written.

The variable is read each time torch looks a cache entry up; this sets it before the model is loaded, so before
anything compiles. A `TORCHINDUCTOR_CACHE_DIR` the user set wins.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_compile_cache(folder: str | os.PathLike[str] | None) -> Path | None:
    """Keep torch.compile's caches under `folder` (None or "": torch's default); the folder in use, if known."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get(ENV)
    # torch writes its default into the variable the first time it looks (some versions on `import torch._dynamo`):
    # that value is not the user's choice.
    if current is not None and Path(current).resolve() != Path(default_cache_dir()).resolve():
        if folder:
            log.debug("%s=%s is set: torch.compile's caches stay there, not in %s", ENV, current, folder)
        return Path(current)
    if not folder:
        return None
    path = Path(folder).expanduser().resolve()
    if current == str(path):  # set by an earlier load in this process
        return path
    os.environ[ENV] = str(path)  # torch makes the folder when it first compiles: a CPU job leaves none behind
    log.info("torch.compile's caches: %s", path)
    return path


def describe_compile_cache() -> str:
    """The folder torch.compile caches in now and how much it holds, for a log line: "/path (empty)", "/path (51 MB)"."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = Path(os.environ.get(ENV) or default_cache_dir())
    held = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
    return f"{folder} ({held / 1e6:.0f} MB)" if held else f"{folder} (empty)"
