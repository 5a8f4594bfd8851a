"""Training benchmark: the real DeepSeek-VL architectures, random-initialised, trained by vlmops' own code.

Cases (compare with DESIGN.md §7, H100 80GB, bf16, SDPA):

  lora-qkv-7b            LoRA on the LLM's q/k/v, batch 4, gradient checkpointing: tokens/s and peak GPU
                         memory (goal: at most 20 GiB; the plain transformers + peft baseline: 5.4k tokens/s,
                         20.5 GiB)
  full-zero2-1.3b        full SFT (aligner + LLM, vision frozen) with `train.deepspeed: zero2` on one GPU: a run of
                         one process, which vlmops trains without DeepSpeed (ZeRO-2 would shard nothing)
  full-zero3-offload-7b  full SFT of the 7b on one GPU, ZeRO-3 with parameters and optimizer offloaded to
                         CPU: tokens/s, peak GPU memory and peak host RSS

Every sample has one image (576 image tokens) and about 512 text tokens (half prompt, half answer). Each
case runs in its own process (under torchrun, as `vlmops sft` runs DeepSpeed) through
`vlmops.train.sft.setup_training` and `Trainer.train` -- the code path of `train()` -- with evaluation and
checkpoint writing left out (a 7b full checkpoint with its optimizer state is ~100 GB). tokens/s counts
non-padding tokens (image tokens included) after the warm-up steps.

    python bench/train_bench.py                           # every case on the GPU
    python bench/train_bench.py --cases lora-qkv-7b
    python bench/train_bench.py --sizes tiny --device cpu  # smoke test: tiny models, no DeepSpeed on CPU
    python bench/train_bench.py --data realistic --packing true --attn flex_attention  # mixed lengths and images

Prints one JSON line per case (and appends them to --out). The random models and the synthetic dataset
are built once under --work and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.profiling import cpu_ops, cuda_kernels, gpu_time_summary, idle_gaps, op_tables  # noqa: E402 (after the path setup)
from bench.train_data import padding_fraction, random_batches  # noqa: E402

NUM_IMAGE_TOKENS = 576
PROMPT_TOKENS = 256  # + ANSWER_TOKENS: ~512 text tokens per sample (plus the system prompt and the template)
ANSWER_TOKENS = 256


@dataclass(frozen=True)
class Case:
    name: str
    arch: str  # "1.3b" or "7b"
    overrides: dict[str, Any]
    warmup_steps: int
    measured_steps: int
    baseline: bool = False  # a plain transformers + peft / PyTorch loop, as a user would write it


CASES = [
    # The product path (`setup_training` + the Trainer), with the speed levers it picks on a GPU by default.
    Case(
        "lora-qkv-7b",  # target: >= 12k tokens/s at a peak <= 20 GiB
        "7b",
        {
            "train.mode": "lora",
            "train.lora.targets": "qkv",
            "train.batch_size": 8,
            "train.memory_gib": 20,  # the policy picks the micro-batch and recompute
            "train.gradient_checkpointing": "auto",
        },
        warmup_steps=4,
        measured_steps=10,
    ),
    Case(
        "lora-qkv-7b-free",  # target: >= 17k tokens/s, memory free
        "7b",
        {
            "train.mode": "lora",
            "train.lora.targets": "qkv",
            "train.batch_size": 8,
            "train.gradient_checkpointing": "auto",
        },
        warmup_steps=4,
        measured_steps=10,
    ),
    Case(
        "lora-qkv-1.3b",  # target: >= 50k tokens/s at <= 16 GiB
        "1.3b",
        {
            "train.mode": "lora",
            "train.lora.targets": "qkv",
            "train.batch_size": 8,
            "train.memory_gib": 16,
            "train.gradient_checkpointing": "auto",
        },
        warmup_steps=4,
        measured_steps=12,
    ),
    Case(
        "full-7b",  # target: >= 7k tokens/s on one GPU, no offload
        "7b",
        {"train.mode": "full", "train.batch_size": 4, "train.gradient_checkpointing": "auto"},
        warmup_steps=3,
        measured_steps=6,
    ),
    Case(
        "same-learning-1.3b",  # 50 steps, loss curve against `same-learning-1.3b-reference`
        "1.3b",
        {
            "train.mode": "lora",
            "train.lora.targets": "qkv",
            "train.batch_size": 4,
            "train.gradient_checkpointing": False,
        },
        warmup_steps=5,
        measured_steps=45,
    ),
    Case(
        "same-learning-1.3b-reference",  # the same run with the GPU levers off: the HF Trainer's own path
        "1.3b",
        {
            "train.mode": "lora",
            "train.lora.targets": "qkv",
            "train.batch_size": 4,
            "train.gradient_checkpointing": False,
            "train.compile": "off",
            "train.fused_loss": "off",
        },
        warmup_steps=5,
        measured_steps=45,
    ),
    Case(
        "full-zero2-1.3b",
        "1.3b",
        {"train.mode": "full", "train.deepspeed": "zero2", "train.batch_size": 4, "train.gradient_checkpointing": True},
        warmup_steps=3,
        measured_steps=10,
    ),
    Case(
        "full-zero3-offload-7b",
        "7b",
        {
            "train.mode": "full",
            # `zero3-offload` (parameters and every optimizer state on the host) overran the 128 GiB host at
            # ~117 GiB; the partial preset keeps parameters and 30% of the optimizer on the GPU.
            "train.deepspeed": "zero3-offload-partial",
            "train.batch_size": 2,
            "train.gradient_checkpointing": True,
        },
        warmup_steps=1,
        measured_steps=3,
    ),
]
# Baselines, measured in the same run on the same data: a plain loop as a user writes it (DESIGN.md §7).
# - LoRA: transformers + peft, torch AdamW, the model's own loss over all logits.
# - full: fp32 master weights + bf16 autocast + torch AdamW (fused), no DeepSpeed.
# Each product case is compared with the baseline of its name; settings are the baseline's own.
BASELINES = {
    "lora-qkv-7b": Case(  # plain with checkpointing (DESIGN.md: 6.0k tokens/s at 20.5 GiB)
        "baseline-lora-qkv-7b", "7b", {"train.batch_size": 4, "train.gradient_checkpointing": True}, 3, 8, True
    ),
    "lora-qkv-7b-free": Case(  # plain without checkpointing, batch 4 (11.4k at 40.8 GiB)
        "baseline-lora-qkv-7b-free", "7b", {"train.batch_size": 4, "train.gradient_checkpointing": False}, 3, 8, True
    ),
    "lora-qkv-1.3b": Case(  # plain with checkpointing, batch 8 (23.0k at 14.9 GiB)
        "baseline-lora-qkv-1.3b", "1.3b", {"train.batch_size": 8, "train.gradient_checkpointing": True}, 3, 10, True
    ),
    "full-7b": Case(
        "baseline-full-7b",
        "7b",
        {"train.mode": "full", "train.batch_size": 4, "train.gradient_checkpointing": True},
        2,
        5,
        True,
    ),
    "full-zero2-1.3b": Case(
        "baseline-full-1.3b",
        "1.3b",
        {"train.mode": "full", "train.batch_size": 4, "train.gradient_checkpointing": True},
        3,
        10,
        True,
    ),
}
CASES += list(BASELINES.values())
TINY = {"1.3b": "deepseek_vl", "7b": "deepseek_vl_hybrid"}


def catalog_name(arch: str) -> str:
    return "deepseek-vl-7b-chat" if arch == "7b" else "deepseek-vl-1.3b-chat"


def architecture_config(arch: str) -> Any:
    from vlmops.testing.architectures import architecture_config as catalog_config

    return catalog_config(catalog_name(arch))


def build_model(arch: str, size: str, folder: Path, device: str) -> Path:
    """A random-initialised checkpoint folder (bf16 weights, processor with the released preprocessing)."""
    if (folder / "config.json").is_file():
        return folder
    if size == "tiny":
        from vlmops.models.tiny import build_tiny_model

        return build_tiny_model(folder, TINY[arch])  # type: ignore[arg-type]
    import torch
    from transformers import (
        AutoTokenizer,
        DeepseekVLForConditionalGeneration,
        DeepseekVLHybridForConditionalGeneration,
        DeepseekVLHybridProcessor,
        DeepseekVLProcessor,
    )

    from vlmops.models.template import IMAGE_TOKEN
    from vlmops.models.tiny import build_tokenizer
    from vlmops.testing.architectures import released_image_processor

    staging = folder.with_name(folder.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    # The released tokenizer is not reachable offline; the tiny BPE (640 ids, the same special tokens) fits
    # inside the 102400-token vocabulary and gives the same sequence lengths per word.
    build_tokenizer(staging)
    tokenizer = AutoTokenizer.from_pretrained(staging)
    config = architecture_config(arch)
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, key, getattr(tokenizer, key))
        setattr(config.text_config, key, getattr(tokenizer, key))
    cls = DeepseekVLHybridForConditionalGeneration if arch == "7b" else DeepseekVLForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config).to(torch.bfloat16)
    model.save_pretrained(staging)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the cases run in child processes: leave them the whole GPU
    processor_cls: Any = DeepseekVLHybridProcessor if arch == "7b" else DeepseekVLProcessor
    processor = processor_cls(
        released_image_processor(catalog_name(arch)), tokenizer, num_image_tokens=NUM_IMAGE_TOKENS
    )
    processor.save_pretrained(staging)
    staging.rename(folder)
    return folder


def build_dataset(
    folder: Path,
    model: Path,
    records: int,
    prompt_tokens: int = PROMPT_TOKENS,
    answer_tokens: int = ANSWER_TOKENS,
    text_only_share: float = 0.0,
) -> Path:
    """Synthetic records (one random-noise image + ~512 words) validated into a snapshot; returns its path.

    `prompt_tokens` / `answer_tokens` set the text lengths; `text_only_share` of the records (drawn at random,
    so they sit among the image records) have no image.
    """
    from PIL import Image
    from transformers import AutoProcessor

    from vlmops.models.tiny import _CORPUS_WORDS

    words = _CORPUS_WORDS.split()
    rng = random.Random(0)
    processor = AutoProcessor.from_pretrained(model)
    sample = " ".join(rng.choice(words) for _ in range(2000))
    tokens_per_word = len(processor.tokenizer.encode(sample, add_special_tokens=False)) / 2000
    prompt_words, answer_words = round(prompt_tokens / tokens_per_word), round(answer_tokens / tokens_per_word)
    shape = (prompt_tokens, answer_tokens, text_only_share) != (PROMPT_TOKENS, ANSWER_TOKENS, 0.0)
    raw = folder / (
        f"raw-{records}-p{prompt_tokens}-a{answer_tokens}-t{text_only_share}" if shape else f"raw-{records}"
    )
    if not (raw / "train.jsonl").is_file():
        (raw / "images").mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(records):
            image = raw / "images" / f"{i % 16:02d}.png"
            if not image.exists():
                pixels = bytes(rng.randrange(256) for _ in range(384 * 384 * 3))
                Image.frombytes("RGB", (384, 384), pixels).save(image)
            prompt = " ".join(rng.choice(words) for _ in range(prompt_words))
            answer = " ".join(rng.choice(words) for _ in range(answer_words))
            text_only = text_only_share > 0 and rng.random() < text_only_share
            user = prompt if text_only else f"<img>{image}</img>{prompt}"
            turns = [{"from": "user", "value": user}, {"from": "assistant", "value": answer}]
            lines.append(json.dumps({"conversations": turns}))
        (raw / "train.jsonl").write_text("\n".join(lines) + "\n")
        (raw / "eval.jsonl").write_text(lines[0] + "\n")
    return validated(raw, folder / "snapshots", processor)


def validated(raw: Path, snapshots: Path, processor: Any) -> Path:
    """raw/train.jsonl and raw/eval.jsonl validated into a snapshot under `snapshots`; returns its path."""
    from vlmops.config import load_config
    from vlmops.data.prepare import prepare_dataset

    data = load_config(None, {"data.max_length": 4096}).data
    snapshot = prepare_dataset(
        data, raw / "train.jsonl", raw / "eval.jsonl", snapshots, processor.tokenizer, processor.num_image_tokens
    )
    return snapshot.path


def build_realistic_dataset(folder: Path, model: Path, records: int) -> Path:
    """`--data realistic`: bench/train_data.py's mixed records validated into a snapshot; returns its path."""
    from transformers import AutoProcessor

    from bench.train_data import write_realistic_dataset

    processor = AutoProcessor.from_pretrained(model)
    raw = write_realistic_dataset(folder / f"realistic-{records}", processor, records)
    return validated(raw, folder / "snapshots", processor)


