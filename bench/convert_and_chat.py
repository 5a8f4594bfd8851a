"""GPU benchmark: released DeepSeek-VL architectures with random weights, one two-image chat turn each, and
the conversion of a full-size random 7b checkpoint in the original release layout.

    python bench/convert_and_chat.py                      # 1.3b and 7b on CUDA, bf16; 7b conversion
    python bench/convert_and_chat.py --sizes tiny         # CPU smoke test with the tiny configs
    python bench/convert_and_chat.py --sizes 7b --skip-convert

What it measures, per size: parameters of the native model next to those of the released checkpoint (which
also carries SigLIP's unused attention-pool head and two unused layer norms), build time, prefill time of the
two-image prompt up to the first token, decode speed (greedy, exactly --new-tokens tokens), and peak GPU
memory. The prompt comes
from `vlmops.models.template.encode` with the tiny tokenizer: its ids are valid in the 102400-token
vocabulary, and with random weights the words do not matter.

The conversion part writes random original-layout safetensors shards (4 GB each, drawn on the GPU) into
--workdir, converts them with `convert_checkpoint` (streamed; the verification load on CPU is part of its
time), then loads the result onto the GPU. Memory: about 15 GB of host RAM for the verification load,
2 x 15 GB of disk, 16 GB of GPU memory; the chat models are freed first.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlmops.data.conversation import ImageRef, Message
from vlmops.models.catalog import get_entry
from vlmops.models.convert import convert_checkpoint
from vlmops.models.template import IMAGE_TOKEN, encode
from vlmops.models.tiny import build_tokenizer
from vlmops.testing.architectures import architecture_config
from vlmops.testing.fake_release import (
    original_shapes,
    release_config,
    tiny_release_config,
    write_original_checkpoint,
)

SIZES = {"1.3b": "deepseek-vl-1.3b-chat", "7b": "deepseek-vl-7b-chat"}
TINY = {"tiny": "tiny-deepseek-vl", "tiny-hybrid": "tiny-deepseek-vl-hybrid"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1.3b,7b", help="1.3b,7b or tiny (the two tiny configs)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate per chat turn")
    parser.add_argument("--skip-convert", action="store_true", help="no conversion benchmark")
    parser.add_argument("--workdir", default=None, help="local disk folder for the checkpoints (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    parser.add_argument("--convert-method", choices=["streaming", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--dst", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.convert_method:
        convert_once(args.convert_method, Path(args.src), Path(args.dst))
        return 0

    tiny = args.sizes == "tiny"
    names = list(TINY.values()) if tiny else [SIZES[s.strip()] for s in args.sizes.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not tiny and device.type != "cuda":
        print("error: the released sizes need a GPU; use --sizes tiny to smoke-test on CPU", file=sys.stderr)
        return 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    workdir = Path(tempfile.mkdtemp(prefix="vlmops-bench-", dir=args.workdir))
    tokenizer = _tokenizer(workdir)

    chats = [chat_turn(name, tokenizer, device, dtype, args.new_tokens) for name in names]
    conversion = None
    if not args.skip_convert:
        conversion = convert_7b(workdir, device, dtype, tiny)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print_results(device, dtype, chats, conversion)
    return 0


def _tokenizer(workdir: Path) -> Any:
    from transformers import AutoTokenizer

    build_tokenizer(workdir / "tokenizer")
    return AutoTokenizer.from_pretrained(workdir / "tokenizer")


def _image_processor(config: Any) -> Any:
    """The released preprocessing at the config's resolutions (mean = std = 0.5; SAM input: CLIP's)."""
    from transformers import DeepseekVLHybridImageProcessorPil, DeepseekVLImageProcessorPil
    from transformers.image_utils import PILImageResampling

    low = config.vision_config.image_size
    half = [0.5, 0.5, 0.5]
    if config.model_type == "deepseek_vl":
        return DeepseekVLImageProcessorPil(size={"height": low, "width": low}, image_mean=half, image_std=half)
    high = config.high_res_vision_config.image_size
    return DeepseekVLHybridImageProcessorPil(
        size={"height": low, "width": low},
        image_mean=half,
        image_std=half,
        high_res_size={"height": high, "width": high},
        high_res_image_mean=[0.48145466, 0.4578275, 0.40821073],
        high_res_image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=PILImageResampling.BILINEAR,
        high_res_resample=PILImageResampling.BICUBIC,
    )


def _images() -> dict[str, Any]:
    from PIL import Image, ImageDraw

    first = Image.new("RGB", (640, 480), "white")
    ImageDraw.Draw(first).ellipse((120, 80, 480, 400), fill="red")
    second = Image.new("RGB", (480, 640), "black")
    ImageDraw.Draw(second).rectangle((60, 100, 400, 560), fill="blue")
    return {"first.png": first, "second.png": second}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def chat_turn(name: str, tokenizer: Any, device: torch.device, dtype: torch.dtype, new_tokens: int) -> dict[str, Any]:
    """Build `name`'s architecture with random weights and answer one two-image question."""
    from transformers import AutoModelForImageTextToText

    config: Any = architecture_config(name)
    # The tiny tokenizer's ids (< 640) stand in for the released tokenizer's: set its special ids.
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config.text_config, key, getattr(tokenizer, key))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with device:
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    _sync(device)
    build_s = time.perf_counter() - started

    vision = config.vision_config
    num_image_tokens = (vision.image_size // vision.patch_size) ** 2
    messages = [Message("user", [ImageRef("first.png"), ImageRef("second.png"), "What differs between the two?"])]
    encoded = encode(messages, tokenizer, num_image_tokens, add_generation_prompt=True)
    images = _images()
    pixels = _image_processor(config)([images[ref.uri] for ref in encoded.images], return_tensors="pt")
    inputs = {k: v.to(device=device, dtype=dtype) for k, v in pixels.items()}
    input_ids = torch.tensor([encoded.input_ids], device=device)
    inputs.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))

    pad_id = tokenizer.pad_token_id
    with torch.no_grad():
        _timed_generate(model, inputs, 2, pad_id, device)  # warm-up: kernels, allocator
        first_s, _ = _timed_generate(model, inputs, 1, pad_id, device)  # vision towers, prefill, one token
        generate_s, generated = _timed_generate(model, inputs, new_tokens, pad_id, device)
        chat = _product_chat_turn(model, config, tokenizer, new_tokens)
    result = {
        "name": name,
        **chat,
        "params": sum(p.numel() for p in model.parameters()),
        "release_params": _release_params(name),
        "catalog_params": get_entry(name).params,
        "build_s": build_s,
        "prompt_tokens": input_ids.shape[1],
        "first_token_ms": first_s * 1e3,
        "new_tokens": generated,
        "decode_ms_per_token": (generate_s - first_s) * 1e3 / max(generated - 1, 1),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
    }
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _product_chat_turn(model: Any, config: Any, tokenizer: Any, new_tokens: int) -> dict[str, Any]:
    """The same question through the product path: `ChatModel.chat` with two PNG files on disk."""
    from transformers import DeepseekVLHybridProcessor, DeepseekVLProcessor

    from vlmops.config import InferConfig
    from vlmops.infer.chat import ChatModel
    from vlmops.models.loading import LoadedModel

    hybrid = config.model_type == "deepseek_vl_hybrid"
    vision = config.vision_config
    processor_cls = DeepseekVLHybridProcessor if hybrid else DeepseekVLProcessor
    processor = processor_cls(
        image_processor=_image_processor(config),
        tokenizer=tokenizer,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
    )
    folder = Path(tempfile.mkdtemp(prefix="chat-"))
    for file, image in _images().items():
        image.save(folder / file)
    chat = ChatModel(LoadedModel(model, processor, folder, hybrid), infer_cfg=InferConfig(max_new_tokens=new_tokens))
    query = f"<img>{folder / 'first.png'}</img><img>{folder / 'second.png'}</img>What differs between the two?"
    chat.chat(query)  # warm-up
    times, answer = [], ""
    for _ in range(3):
        _sync(model.device)
        started = time.perf_counter()
        answer, history = chat.chat(query)
        _sync(model.device)
        times.append(time.perf_counter() - started)
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "chat_s": sorted(times)[1],
        "chat_tokens": len(tokenizer.encode(answer, add_special_tokens=False)),
        "chat_history_ok": len(history) == 1 and history[0][0] == query,
    }


