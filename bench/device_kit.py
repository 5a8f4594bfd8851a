"""Rebuild `.device/`, the wheels a call on the lent GPU machine carries (bench/NOTES.md, "The kit").

The GPU machine's image has torch, transformers, peft, accelerate and the scientific stack, but not pydantic,
Prefect, MLflow or DVC, and it has no network. This script, run here with the project's virtual environment:

- `base`: `.device/whl`, the cp312 wheels every call that imports vlmops needs (pydantic and its parts,
  liger-kernel, py-spy), and `.device/setup.sh`, which a call's script sources to install them into /tmp/site.
- `flow`: `.device/flow/whl`, the wheels the retrain flow's gpu test needs: the distributions a CPU run of
  `tests/test_retrain_flow.py` imports (every Python process it starts records its modules at exit), plus the
  requirements of Prefect's server (its process is stopped by a signal, so it records nothing) and pexpect (which a
  `pytest -m gpu tests/` run imports while collecting), less the large packages the image has. `.device/flow/call.sh` installs them and runs `pytest -m gpu tests/test_retrain_flow.py`.

Usage: `.venv/bin/python bench/device_kit.py base flow`, then `run(command="bash .device/flow/call.sh",
carry=[".device"])`. The carried paths and the tracked files share a 64 MiB limit; the script prints the sizes.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".device"
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    arg
    for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
    for arg in ("--platform", tag)
]
# At the lock's versions: pydantic and its parts; wcmatch and bracex (vlmops.folders matches globs with them).
BASE = {"pydantic", "pydantic-core", "annotated-types", "typing-inspection", "wcmatch", "bracex"}
EXTRA = ["liger-kernel==0.8.5", "py-spy"]  # the gpu extra's fused loss; a sampling profiler
# On the image already (and large, or tied to torch's build): never carried. Not pytz, asyncpg, six, python-dateutil or
# tzdata: the image lacks pytz and Prefect's server imports it and asyncpg.
IMAGE_HAS = {
    "torch", "triton", "transformers", "tokenizers", "safetensors", "huggingface-hub", "hf-xet", "peft",
    "accelerate", "numpy", "scipy", "pandas", "pyarrow", "matplotlib", "pillow", "sympy", "mpmath", "networkx",
    "fonttools", "kiwisolver", "contourpy", "regex", "pyyaml", "setuptools", "pip", "jinja2", "markupsafe",
    "fsspec", "filelock", "typing-extensions", "packaging", "psutil", "tqdm", "requests", "urllib3", "certifi",
    "idna", "charset-normalizer", "cycler", "pyparsing",
}  # fmt: skip
# Imported only when present (accelerate probes boto3; deepspeed and kernels are optional training paths). botocore is
# imported by tasks/retry.py when a step fails: without it a failing step's error is hidden behind ModuleNotFoundError
# (13 MB: it does not fit beside the rest).
OPTIONAL = {"boto3", "botocore", "s3transfer", "deepspeed", "kernels", "brotli", "torchvision", "vlmops"}
# Files a wheel carries that no test reads: MLflow's web UI (7 of its 12 MB), left out to fit the 64 MiB.
UNREAD = {"mlflow": "mlflow/server/js/"}
# What Prefect's server process imports (uvicorn and the rest), which the trace cannot see.
# Published as an sdist only: built into a wheel here (pure Python).
SDIST_ONLY = {"antlr4-python3-runtime"}
# Imported at collection by test files a `pytest -m gpu tests/` run also collects (tests/infer/test_interactive.py).
COLLECTED = {"pexpect", "ptyprocess"}
SERVER = ["prefect", "uvicorn", "aiosqlite", "apprise", "docker", "dateparser", "cyclopts", "griffe", "semver"]
RECORDER = """\
import atexit, os, sys
def _record():
    with open(os.path.join(os.environ["VLMOPS_KIT_TRACE"], f"{os.getpid()}.txt"), "w") as f:
        f.write("\\n".join(sorted({m.split(".")[0] for m in list(sys.modules)})))
