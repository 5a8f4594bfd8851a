"""The 7b's SAM tower alone: transformers' attention (dense relative-position bias) against the folded one, eager and
compiled (`sam_compile`).

SAM-B at 1,024 px as the released deepseek-vl-7b-chat configures it (vlmops.testing.architectures), random weights
drawn at a sane scale (the config's own init leaves the convolutions near 1e-10, which would make every output ~0
and hide any difference), no gradients. For each `infer/train.sam_attention` setting (folded also compiled): milliseconds per batch
of images and peak GPU memory; then how far each bf16 result is from the float32 result of transformers' attention
(the reference), on two images.

    python bench/sam_bench.py --images 8 --out bench/results/sam-$(date +%F).json

Prints a table; `--out` writes the rows as JSON (date, machine, command, figures; sdpa is the same-run baseline).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.results_file import write_results  # noqa: E402
from vlmops.models.sam_attention import set_sam_attention, set_sam_compiled  # noqa: E402
from vlmops.testing.architectures import architecture_config  # noqa: E402

SETTINGS = ("sdpa", "folded", "folded-compiled")


def use(model: Any, setting: str) -> None:
    """The tower's attention as `setting` names it, compiled for folded-compiled (as the VLM's
    `high_res_vision_model`, where `set_sam_compiled` finds it)."""
    set_sam_attention(model, setting.removesuffix("-compiled"))
    holder = torch.nn.Module()
    holder.high_res_vision_model = model
    set_sam_compiled(holder, setting.endswith("-compiled"))


def sam_tower(device: str) -> Any:
    """SAM-B of the released 7b, float32, every weight matrix and table drawn at random."""
    from transformers import SamVisionModel

    config = architecture_config("deepseek-vl-7b-chat").high_res_vision_config
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = SamVisionModel(config).to(device).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, param[0].numel() ** -0.5)
        for module in model.modules():
            if getattr(module, "use_rel_pos", False):
                module.rel_pos_h.normal_(0.0, 0.5)
                module.rel_pos_w.normal_(0.0, 0.5)
    return model


def timed(model: Any, pixels: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Milliseconds per forward over `pixels` and the peak GiB allocated, after a warm-up."""
    with torch.no_grad():
        for _ in range(2):
            model(pixel_values=pixels)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            model(pixel_values=pixels)
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeats, torch.cuda.max_memory_allocated() / 2**30


def errors(model: Any, device: str) -> dict[str, float]:
    """Mean |output - reference| / mean |reference| for each setting in bf16 (and folded in float32), on two images;
    the reference is transformers' attention in float32 without TF32."""
    pixels = torch.randn(2, 3, 1024, 1024, device=device)
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    outputs: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for dtype in (torch.float32, torch.bfloat16):
                model.to(dtype)
                for setting in SETTINGS:
                    use(model, setting)
                    out = model(pixel_values=pixels.to(dtype)).last_hidden_state
                    outputs[f"{setting}-{str(dtype).removeprefix('torch.')}"] = out.double()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
        model.to(torch.float32)
    reference = outputs.pop("sdpa-float32")
    scale = reference.abs().mean().item()
    return {name: round((out - reference).abs().mean().item() / scale, 5) for name, out in outputs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="images per forward (a training micro-batch: 8)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    model = sam_tower("cuda")
    error = errors(model, "cuda")
    model.to(torch.bfloat16)
    pixels = torch.randn(args.images, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    rows = []
    for setting in SETTINGS:
        use(model, setting)
        ms, peak = timed(model, pixels, args.repeats)
        rows.append(
            {
                "setting": setting,
                "images": args.images,
                "ms": round(ms, 2),
                "ms_per_image": round(ms / args.images, 2),
                "peak_allocated_gib": round(peak, 2),
                "bf16_error": error[f"{setting}-bfloat16"],
            }
        )
    for row in rows[1:]:
        row["speedup_vs_sdpa"] = round(rows[0]["ms"] / row["ms"], 2)
    print(f"SAM-B, {args.images} images at 1,024 px, bf16; error: mean |out - fp32 sdpa| / mean |fp32 sdpa|")
    print("| setting | ms | ms/image | peak GiB | bf16 error |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['setting']} | {row['ms']} | {row['ms_per_image']} | {row['peak_allocated_gib']} | {row['bf16_error']} |"
        )
    for setting in SETTINGS[1:]:
        print(f"{setting} in float32: {error[f'{setting}-float32']} (against transformers' float32)")
    if args.out:
        machine = f"{torch.cuda.get_device_name()} ({platform.node()})"
        errors_fp32 = {setting: error[f"{setting}-float32"] for setting in SETTINGS[1:]}
        write_results(args.out, machine, rows, float32_errors=errors_fp32)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
