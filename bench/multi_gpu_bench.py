"""Multi-GPU benchmark (issue 5): ZeRO-2 full SFT, data-parallel LoRA and per-GPU batch inference on one machine.

Random-initialised real architectures (built once by `train_bench.build_model`), synthetic samples
(`train_bench.build_dataset`), and vlmops' own code paths:

  --part zero2-full  7b full SFT (vision frozen) with the train settings of configs/deepseek-vl-7b-full-zero2.yaml
                     (DeepSpeed `zero2`, batch 2 per GPU, grad_accum 4) on each GPU count of --gpus: tokens/s, the
                     peak memory of every rank, scaling efficiency (one GPU: one process, which trains without
                     DeepSpeed, as `vlmops sft` does with a sharding preset there). Prints first the command that
                     `NPROC_PER_NODE=N vlmops sft --config <that file>` runs (torchrun, N processes).
  --part lora-dp     1.3b LoRA on the LLM's q/k/v (batch 8 per GPU), data-parallel on each count: tokens/s, peak
                     memory per rank, scaling efficiency. Then --mixed-steps (200) steps on the largest count through
                     `launch_training` (the flow's train step, evaluation and checkpoints included) on short records
                     of which half have no image, shuffled by the Trainer so batches mix text-only and image samples;
                     once with DDP and once with ZeRO-3 (--mixed). A run still going after --hang-timeout is stopped
                     (the product's own stop: SIGTERM to torchrun's process group) and reported as a hang when no
                     step finished in its last minute, else as too slow.
  --part infer       a random 1.3b, 256 prompts with one image each, `run_batch_job` (infer.workers) with each count of
                     workers (one process per GPU): records/s end to end (worker start and model load included) and
                     in generation alone (the slowest worker's own time), scaling efficiency, and a check of the
                     merged file: every input record exactly once (index, source and reference match the input),
                     predictions compared with the single worker's.

Training cases run in the launcher `vlmops sft` uses for that count (`training_command`: torchrun when more than one
process or with DeepSpeed, plain python otherwise) with its environment (`child_environment`), starting this script's
rank entry, which runs `train_bench.run_one` -- `setup_training` and `Trainer.train`, the code path of `train()`,
without the end-of-run evaluation and checkpoint (a 7b full checkpoint with optimizer state is ~100 GB). Every rank
reports its own peak memory. tokens/s counts the non-padding tokens of all ranks after the warm-up steps.
Scaling efficiency = tokens/s(N) / (N / n0 * tokens/s(n0)), n0 the smallest count that ran (1 unless it ran out of
memory). Every child process gets `vlmops.multigpu.NO_MULTICAST_ENV` (NVLink multicast off); the rank entry refuses
to run without it.

Commands (repository root, GPU image prepared as bench/NOTES.md says; each line fits a 10-minute call):

  nvidia-h200-x4 (4 x H200):
    python bench/multi_gpu_bench.py --part zero2-full --gpus 1,2,4 --out outputs/bench-mgpu.jsonl
    python bench/multi_gpu_bench.py --part lora-dp --gpus 1,2,4 --out outputs/bench-mgpu.jsonl
    python bench/multi_gpu_bench.py --part infer --gpus 1,2,4 --out outputs/bench-mgpu.jsonl
    python bench/multi_gpu_bench.py --part lora-dp --sizes 7b --gpus 1,2,4 --mixed none   # optional: 7b LoRA scaling
  nvidia-h200-x2 (2 x H200):
    python bench/multi_gpu_bench.py --part zero2-full --gpus 1,2 --out outputs/bench-mgpu.jsonl
    python bench/multi_gpu_bench.py --part lora-dp --gpus 1,2 --out outputs/bench-mgpu.jsonl
    python bench/multi_gpu_bench.py --part infer --gpus 1,2 --out outputs/bench-mgpu.jsonl
  smoke test on CPU (tiny models, gloo, 1 and 2 processes; DeepSpeed needs CUDA, so it is left out):
    python bench/multi_gpu_bench.py --part all --device cpu --sizes tiny --gpus 1,2

The random models and datasets are built under --work (shared with train_bench.py) and reused by later calls.
Prints one JSON line per measurement (appended to --out too) and a summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import train_bench as tb  # noqa: E402

from vlmops.multigpu import NO_MULTICAST_ENV  # noqa: E402

PARTS = ("zero2-full", "lora-dp", "infer")
ZERO2_CONFIG = ROOT / "configs" / "deepseek-vl-7b-full-zero2.yaml"
DEFAULT_ARCHS = {"zero2-full": ["7b"], "lora-dp": ["1.3b"], "infer": ["1.3b"]}
RANK_PREFIX = "BENCH_RANK "
MIXED_BATCH = 4  # per GPU: with half the records text-only, 7 in 8 batches mix both kinds, 1 in 16 has no image
MIXED_TEXT_TOKENS = 32  # prompt and answer each: a step of short samples, so 200 steps take a minute or two
INFER_RECORDS = 256
INFER_BATCH = 16
INFER_NEW_TOKENS = 32
STALL_S = 60  # no step finished for this long: a hang, not a slow run


def zero2_case(arch: str) -> tb.Case:
    """Full SFT with the train settings of the shipped 7b ZeRO-2 config (the seed's 4-GPU recipe)."""
    from vlmops.config import load_config

    train = load_config(ZERO2_CONFIG).train
    overrides = {
        "train.mode": train.mode,
        "train.freeze.vision": train.freeze.vision,
        "train.deepspeed": train.deepspeed,
        "train.batch_size": train.batch_size,
        "train.grad_accum": train.grad_accum,
        "train.gradient_checkpointing": train.gradient_checkpointing,
        "train.resume": "never",
    }
    return tb.Case(f"zero2-full-{arch}", arch, overrides, warmup_steps=2, measured_steps=4)


def lora_case(arch: str) -> tb.Case:
    """LoRA on the LLM's q/k/v with the batch sizes of DESIGN.md §7 (1.3b: 8, 7b: 4 per GPU)."""
    overrides = {
        "train.mode": "lora",
        "train.lora.targets": "qkv",
        "train.batch_size": 4 if arch == "7b" else 8,
        "train.gradient_checkpointing": True,
        "train.resume": "never",
    }
    return tb.Case(f"lora-qkv-{arch}", arch, overrides, warmup_steps=3, measured_steps=10)


# ---------------------------------------------------------------------------------------------------- environment


def check_no_multicast(env: Mapping[str, str], who: str) -> None:
    """Refuse to go on when a child's environment would let NVLink multicast on."""
    wrong = {k: env.get(k) for k, v in NO_MULTICAST_ENV.items() if env.get(k) != v}
    if wrong:
        raise RuntimeError(
            f"{who}: NVLink multicast must stay off ({NO_MULTICAST_ENV}), but the environment has {wrong}"
        )


def child_env(device: str) -> dict[str, str]:
    """The product's training-child environment (`child_environment`), with no GPU visible in CPU mode."""
    from vlmops.train.child import child_environment

    env = child_environment({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None)
    check_no_multicast(env, "training child")
    return env


def product_launcher(nproc: int, deepspeed: bool) -> list[str]:
    """What `vlmops sft` starts its entry module with for this process count: torchrun, or plain python."""
    from vlmops.train.launch import training_command

    command = training_command(None, Path("M"), Path("D"), Path("R"), nproc=nproc, deepspeed=deepspeed)
    entry = command.index("vlmops.train.launch") - 1  # "-m vlmops.train.launch --base-model M ..."
    return command[:entry]


def shown(command: list[str]) -> str:
    return " ".join("python" if part == sys.executable else part for part in command)


def emit(prefix: str, record: dict[str, Any]) -> None:
    """One line in one write, so the lines of concurrent ranks never interleave."""
    sys.stdout.write(prefix + json.dumps(record) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------- models, data


def ensure_model(arch: str, size: str, work: Path, device: str) -> Path:
    """The random checkpoint, built once in a child process (the benchmark's parent never holds a GPU)."""
    folder = work / "models" / f"{size}-{arch}"
    if not (folder / "config.json").is_file():
        command = [sys.executable, str(Path(__file__).resolve()), "--build-model", arch, "--sizes", size]
        command += ["--work", str(work), "--device", device]
        subprocess.run(command, env=child_env(device), check=True)
    return folder


# ---------------------------------------------------------------------------------------------------- training


def rank_child(spec: dict[str, Any]) -> int:
    """One rank of a training case: `train_bench.run_one`, then this rank's numbers on one stdout line."""
    import resource

    import torch

    check_no_multicast(os.environ, "rank process")
    case = tb.Case(spec["name"], spec["arch"], spec["overrides"], spec["warmup_steps"], spec["measured_steps"])
    cuda = torch.cuda.is_available()
    code = 0
    try:
        result = tb.run_one(case, Path(spec["model"]), Path(spec["dataset"]), Path(spec["run_dir"]), spec["device"])
    except RuntimeError as err:  # torch.OutOfMemoryError, or a CUDA/NCCL allocation failure
        if "out of memory" not in str(err).lower():
            raise
        result = {
            "case": case.name,
            "out_of_memory": str(err).splitlines()[0][:300],
            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
            "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        }
        code = 3
    result.update(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")))
    emit(RANK_PREFIX, result)
    return code


def run_training_case(
    part: str, case: tb.Case, nproc: int, size: str, model: Path, dataset: Path, work: Path, device: str, timeout: int
) -> dict[str, Any]:
    """Start one case on `nproc` processes with the product's launcher; merge what every rank reported."""
    config, _ = tb.case_config(case, device)
    launcher = product_launcher(nproc, config.train.deepspeed is not None)
    spec = {
        "name": case.name,
        "arch": case.arch,
        "overrides": case.overrides,
        "warmup_steps": case.warmup_steps,
        "measured_steps": case.measured_steps,
        "model": str(model),
        "dataset": str(dataset),
        "run_dir": str(work / "runs" / f"mgpu-{size}-{case.name}-{nproc}"),
        "device": device,
    }
    command = [*launcher, str(Path(__file__).resolve()), "--rank-child", json.dumps(spec)]
    head = {"part": part, "case": case.name, "size": size, "gpus": nproc, "launcher": shown(launcher)}
    output, returncode, timed_out, wall = run_child(command, child_env(device), timeout)
    ranks = sorted(
        (json.loads(line[len(RANK_PREFIX) :]) for line in output.splitlines() if line.startswith(RANK_PREFIX)),
        key=lambda r: r["rank"],
    )
    tail = "\n".join(output.splitlines()[-40:])
    if timed_out:
        return {**head, "error": f"no result within {timeout} s (stopped)", "log_tail": tail}
    if not ranks or (returncode != 0 and not any("out_of_memory" in r for r in ranks)):
        return {**head, "error": f"exit code {returncode}", "log_tail": tail}
    first = ranks[0]
    result = {**head, "wall_s": round(wall, 1)}
    keys = ("arch", "device", "batch_size", "steps", "measured_steps", "tokens_per_sample", "tokens_per_s")
    keys += ("samples_per_s", "step_time_s", "trainable_params", "total_params", "loss_first", "loss_last")
    keys += ("deepspeed", "precision", "gradient_checkpointing", "torch", "transformers", "note")
    result.update({k: first[k] for k in keys if k in first})
    result["grad_accum"] = case.overrides.get("train.grad_accum", 1)
    result["ranks_reported"] = [r["rank"] for r in ranks]
    for key in ("peak_gpu_mem_gib", "peak_gpu_reserved_gib", "peak_host_rss_gib"):
        values = [r.get(key) for r in ranks]
        result[f"{key}_per_rank"] = values
        result[f"{key}_max"] = max((v for v in values if v is not None), default=None)
    oom = [r for r in ranks if "out_of_memory" in r]
    if oom:
        result["out_of_memory"] = f"rank {oom[0]['rank']}: {oom[0]['out_of_memory']}"
        result.pop("tokens_per_s", None)
    return result


def run_child(command: list[str], env: dict[str, str], timeout: int) -> tuple[str, int, bool, float]:
    """(output, exit code, timed out, seconds): the child in a session of its own, stopped whole on a timeout."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        timed_out = True
    return output, proc.returncode, timed_out, time.perf_counter() - started


def add_scaling(results: list[dict[str, Any]], rate: str, out: str) -> None:
    """out = rate(N) / (N / n0 * rate(n0)) per case, n0 the smallest count that has the rate."""
    for case in {r["case"] for r in results}:
        rows = sorted((r for r in results if r["case"] == case and r.get(rate)), key=lambda r: r["gpus"])
        for r in rows:
            r[out] = round(r[rate] / (r["gpus"] / rows[0]["gpus"] * rows[0][rate]), 3)
            r[f"{out}_vs_gpus"] = rows[0]["gpus"]


def scaling_part(
    part: str, cases: list[tb.Case], size: str, counts: list[int], work: Path, device: str, timeout: int
) -> list[dict[str, Any]]:
    results = []
    for case in cases:
        model = ensure_model(case.arch, size, work, device)
        per_step = int(case.overrides["train.batch_size"]) * int(case.overrides.get("train.grad_accum", 1))
        records = (case.warmup_steps + case.measured_steps) * per_step * max(counts) + 1  # one epoch at every count
        dataset = tb.build_dataset(work / "data" / f"{size}-{case.arch}", model, records)
        case_results = []
        for nproc in counts:
            result = run_training_case(part, case, nproc, size, model, dataset, work, device, timeout)
            case_results.append(result)
            print(json.dumps(result), flush=True)
        add_scaling(case_results, "tokens_per_s", "scaling_efficiency")
        results += case_results
    return results


def launch_check(counts: list[int]) -> list[dict[str, Any]]:
    """Issue 5, item 1: `NPROC_PER_NODE=N vlmops sft --config <7b zero2 config>` goes through torchrun."""
    from vlmops.config import load_config
    from vlmops.train.launch import resolve_nproc, training_command

    config = load_config(ZERO2_CONFIG)
    rows = []
    for nproc in counts:
        with mock.patch.dict(os.environ, {"NPROC_PER_NODE": str(nproc)}):
            resolved = resolve_nproc(config)
        command = training_command(
            ZERO2_CONFIG, Path("BASE_MODEL"), Path("DATASET"), Path("RUN_DIR"), None, resolved, deepspeed=True
        )
        torchrun = "torch.distributed.run" in command and command[command.index("--nproc_per_node") + 1] == str(nproc)
        rows.append(
            {
                "part": "zero2-full",
                "case": "launch-check",
                "gpus": nproc,
                "NPROC_PER_NODE": str(nproc),
                "resolved_nproc": resolved,
                "torchrun": torchrun,
                "command": shown(command),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------- mixed batches


class WallClockExceededError(Exception):
    pass


@contextlib.contextmanager
def wall_clock_limit(seconds: int) -> Iterator[None]:
    """Raise WallClockExceededError in this (main) thread after `seconds`."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise WallClockExceededError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def mixed_run(
    arch: str, size: str, nproc: int, deepspeed: str | None, steps: int, work: Path, device: str, timeout: int
) -> dict[str, Any]:
    """`steps` LoRA steps on batches that mix text-only and image records, through `launch_training`."""
    from vlmops.data.formats import read_dataset
    from vlmops.train.launch import TrainingFailed, launch_training
    from vlmops.train.rundir import METRICS_FILE

    name = f"mixed-lora-{'ddp' if deepspeed is None else deepspeed}-{arch}"
    head: dict[str, Any] = {"part": "lora-dp", "case": name, "size": size, "gpus": nproc, "deepspeed": deepspeed}
    if deepspeed is not None and device == "cpu":
        return {**head, "skipped": f"DeepSpeed ({deepspeed}) needs CUDA: not run in the CPU smoke mode"}
    model = ensure_model(arch, size, work, device)
    records = steps * MIXED_BATCH * nproc + 1  # one epoch: 200 steps of fresh batches
    dataset = tb.build_dataset(
        work / "data" / f"{size}-{arch}",
        model,
        records,
        prompt_tokens=MIXED_TEXT_TOKENS,
        answer_tokens=MIXED_TEXT_TOKENS,
        text_only_share=0.5,
    )
    conversations = read_dataset(dataset / "train.jsonl").conversations
    text_only = sum(1 for c in conversations if not c.images)
    overrides = [
        "train.mode=lora",
        "train.lora.targets=qkv",
        f"train.batch_size={MIXED_BATCH}",
        f"train.max_steps={steps}",
        f"train.eval_steps={max(1, steps // 2)}",  # an evaluation and a checkpoint mid-run, and at the end
        "train.gradient_checkpointing=true",
        f"train.deepspeed={deepspeed if deepspeed is not None else 'null'}",
        "train.save_total_limit=1",
        "train.resume=never",
        "data.max_length=4096",
        f"run.name={name}",
    ]
    run_dir = work / "runs" / f"mgpu-{size}-{name}-{nproc}"
    head.update(
        records=len(conversations),
        text_only_records=text_only,
        batch_size=MIXED_BATCH,
        steps_asked=steps,
        run_dir=str(run_dir),
    )
    env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None
    started = time.perf_counter()
    try:
        with wall_clock_limit(timeout):
            result = launch_training(None, model, dataset, run_dir, overrides, nproc=nproc, env=env)
    except WallClockExceededError:
        metrics = run_dir / METRICS_FILE
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        last_step = json.loads(lines[-1])["step"] if lines else 0
        idle = time.time() - metrics.stat().st_mtime if metrics.is_file() else timeout
        status = "hang" if idle >= STALL_S else "too slow"
        return {
            **head,
            "status": status,
            "error": f"stopped after {timeout} s at step {last_step} of {steps}; last step logged {idle:.0f} s before",
            "last_step": last_step,
        }
    except TrainingFailed as err:
        return {**head, "status": "error", "error": f"exit code {err.returncode}", "log_tail": err.log_tail[-4000:]}
    wall = time.perf_counter() - started
    return {
        **head,
        "status": "ok" if result.steps == steps else "error",
        "steps": result.steps,
        "wall_s": round(wall, 1),
        "train_runtime_s": round(result.train_runtime_s, 1),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "samples_per_s": round(result.samples_per_s, 3),
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "loss_first": result.loss_history[0][1] if result.loss_history else None,
        "peak_gpu_mem_gib_rank0": round(result.peak_gpu_memory_gib, 2) if result.peak_gpu_memory_gib else None,
        "final_dir": str(result.final_dir),
        "launcher": shown(product_launcher(nproc, deepspeed is not None)),
    }


# ---------------------------------------------------------------------------------------------------- inference


@contextlib.contextmanager
def stderr_to_file(path: Path) -> Iterator[None]:
    """Send this process's fd 2 (and so every worker's stderr) to `path` for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("wb") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def check_exactly_once(predictions: Path, conversations: list[Any]) -> dict[str, Any]:
    """Every input record once in the merged file, in input order, with its own source and reference."""
    records = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    sources = Counter(str(r["source"]) for r in records)
    expected = [c.source for c in conversations]
    mismatched = [
        r["index"]
        for r in records
        if not (0 <= r["index"] < len(conversations))
        or r["source"] != expected[r["index"]]
        or r["reference"] != conversations[r["index"]].messages[-1].text("").strip()
    ]
    return {
        "exactly_once": [r["index"] for r in records] == list(range(len(conversations)))
        and sources == Counter(expected)
        and not mismatched,
        "records_out": len(records),
        "duplicates": sorted(s for s, n in sources.items() if n > 1)[:5],
        "missing": sorted(set(expected) - set(sources))[:5],
        "mismatched_indices": mismatched[:5],
    }


def infer_part(size: str, counts: list[int], work: Path, device: str) -> list[dict[str, Any]]:
    from vlmops.config import load_config
    from vlmops.data.formats import read_dataset
    from vlmops.infer.batch_job import run_batch_job
    from vlmops.infer.job_output import write_eval_predictions
    from vlmops.infer.output import open_output

    model = ensure_model("1.3b", size, work, device)
    snapshot = tb.build_dataset(
        work / "data" / f"{size}-1.3b", model, INFER_RECORDS, prompt_tokens=64, answer_tokens=16
    )
    data_file = snapshot / "train.jsonl"
    conversations = read_dataset(data_file).conversations
    config = load_config(None, {"infer.batch_size": INFER_BATCH, "infer.max_new_tokens": INFER_NEW_TOKENS})
    # The workers are `python -m vlmops.infer.parallel` children: vlmops must be importable from wherever this runs.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    results: list[dict[str, Any]] = []
    single: list[str] | None = None
    for nproc in counts:
        out = work / "infer" / f"{size}-1.3b-{nproc}.jsonl"
        head: dict[str, Any] = {"part": "infer", "case": "infer-1.3b", "size": size, "gpus": nproc}
        with tempfile.TemporaryDirectory() as tmp:
            log_file = Path(tmp) / "workers.log"
            started = time.perf_counter()
            try:
                job_dir = out.with_suffix(".job")
                shutil.rmtree(job_dir, ignore_errors=True)
                run_config = config.model_copy(update={"infer": config.infer.model_copy(update={"workers": nproc})})
                with stderr_to_file(log_file):
                    batch = run_batch_job(str(model), str(data_file), str(job_dir), run_config, progress=False)
                write_eval_predictions(open_output(str(job_dir)), out)
            except Exception as err:  # recorded with the workers' output (exit code 1); the next count runs
                tail = "\n".join(log_file.read_text(errors="replace").replace("\r", "\n").splitlines()[-40:])
                result = {**head, "error": f"{type(err).__name__}: {err}"[:1000], "log_tail": tail}
                results.append(result)
                print(json.dumps(result), flush=True)
                continue
            wall = time.perf_counter() - started
            per_worker: dict[str, float] = {}
            for shard in batch.ran:
                per_worker[shard.worker] = per_worker.get(shard.worker, 0.0) + shard.seconds
            worker_times = [round(t, 2) for t in per_worker.values()]
            tokens = int(batch.manifest["generated_tokens"])
        predictions = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
        result = {
            **head,
            "records": batch.results,
            "batch_size": INFER_BATCH,
            "max_new_tokens": INFER_NEW_TOKENS,
            "generated_tokens": tokens,
            "seconds": round(wall, 2),
            "wall_s": round(wall, 1),
            "records_per_s": round(batch.results / wall, 2),
            "generated_tokens_per_s": round(tokens / wall, 1),
            "worker_generate_s": worker_times,
            "generate_records_per_s": round(batch.results / max(worker_times), 2)
            if len(worker_times) == nproc
            else None,
            **check_exactly_once(out, conversations),
        }
        if single is None and nproc == 1:
            single = predictions
        elif single is not None:
            # Greedy decoding, but the shares batch (and pad) records differently: on random weights near-ties can
            # flip a token, so this is reported, not required.
            result["same_predictions_as_1_worker"] = sum(a == b for a, b in zip(single, predictions))
        results.append(result)
        print(json.dumps(result), flush=True)
    add_scaling(results, "records_per_s", "scaling_efficiency")
    add_scaling(results, "generate_records_per_s", "generate_scaling_efficiency")
    return results


# ---------------------------------------------------------------------------------------------------- main


def summary_table(results: list[dict[str, Any]]) -> str:
    """One row per measurement: the rate, its scaling efficiency, memory per rank, and how it ended."""
    rows = [("part", "case", "gpus", "rate", "scaling", "peak GPU GiB per rank", "result")]
    for r in results:
        if r.get("case") == "launch-check":
            rate, scaling, memory, outcome = (
                "",
                "",
                "",
                f"{'torchrun' if r['torchrun'] else 'NOT torchrun'}: {r['command']}",
            )
        else:
            if r.get("tokens_per_s") is not None and r["part"] != "infer":
                rate = f"{r['tokens_per_s']:,.0f} tok/s"
            elif r.get("records_per_s") is not None:
                rate = f"{r['records_per_s']:.2f} rec/s (gen {r.get('generate_records_per_s') or '?'})"
            else:
                rate = "-"
            scaling = f"{r['scaling_efficiency']:.0%}" if r.get("scaling_efficiency") is not None else "-"
            if r.get("generate_scaling_efficiency") is not None:
                scaling += f" (gen {r['generate_scaling_efficiency']:.0%})"
            per_rank = r.get("peak_gpu_mem_gib_per_rank") or []
            memory = " ".join("-" if v is None else f"{v:.1f}" for v in per_rank) or "-"
            if "exactly_once" in r:
                outcome = "every id exactly once" if r["exactly_once"] else "IDS WRONG"
                if "same_predictions_as_1_worker" in r:
                    outcome += f"; {r['same_predictions_as_1_worker']}/{r['records']} as 1 worker"
            else:
                outcome = r.get("status") or ""
            for key in ("out_of_memory", "skipped", "error", "note"):
                if r.get(key):
                    outcome = f"{outcome}; {key}: {str(r[key])[:90]}" if outcome else f"{key}: {str(r[key])[:90]}"
            outcome = outcome or "ok"
        rows.append((r["part"], r["case"], str(r["gpus"]), rate, scaling, memory, outcome))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:6], widths)) + "  " + row[6] for row in rows)


def header(part: str, counts: list[int], skipped: list[int], device: str) -> dict[str, Any]:
    import torch
    import transformers

    try:
        import deepspeed

        ds_version: str | None = deepspeed.__version__
    except ImportError:
        ds_version = None
    cuda = device == "cuda"
    return {
        "bench": "multi_gpu",
        "part": part,
        "device": device,
        "gpus_visible": torch.cuda.device_count() if cuda else 0,
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "counts": counts,
        "counts_skipped": skipped,
        "no_multicast_env": NO_MULTICAST_ENV,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": ds_version,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--part", choices=[*PARTS, "all"], help="what to measure (all: smoke tests)")
    parser.add_argument("--gpus", default="1,2,4", help="comma list of GPU (process) counts")
    parser.add_argument(
        "--sizes", default=None, help="1.3b, 7b or tiny (default: zero2-full 7b, lora-dp and infer 1.3b)"
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--work", default=str(ROOT / "outputs" / "bench-train"), help="models, data and runs")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file too")
    parser.add_argument("--mixed", default="none,zero3", help="lora-dp mixed-batch runs: none (DDP), zero2, zero3")
    parser.add_argument("--mixed-steps", type=int, default=200, help="steps of each mixed-batch run (0: none)")
    parser.add_argument("--hang-timeout", type=int, default=240, help="seconds before a mixed-batch run is stopped")
    parser.add_argument("--case-timeout", type=int, default=420, help="seconds before a scaling case is stopped")
    parser.add_argument("--rank-child", default=None, help=argparse.SUPPRESS)  # internal: one rank of a case
    parser.add_argument("--build-model", default=None, help=argparse.SUPPRESS)  # internal: build a random model
    args = parser.parse_args(argv)

    if args.rank_child:
        return rank_child(json.loads(args.rank_child))
    work = Path(args.work).resolve()
    if args.build_model:
        tb.build_model(args.build_model, args.sizes, work / "models" / f"{args.sizes}-{args.build_model}", args.device)
        return 0
    if args.part is None:
        parser.error("--part is required: zero2-full, lora-dp, infer or all")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible; use --device cpu --sizes tiny for a smoke test")
    # Children inherit this too, including any a product code path starts without passing it on.
    os.environ.update(NO_MULTICAST_ENV)
    asked = sorted({int(n) for n in args.gpus.split(",")})
    limit = torch.cuda.device_count() if args.device == "cuda" else (os.cpu_count() or 1)
    counts = [n for n in asked if n <= limit]
    skipped = [n for n in asked if n > limit]
    sizes = args.sizes.split(",") if args.sizes else None
    parts = list(PARTS) if args.part == "all" else [args.part]
    print(json.dumps(header(args.part, counts, skipped, args.device)), flush=True)
    if skipped:
        print(
            f"note: skipping {skipped}: only {limit} {'GPU(s)' if args.device == 'cuda' else 'CPU cores'}", flush=True
        )
    results: list[dict[str, Any]] = []
    for part in parts:
        tiny = sizes is not None and "tiny" in sizes
        size_archs = (
            [("tiny", a) for a in DEFAULT_ARCHS[part]] if tiny else [(a, a) for a in sizes or DEFAULT_ARCHS[part]]
        )
        if part == "zero2-full":
            for row in launch_check(counts):
                results.append(row)
                print(json.dumps(row), flush=True)
            for size, arch in size_archs:
                results += scaling_part(part, [zero2_case(arch)], size, counts, work, args.device, args.case_timeout)
        elif part == "lora-dp":
            for size, arch in size_archs:
                results += scaling_part(part, [lora_case(arch)], size, counts, work, args.device, args.case_timeout)
            size, arch = size_archs[0]
            if args.mixed_steps and counts:
                for mode in [m for m in args.mixed.split(",") if m]:
                    deepspeed = None if mode == "none" else mode
                    row = mixed_run(
                        arch, size, max(counts), deepspeed, args.mixed_steps, work, args.device, args.hang_timeout
                    )
                    results.append(row)
                    print(json.dumps(row), flush=True)
        else:
            for size, arch in size_archs:
                if arch != "1.3b":
                    print(f"note: the infer part uses the 1.3b, not {arch}", flush=True)
                    continue
                results += infer_part(size, counts, work, args.device)
    print("\n== multi-GPU benchmark ==")
    print(summary_table(results))
    if args.out:
        with Path(args.out).open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    failed = any("error" in r or r.get("exactly_once") is False or r.get("torchrun") is False for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