def _timed_generate(
    model: Any,
    inputs: dict[str, torch.Tensor],
    tokens: int,
    pad_id: int,
    device: torch.device,
    repeats: int = 3,
) -> tuple[float, int]:
    """Median seconds of a greedy generate of exactly `tokens` new tokens, and how many it produced."""
    times = []
    produced = 0
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        out = model.generate(
            **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad_id
        )
        _sync(device)
        times.append(time.perf_counter() - started)
        produced = out.shape[1] - inputs["input_ids"].shape[1]
    return sorted(times)[len(times) // 2], produced


def _release_params(name: str) -> int:
    entry = get_entry(name)
    config = tiny_release_config(entry.arch) if entry.tiny_variant else release_config(entry.arch)
    return sum(_numel(shape) for shape in original_shapes(config).values())


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def convert_7b(workdir: Path, device: torch.device, dtype: torch.dtype, tiny: bool) -> dict[str, Any]:
    """Write a random original-layout 7b (or the tiny hybrid), convert it, load the result on `device`."""
    from transformers import DeepseekVLHybridForConditionalGeneration

    config = tiny_release_config("deepseek_vl_hybrid") if tiny else release_config("deepseek_vl_hybrid")
    original, converted = workdir / "original-7b", workdir / "converted-7b"
    started = time.perf_counter()
    write_original_checkpoint(
        original,
        config,
        dtype=torch.bfloat16,
        shard_bytes=4 * 10**9,
        device="cuda" if device.type == "cuda" else "cpu",
    )
    write_s = time.perf_counter() - started
    original_bytes = sum(f.stat().st_size for f in original.glob("*.safetensors"))

    # Each conversion runs in its own process so its peak host memory is its own.
    report = _convert_in_subprocess("streaming", original, converted)  # includes the verification load on CPU
    baseline = _convert_in_subprocess("naive", original, workdir / "naive-7b")
    shutil.rmtree(workdir / "naive-7b", ignore_errors=True)

    started = time.perf_counter()
    loaded: Any = DeepseekVLHybridForConditionalGeneration.from_pretrained(
        converted, dtype=dtype, device_map=str(device), output_loading_info=True
    )
    model, info = loaded
    _sync(device)
    load_s = time.perf_counter() - started
    keys_ok = not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "original_gb": original_bytes / 1e9,
        "original_shards": len(list(original.glob("model-*.safetensors"))),
        "write_s": write_s,
        "convert_s": report["seconds"],
        "convert_rss_gb": report["peak_rss_gb"],
        "naive_s": baseline["seconds"],
        "naive_rss_gb": baseline["peak_rss_gb"],
        "tensors_in": report["tensors_in"],
        "tensors_out": report["tensors_out"],
        "dropped": report["dropped"],
        "shards_out": report["shards"],
        "converted_gb": report["bytes_written"] / 1e9,
        "load_s": load_s,
        "params": params,
        "keys_ok": keys_ok,
    }