def with_warmup(case: Case, steps: int) -> Case:
    """`case` with `steps` warm-up steps (0: its own)."""
    return dataclasses.replace(case, warmup_steps=steps) if steps > 0 else case


def case_config(case: Case, device: str, packing: str = "auto", attn: str = "sdpa", extra: tuple[str, ...] = ()) -> Any:
    from vlmops.config import load_config

    overrides: dict[str, Any] = dict(case.overrides)
    overrides["train.packing"] = packing if packing == "auto" else packing == "true"
    overrides["model.attn"] = attn
    note = None
    if device == "cpu" and overrides.get("train.deepspeed"):
        note = f"DeepSpeed ({overrides['train.deepspeed']}) needs CUDA: this CPU smoke run goes without it"
        overrides["train.deepspeed"] = None
    never = 10**9  # no evaluation or checkpoint during the measurement
    overrides.update(
        {
            "train.max_steps": case.warmup_steps + case.measured_steps,
            "train.eval_steps": never,
            "train.save_steps": never,
            "train.lr": 1e-5,
            "data.max_length": 4096,
            "run.name": case.name,
            "train.resume": "never",  # a rerun of the bench on the same --work measures afresh
        }
    )
    for item in extra:  # --set KEY=VALUE, last: what the run is about
        key, _, value = item.partition("=")
        overrides[key] = value
    return load_config(None, overrides), note


