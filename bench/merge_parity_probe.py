"""How far a correct LoRA merge moves a real-size model's logits in bf16, against how far a wrong one does.

The merge step proves a merge by comparing logits on a fixed batch (vlmops.train.merge). This probe builds a random
model with the released architecture (bf16 weights), puts a LoRA adapter of a trained size on it (every linear layer
of the language model, rank 16, B drawn so that the adapter moves the weights about as training does), and measures
on the merge step's own batch (`parity_batch`):

- in bf16, as the merge step compared before: the merged model against the adapter on its base (a correct merge),
  and the base alone against the adapter on its base (the adapter lost: a wrong merge);
- in float32, as it compares now: the merged model against the adapter on its base (the merge itself), and the
  folder written in bf16 and loaded back against the merged model with its weights rounded to bf16 (what was
  written).

The base is written to `--work` once and loaded from there in each dtype, as the merge step loads a base.

    python bench/merge_parity_probe.py --model 1.3b --device cpu --out bench/results/merge-parity.json

Prints a table and writes its rows as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.infer_bench import build_random  # noqa: E402
from bench.results_file import gpu_machine, write_results  # noqa: E402
from vlmops.train.merge import PARITY_ATOL, batch_logits, load_plain, parity_batch, round_weights  # noqa: E402

OLD_BF16_ATOL = 5e-2
"""The merge step's default tolerance for 16-bit weights before it compared in float32."""
LORA_RANK = 16
B_STD = 2.3e-3
"""With A as peft draws it (std ~1/sqrt(fan-in)) and scaling 2, the adapter's update has a std of ~4e-4 per weight,
2% of the weights' 0.02: about what a few epochs of LoRA training leave."""


def add_adapter(model: Any, seed: int) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, B_STD)
    return peft_model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def probe(model_size: str, device: str, work: Path) -> tuple[list[dict[str, Any]], float]:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    started = time.perf_counter()
    loaded = build_random(model_size, "real", work, device)
    batch = parity_batch(loaded.processor)
    base_dir = work / "base"
    loaded.model.save_pretrained(base_dir)  # loaded back as the merge step loads a base: from disk, in each dtype
    del loaded
    dev = torch.device(device)

    # bf16, as the merge step compared before
    peft16 = add_adapter(load_plain(base_dir, torch.bfloat16, dev), seed=0)
    ref16 = batch_logits(peft16, batch)
    with peft16.disable_adapter():
        lost16 = batch_logits(peft16, batch)
    adapter = {k: v.float() for k, v in get_peft_model_state_dict(peft16).items()}
    merged16 = batch_logits(peft16.merge_and_unload(), batch)
    del peft16

    # float32, as it compares now: the same adapter on the same base
    peft32 = add_adapter(load_plain(base_dir, torch.float32, dev), seed=0)
    set_peft_model_state_dict(peft32, adapter)
    ref32 = batch_logits(peft32, batch)
    merged = peft32.merge_and_unload()
    merged32 = batch_logits(merged, batch)
    with tempfile.TemporaryDirectory(dir=work) as folder:
        round_weights(merged, torch.bfloat16)  # as merge_run does
        written = batch_logits(merged, batch)
        merged.to(torch.bfloat16).save_pretrained(folder)
        del merged
        reloaded = batch_logits(load_plain(Path(folder), torch.float32, dev), batch)

    scale = float(ref32.abs().max())
    rows = [
        ("bf16", "merged vs adapter on base (a correct merge)", max_diff(merged16, ref16), OLD_BF16_ATOL),
        ("bf16", "base alone vs adapter on base (the adapter lost)", max_diff(lost16, ref16), OLD_BF16_ATOL),
        ("float32", "merged vs adapter on base (the merge itself)", max_diff(merged32, ref32), PARITY_ATOL),
        ("float32", "folder written in bf16, reloaded, vs merged with its weights rounded to bf16",
         max_diff(reloaded, written), PARITY_ATOL),
    ]  # fmt: skip
    out = [
        {
            "model": model_size,
            "compared_in": dtype,
            "comparison": what,
            "max_abs_diff": diff,
            "share_of_max_logit": diff / scale,
            "tolerance": atol,
            "passes": diff <= atol,
        }
        for dtype, what, diff, atol in rows
    ]
    return out, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["1.3b", "7b"], default="1.3b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", default=None, help="a folder for the processor and the written checkpoint")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "merge-parity.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows, seconds = probe(args.model, args.device, work)
    print(f"\n{args.model}, random weights, LoRA rank {LORA_RANK} on every language-model linear ({seconds:.0f} s)\n")
    print("| compared in | comparison | max abs diff | share of the largest logit | tolerance | passes |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for row in rows:
        print(
            f"| {row['compared_in']} | {row['comparison']} | {row['max_abs_diff']:.3g} | "
            f"{row['share_of_max_logit']:.2%} | {row['tolerance']:g} | {row['passes']} |"
        )
    cpu = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, CPU)"
    machine = gpu_machine() if args.device == "cuda" else cpu
    write_results(args.out, machine, rows, seconds=seconds, lora_rank=LORA_RANK, b_std=B_STD)
    print(f"\nrows written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
