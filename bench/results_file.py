"""The JSON file a benchmark writes with `--out`: its rows under the date, machine, command and library versions."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any


def write_results(out: str | Path, machine: str, rows: list[dict[str, Any]], **fields: Any) -> None:
    """`rows` and any further `fields` (figures of the whole run) as JSON at `out`, its folder made if missing."""
    import torch
    import transformers

    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **fields,
        "rows": rows,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


def gpu_machine() -> str:
    """The GPU as a results file names it: `NVIDIA H200 (140 GiB)`."""
    import torch

    props = torch.cuda.get_device_properties(0)
    return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