atexit.register(_record)
"""
SETUP = """\
# Sourced by each call's script: the carried wheels into /tmp/site, ahead of the image's packages.
set -e
pip install --quiet --no-index --no-deps --target /tmp/site .device/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT/results"
"""
FLOW_CALL = """\
# The retrain flow's gpu test on the lent machine (bench/device_kit.py built the wheels).
set -e
pip install --quiet --no-index --no-deps --target /tmp/site .device/flow/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python -c "import prefect, mlflow, dvc, pydantic, vlmops.cli, flows.retrain; print('imports ok')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout ${FLOW_TIMEOUT:-330} python -m pytest -p no:cacheprovider -m gpu -q tests/test_retrain_flow.py 2>&1 \\
    | tee "$OUT/retrain-gpu.log"
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(specs: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest), *PLATFORM, *specs],
        check=True,
    )


def pinned(names: set[str]) -> list[str]:
    """`name==version` as this environment has each (the lock's versions)."""
    return sorted(f"{name}=={metadata.version(name)}" for name in names)


def requirement_closure(roots: list[str]) -> set[str]:
    """`roots` and every distribution they require that is installed here (extras' requirements left out)."""
    seen: set[str] = set()
    todo = [canonical(root) for root in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [canonical(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]) for req in requires if "extra ==" not in req]
    return seen


def traced_distributions() -> set[str]:
    """Distributions the CPU run of the retrain flow's tests imports, in any Python process it starts."""
    with tempfile.TemporaryDirectory() as hook, tempfile.TemporaryDirectory() as trace:
        Path(hook, "sitecustomize.py").write_text(RECORDER)
        env = {**os.environ, "VLMOPS_KIT_TRACE": trace, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests/test_retrain_flow.py"]
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        modules = {line for path in Path(trace).glob("*.txt") for line in path.read_text().split()}
    by_module = metadata.packages_distributions()
    return {canonical(dist) for module in modules for dist in by_module.get(module, [])}


def without(wheel: Path, prefix: str) -> None:
    """Rewrite `wheel` without its files under `prefix`, and without their lines in its RECORD."""
    smaller = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(smaller, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith(prefix):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                kept = [line for line in data.decode().splitlines(keepends=True) if not line.startswith(prefix)]
                data = "".join(kept).encode()
            dst.writestr(item, data)
    smaller.replace(wheel)


def megabytes(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20


def build_base() -> None:
    download([*pinned(BASE), *EXTRA], KIT / "whl")
    (KIT / "setup.sh").write_text(SETUP)
    print(f".device/whl: {len(list((KIT / 'whl').glob('*.whl')))} wheels, {megabytes(KIT / 'whl'):.1f} MB")


def build_flow() -> None:
    names = traced_distributions() | requirement_closure(SERVER) | BASE | COLLECTED
    names -= IMAGE_HAS | OPTIONAL
    wheels = KIT / "flow" / "whl"
    download([*pinned(names - SDIST_ONLY), EXTRA[0]], wheels)
    if built := pinned(names & SDIST_ONLY):
        pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels)]
        subprocess.run([*pip_wheel, *built], check=True)
    for name, prefix in UNREAD.items():
        for wheel in wheels.glob(f"{name}-*.whl"):
            without(wheel, prefix)
    (KIT / "flow" / "call.sh").write_text(FLOW_CALL)
    print(f".device/flow/whl: {len(list(wheels.glob('*.whl')))} wheels, {megabytes(wheels):.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", choices=["base", "flow"])
    args = parser.parse_args()
    for part in args.parts:
        {"base": build_base, "flow": build_flow}[part]()
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    size = sum((ROOT / name).stat().st_size for name in tracked.decode().split("\0") if name) / 2**20
    print(f"tracked files: {size:.1f} MB; .device: {megabytes(KIT):.1f} MB (64 MiB in all per call)")


if __name__ == "__main__":
    main()