def _convert_in_subprocess(method: str, src: Path, dst: Path) -> dict[str, Any]:
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, "--convert-method", method, "--src", str(src), "--dst", str(dst)],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def convert_once(method: str, src: Path, dst: Path) -> dict[str, Any]:
    """One conversion; `naive` is what a hand-written script does: every tensor in memory, one save."""
    import json
    import resource

    from safetensors.torch import load_file, save_file

    from vlmops.models.convert import convert_tensor

    started = time.perf_counter()
    if method == "streaming":
        report = convert_checkpoint(src, dst)
        result = {
            "tensors_in": report.tensors_in,
            "tensors_out": report.tensors_out,
            "dropped": len(report.dropped),
            "shards": report.shards,
            "bytes_written": report.bytes_written,
        }
    else:
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(src.glob("*.safetensors")):
            state.update(load_file(shard))
        arch = "deepseek_vl_hybrid" if any("vision_tower_high" in k for k in state) else "deepseek_vl"
        converted = {}
        for key, tensor in state.items():
            for new_key, new_tensor in convert_tensor(key, tensor, arch):  # type: ignore[arg-type]
                converted[new_key] = new_tensor.contiguous()
        dst.mkdir(parents=True, exist_ok=True)
        save_file(converted, dst / "model.safetensors")
        result = {"tensors_in": len(state), "tensors_out": len(converted), "bytes_written": 0}
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps(result))
    return result