def run_one(
    case: Case,
    model: Path,
    dataset: Path,
    run_dir: Path,
    device: str,
    packing: str = "auto",
    attn: str = "sdpa",
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One case in this process: the same setup as `train()`, then the Trainer's own loop."""
    import torch
    import transformers
    from transformers.trainer_utils import SaveStrategy

    from vlmops.train.sft import setup_training
    from vlmops.train.trainer import CheckpointPolicy

    config, note = case_config(case, device, packing, attn, extra)
    setup = setup_training(config, model, dataset, run_dir)
    trainer = setup.trainer
    trainer.remove_callback(CheckpointPolicy)  # it would evaluate and save at the last step
    # The Trainer also saves at the last step whenever a save strategy is set: a 7b DeepSpeed checkpoint with its
    # optimizer state is ~80 GB (the first 7b ZeRO-3 run trained its steps, then filled the disk writing it).
    trainer.args.save_strategy = SaveStrategy.NO
    profiler = _profiler(case.name, case.warmup_steps)
    if profiler:
        from transformers import TrainerCallback

        class _Profile(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                profiler.step(state.global_step)

        trainer.add_callback(_Profile())
    widths = record_widths(trainer)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - started
    args = trainer.args
    batching = setup.batching
    samples_per_step = batching.batch_size * args.gradient_accumulation_steps * args.world_size
    samples_per_s, tokens_per_s = setup.throughput.rates(samples_per_step, warmup_steps=case.warmup_steps)
    # Compiled layers are specialised per batch length: a length first seen after the warm-up compiles in the window.
    first_seen = first_width_steps(widths, args.gradient_accumulation_steps)
    compiled = setup.speed.compile_layers
    compiled_in_window = [step for step in first_seen if step > case.warmup_steps] if compiled else []
    steady = None
    if compiled_in_window and trainer.state.global_step - compiled_in_window[-1] >= MIN_STEADY_STEPS:
        steady = setup.throughput.rates(samples_per_step, warmup_steps=compiled_in_window[-1])[1]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    core = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    tokens_per_sample = trainer.state.num_input_tokens_seen / max(1, trainer.state.global_step * samples_per_step)
    lengths = setup.datasets["train"].lengths
    groups = getattr(trainer.train_dataset, "groups", None) or random_batches(len(lengths), batching.batch_size)
    return {
        "case": case.name,
        "arch": case.arch,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps": trainer.state.global_step,
        "measured_steps": case.measured_steps,
        "batch_size": batching.batch_size,
        "grad_accum": batching.grad_accum,
        "packing": batching.packing,
        "packing_tokens": batching.packing_tokens,
        "padding_fraction": round(
            padding_fraction(lengths, groups, batching.packing, getattr(trainer.data_collator, "packed_length", None)),
            4,
        ),
        "tokens_per_sample": round(tokens_per_sample, 1),
        "tokens_per_s": round(tokens_per_s, 1),
        "samples_per_s": round(samples_per_s, 3),
        "step_time_s": round(samples_per_step / samples_per_s, 3) if samples_per_s else None,
        # every step after the first: compiles (and other stalls) show as outliers, in the warm-up or not
        "step_times_s": [round(t, 3) for t in setup.throughput.step_seconds()],
        "batch_lengths_first_seen": {str(step): width for step, width in first_seen.items()},
        "compiled_in_window": compiled_in_window,
        # tokens/s over the steps after the last new length: what the rest of a long run goes at
        "steady_tokens_per_s": round(steady, 1) if steady else None,
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "trainable_params": setup.summary.trainable_params,
        "total_params": setup.summary.total_params,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses": [round(x, 5) for x in losses],
        "llm_params": llm_parameters(core),
        "speed": setup.speed.describe(),
        "vision_graphs": vision_graphs_state(core),
        "train_wall_s": round(wall, 1),
        "train_loss_mean": output.training_loss,
        "precision": setup.precision,
        "deepspeed": config.train.deepspeed,
        "gradient_checkpointing": batching.recompute,
        "activation_budget": batching.activation_budget,
        "settings": list(extra),
        "attn": getattr(core.config.text_config, "_attn_implementation", config.model.attn),  # the LLM's, as run
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **({"note": note} if note else {}),
    }


MIN_STEADY_STEPS = 4
"""A steady rate needs at least this many steps after the last new batch length."""


def record_widths(trainer: Any) -> list[int]:
    """The padded (or packed) length of every training micro-batch, in order, as the trainer computes its loss."""
    widths: list[int] = []
    compute_loss = trainer.compute_loss

    def recording(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if model.training:
            widths.append(int(inputs["input_ids"].shape[1]))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    return widths


def first_width_steps(widths: list[int], grad_accum: int) -> dict[int, int]:
    """{optimizer step (from 1): a micro-batch length first seen in it}, in step order."""
    first: dict[int, int] = {}
    seen: set[int] = set()
    for index, width in enumerate(widths):
        if width not in seen:
            seen.add(width)
            first.setdefault(index // grad_accum + 1, width)
    return first


def force_plan(spec: str) -> None:
    """`--plan`: make the memory policy return this split (this process only)."""
    from vlmops.train import batching
    from vlmops.train.memory import BatchPlan

    micro, accum, recompute, budget = spec.split(",")
    plan = BatchPlan(int(micro), int(accum), recompute == "1", None, 0.0, float(budget))
    batching.plan_batch = lambda *args, **kwargs: plan  # type: ignore[assignment]


def vision_graphs_state(core: Any) -> dict[str, Any] | None:
    """Whether the towers ran from graphs (`train.vision_graphs`) and how many were captured; None: eager towers."""
    graphs = getattr(getattr(core.model, "get_image_features", None), "graphs", None)
    return None if graphs is None else {"enabled": graphs.enabled, "captured": len(graphs.graphs)}


class StepProfiler:
    """`--profile`: torch.profiler over `steps` steps ending with the warm-up (outside the measured steps, where the
    warm-up is long enough; the profiler slows the steps it records); prints where the GPU's time went (busy and idle
    share of the wall time, kernel groups, the longest idle gaps and what the host did in them) and the top GPU ops."""

    def __init__(self, label: str, start: int, steps: int = 3):
        self.label, self.start, self.stop, self.prof = label, start, start + steps, None
        self.started = 0.0

    def step(self, step: int) -> None:
        """Call at the end of every optimizer step (1-based)."""
        import torch

        if step == self.start and self.prof is None:
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                record_shapes=True,
            )
            self.prof.__enter__()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()
        elif step == self.stop and self.prof is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall_us = (time.perf_counter() - self.started) * 1e6
            self.prof.__exit__(None, None, None)
            kernels = cuda_kernels(self.prof)
            summary = "\n".join(gpu_time_summary(kernels, wall_us) + idle_gaps(kernels, cpu_ops(self.prof)))
            table = op_tables(self.prof)
            print(
                f"PROFILE {self.label} (steps {self.start + 1}-{self.stop})\n{summary}\n{table}\nEND PROFILE",
                file=sys.stderr,
                flush=True,
            )
            self.prof = None


def _profiler(label: str, warmup: int) -> StepProfiler | None:
    """The profiler of a run, if asked for: its 3 steps are the warm-up's last (with at least 4 warm-up steps: the
    first compile the layers), else the first measured ones."""
    if not os.environ.get("VLMOPS_BENCH_PROFILE"):
        return None
    return StepProfiler(label, warmup - 3 if warmup >= 4 else warmup)


def llm_parameters(top: Any) -> int:
    """Parameters of the language model and its head: what the MFU's FLOPs per token count."""
    return sum(p.numel() for p in top.model.language_model.parameters()) + top.lm_head.weight.numel()


def flops_per_token(result: dict[str, Any]) -> float:
    """Model FLOPs per trained token of the language model: 2N forward, 2N input gradients, +2N weight gradients
    in full mode, +2N forward again under recompute. The frozen vision towers are left out (a lower bound)."""
    full = str(result.get("case", "")).startswith(("full", "baseline-full"))
    factor = 4 + (2 if full else 0) + (2 if result.get("gradient_checkpointing") else 0)
    return factor * float(result["llm_params"])


def matmul_peak_tflops() -> float:
    """bf16 matmul throughput of this GPU, measured now (8192-square GEMMs): the MFU's denominator."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(50):
        a @ b
    torch.cuda.synchronize()
    peak = 50 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return peak


def run_baseline(case: Case, model_dir: Path, dataset: Path, device: str) -> dict[str, Any]:
    """The same samples and batch size through a plain loop: what the vlmops path is measured against."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmops.data.formats import read_dataset
    from vlmops.train.data import SFTDataset, VisionLanguageCollator

    config, _ = case_config(case, device, "false")
    train = config.train
    full = train.mode == "full"
    processor = AutoProcessor.from_pretrained(model_dir)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result: dict[str, Any] = {"case": case.name, "arch": case.arch, "batch_size": train.batch_size}
    try:
        model: Any = AutoModelForImageTextToText.from_pretrained(
            model_dir, dtype=torch.float32 if full else torch.bfloat16, attn_implementation="sdpa"
        ).to(device)
        if full:
            for name, param in model.named_parameters():
                param.requires_grad = "vision" not in name  # vision towers frozen, as in the vlmops case
        else:
            lora = LoraConfig(
                r=train.lora.r,
                lora_alpha=train.lora.alpha,
                lora_dropout=train.lora.dropout,
                target_modules=r"model\.language_model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
            )
            model.enable_input_require_grads()
            model = get_peft_model(model, lora)
        if train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        data = SFTDataset(read_dataset(dataset / "train.jsonl").conversations, processor, 4096, "error")
        loader = DataLoader(
            data,
            batch_size=train.batch_size,
            shuffle=True,
            collate_fn=VisionLanguageCollator(pad_token_id=processor.tokenizer.pad_token_id),
        )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=train.lr, fused=full and cuda)
        marks: list[tuple[float, int]] = []
        losses: list[float] = []
        tokens = computed = 0
        profiler = _profiler(case.name, case.warmup_steps)
        for step, batch in enumerate(loader):
            if step == case.warmup_steps + case.measured_steps:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            for key in ("pixel_values", "high_res_pixel_values"):
                if key in batch:
                    batch[key] = batch[key].to(torch.float32 if full else torch.bfloat16)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=full):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            tokens += int(batch["attention_mask"].sum())
            computed += batch["input_ids"].numel()
            losses.append(round(float(loss), 5))
            marks.append((time.perf_counter(), tokens))
            if profiler:
                profiler.step(len(marks))
        (t0, n0), (t1, n1) = marks[case.warmup_steps - 1], marks[-1]
        result.update(
            tokens_per_s=round((n1 - n0) / (t1 - t0), 1),
            steps=len(marks),
            measured_steps=len(marks) - case.warmup_steps,
            trainable_params=sum(p.numel() for p in params),
            loss_last=float(loss),
            losses=losses,
            llm_params=llm_parameters(model.get_base_model() if hasattr(model, "get_base_model") else model),
            gradient_checkpointing=train.gradient_checkpointing,
            padding_fraction=round(1 - tokens / computed, 4),
            step_times_s=[round(b[0] - a[0], 3) for a, b in itertools.pairwise(marks)],
        )
    except torch.OutOfMemoryError as err:
        result["out_of_memory"] = str(err).splitlines()[0]
    result.update(
        peak_gpu_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        peak_host_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        device=torch.cuda.get_device_name() if cuda else "cpu",
    )
    return result


TARGETS = {  # tokens/s at most this peak GiB (None: memory free); issue 12
    "lora-qkv-7b": (12_000, 20.0),
    "lora-qkv-7b-free": (17_000, None),
    "lora-qkv-1.3b": (50_000, 16.0),
    "full-7b": (7_000, None),
}


def summarise(results: list[dict[str, Any]], peak: float | None) -> list[dict[str, Any]]:
    """Each result with its MFU, and for product cases the same-run baseline, the speed-up and the target."""
    by_name = {r["case"]: r for r in results}
    for r in results:
        if peak and r.get("tokens_per_s") and r.get("llm_params"):
            r["mfu"] = round(r["tokens_per_s"] * flops_per_token(r) / (peak * 1e12), 3)
        base = BASELINES.get(r["case"])
        if base is not None and base.name in by_name and by_name[base.name].get("tokens_per_s"):
            b = by_name[base.name]
            r["baseline"] = base.name
            r["baseline_tokens_per_s"] = b["tokens_per_s"]
            r["baseline_peak_gpu_mem_gib"] = b.get("peak_gpu_mem_gib")
            r["speedup"] = round(r.get("tokens_per_s", 0) / b["tokens_per_s"], 2)
        if r["case"] in TARGETS and r.get("tokens_per_s"):
            rate, memory = TARGETS[r["case"]]
            met = r["tokens_per_s"] >= rate and (memory is None or (r.get("peak_gpu_mem_gib") or 0) <= memory)
            r["target"] = f">= {rate} tokens/s" + (f" at <= {memory:g} GiB" if memory else "")
            r["target_met"] = met
    fast, ref = by_name.get("same-learning-1.3b"), by_name.get("same-learning-1.3b-reference")
    if fast and ref and fast.get("losses") and ref.get("losses"):
        pairs = list(zip(fast["losses"], ref["losses"], strict=False))
        fast["loss_curve_max_abs_diff"] = round(max(abs(a - b) for a, b in pairs), 4)
        fast["loss_curve_max_rel_diff"] = round(max(abs(a - b) / abs(b) for a, b in pairs), 4)
    return results


def table(rows: list[dict[str, Any]], peak: float | None) -> str:
    head = (
        f"{'case':34} {'tokens/s':>9} {'peak GiB':>8} {'MFU':>5} {'pad':>5} {'baseline':>9} {'base GiB':>8} "
        f"{'x':>5}  target"
    )
    lines = [f"== train benchmark (matmul peak {peak or 0:.0f} TFLOP/s) ==", head]
    for r in rows:
        if "error" in r or "out_of_memory" in r:
            lines.append(f"{r['case']:34} {r.get('error') or 'out of memory'}")
            continue
        target = "" if "target" not in r else f"{r['target']}: {'met' if r['target_met'] else 'NOT met'}"
        if r.get("compiled_in_window"):
            steps = ", ".join(map(str, r["compiled_in_window"]))
            after = f"; {r['steady_tokens_per_s']:.0f} tokens/s after it" if r.get("steady_tokens_per_s") else ""
            target += f" (a new batch length compiled in the measured steps: step {steps}{after})"
        lines.append(
            f"{r['case']:34} {r.get('tokens_per_s', 0):>9.0f} {r.get('peak_gpu_mem_gib') or 0:>8.1f} "
            f"{r.get('mfu', 0):>5.2f} {r.get('padding_fraction') or 0:>5.2f} {r.get('baseline_tokens_per_s', 0):>9.0f} "
            f"{r.get('baseline_peak_gpu_mem_gib') or 0:>8.1f} {r.get('speedup', 0):>5.2f}  {target}"
        )
        if "loss_curve_max_abs_diff" in r:
            lines.append(
                f"{'':34} loss curve vs reference over {len(r['losses'])} steps: max |diff| "
                f"{r['loss_curve_max_abs_diff']} (relative {r['loss_curve_max_rel_diff']})"
            )
    return "\n".join(lines)


ENVIRONMENT = ("PYTORCH_CUDA_ALLOC_CONF", "TORCH_LOGS", "CUDA_VISIBLE_DEVICES")


def save(path: Path, argv: list[str], rows: list[dict[str, Any]], peak: float | None) -> None:
    import datetime
    import platform

    import torch

    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "host": platform.node(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpus": os.cpu_count(),
        },
        "command": "bench/train_bench.py " + " ".join(argv),
        # Settings from the environment that change the result (the command line does not show them).
        "environment": {k: os.environ[k] for k in ENVIRONMENT if k in os.environ},
        "matmul_peak_tflops": round(peak, 1) if peak else None,
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="1.3b,7b", help="comma list of 1.3b, 7b, or tiny (tiny stand-ins for every case)"
    )
    parser.add_argument("--child-logs", help="write each case's output (stdout and stderr) to DIR/CASE.log")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma list of case names")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--work", default=str(ROOT / "outputs" / "bench-train"), help="models, data and runs")
    parser.add_argument(
        "--out", default=None, help="write the results (date, machine, command, rows) to this JSON file"
    )
    parser.add_argument("--profile", action="store_true", help="print the top GPU ops of 3 steps per case")
    parser.add_argument(
        "--data",
        default="fixed",
        choices=["fixed", "realistic"],
        help="fixed: 1 image + ~512 text tokens per sample; "
        "realistic: 64-1,500 text tokens and 0-2 images, mixed (bench/train_data.py)",
    )
    parser.add_argument(
        "--packing", default="auto", choices=["auto", "true", "false"], help="train.packing of the vlmops cases"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="warm-up steps before the measured ones (0: each case's own); realistic data without packing compiles "
        "one graph per padded length (up to 16) and wants more",
    )
    parser.add_argument(
        "--attn",
        default="sdpa",
        choices=["sdpa", "flex_attention"],
        help="model.attn of the vlmops cases (the plain baselines use SDPA)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for the vlmops cases (repeatable), e.g. train.compile=off",
    )
    parser.add_argument(
        "--plan",
        default=None,
        metavar="MICRO,ACCUM,RECOMPUTE,BUDGET",
        help="instead of the memory policy's choice, this split for the vlmops cases (padded batches): samples per "
        "micro-batch, accumulation, full recompute (0/1), activation budget of selective recompute (1: none), "
        "e.g. 1,8,0,0.7; to measure what the policy weighs",
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run this case in this process
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        case = with_warmup(next(c for c in CASES if c.name == args.one), args.warmup)
        if case.baseline:
            result = run_baseline(case, Path(args.model), Path(args.dataset), args.device)
        else:
            if args.plan:
                force_plan(args.plan)
            result = run_one(
                case,
                Path(args.model),
                Path(args.dataset),
                Path(args.work) / "runs" / case.name,
                args.device,
                args.packing,
                args.attn,
                tuple(args.set),
            )
        result["data"] = args.data
        if args.plan and not case.baseline:
            result["forced_plan"] = args.plan
        print("BENCH_RESULT " + json.dumps(result), flush=True)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible; use --sizes tiny --device cpu for a smoke test")
    if args.profile:
        os.environ["VLMOPS_BENCH_PROFILE"] = "1"
    sizes = args.sizes.split(",")
    work = Path(args.work)
    results = []
    peak = matmul_peak_tflops() if args.device == "cuda" else None
    for case in [with_warmup(c, args.warmup) for c in CASES if c.name in args.cases.split(",")]:
        size = "tiny" if "tiny" in sizes else case.arch
        if size not in sizes:
            continue
        model = build_model(case.arch, size, work / "models" / f"{size}-{case.arch}", args.device)
        records = (case.warmup_steps + case.measured_steps) * int(case.overrides["train.batch_size"]) + 1
        if args.data == "realistic":
            dataset = build_realistic_dataset(work / "data" / f"{size}-{case.arch}", model, 2 * records)
        else:
            dataset = build_dataset(work / "data" / f"{size}-{case.arch}", model, records)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        child = [str(Path(__file__).resolve()), "--one", case.name, "--model", str(model), "--dataset", str(dataset)]
        child += ["--work", str(work), "--device", args.device, "--data", args.data, "--packing", args.packing]
        child += ["--attn", args.attn, "--warmup", str(args.warmup)]
        child += [arg for item in args.set for arg in ("--set", item)]
        child += ["--plan", args.plan] if args.plan else []
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        proc = subprocess.run([*launcher, *child], env=env, text=True, capture_output=True)
        if args.child_logs:  # e.g. with TORCH_LOGS=recompiles: why a step compiled
            folder = Path(args.child_logs)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{case.name}.log").write_text(proc.stdout + proc.stderr)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            result = {"case": case.name, "error": f"exit code {proc.returncode}", "log_tail": tail}
        else:
            result = json.loads(lines[-1][len("BENCH_RESULT ") :])
        results.append(result)
        if "PROFILE " in proc.stderr:
            profile = proc.stderr[proc.stderr.index("PROFILE ") :]
            print(profile[: profile.find("END PROFILE")], flush=True)
        print(json.dumps(result), flush=True)
    rows = summarise(results, peak)
    print(table(rows, peak))
    if args.out:
        save(Path(args.out), argv if argv is not None else sys.argv[1:], rows, peak)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