def print_results(
    device: torch.device, dtype: torch.dtype, chats: list[dict[str, Any]], conversion: dict[str, Any] | None
) -> None:
    import transformers

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print("\n=== vlmops bench: convert_and_chat ===")
    print(
        f"device {gpu} | torch {torch.__version__} | transformers {transformers.__version__} | "
        f"{str(dtype).split('.')[-1]}"
    )
    header = (
        f"{'model':<26}{'params':>15}{'release ckpt':>15}{'build s':>9}{'prompt':>8}"
        f"{'1st tok ms':>12}{'new tok':>9}{'ms/tok':>8}{'peak GiB':>10}"
    )
    print(header)
    for c in chats:
        print(
            f"{c['name']:<26}{c['params']:>15,}{c['release_params']:>15,}{c['build_s']:>9.1f}{c['prompt_tokens']:>8}"
            f"{c['first_token_ms']:>12.1f}{c['new_tokens']:>9}{c['decode_ms_per_token']:>8.1f}{c['peak_gib']:>10.2f}"
        )
        if c["params"] != c["catalog_params"] and c["catalog_params"]:
            print(f"  ! {c['name']}: catalog says {c['catalog_params']:,} parameters")
    for c in chats:
        print(
            f"  {c['name']}: ChatModel.chat() with two PNG files, end to end: {c['chat_s'] * 1e3:.0f} ms for "
            f"{c['chat_tokens']} answer tokens (greedy, random weights; EOS may come early); "
            f"history {'ok' if c['chat_history_ok'] else 'WRONG'}"
        )
    print("  params: native model; release ckpt: every tensor of the original checkpoint (incl. dropped ones)")
    print("  1st tok: generate(max_new_tokens=1) (vision towers + prefill); ms/tok: each further greedy token")
    if conversion is not None:
        c = conversion
        print(
            f"convert 7b: wrote {c['original_gb']:.1f} GB original in {c['original_shards']} shard(s) "
            f"in {c['write_s']:.0f}s\n"
            f"  converted {c['tensors_in']} tensors -> {c['tensors_out']} ({c['dropped']} dropped), "
            f"{c['converted_gb']:.1f} GB in {c['shards_out']} shard(s) in {c['convert_s']:.0f}s, peak host RSS "
            f"{c['convert_rss_gb']:.1f} GB (streamed; the verification load on CPU included)\n"
            f"  baseline (every tensor in memory, one save_file, no verification): {c['naive_s']:.0f}s, "
            f"peak host RSS {c['naive_rss_gb']:.1f} GB\n"
            f"  loaded on {device.type} in {c['load_s']:.0f}s: {c['params']:,} params, "
            f"keys {'ok' if c['keys_ok'] else 'MISMATCH'}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
