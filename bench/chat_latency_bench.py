"""Chat on a GPU: each answer's wall time through `ChatModel` (vlmops) against a hand-written `model.generate`.

    python bench/chat_latency_bench.py --models 1.3b,7b --out bench/results/chat-latency-DATE.json

Each (model, way) runs in a fresh process, as a user's `vlmops infer` or chat page starts: a random-initialised
model with the released architecture (bf16), then the same turns in both ways:

  turn 1        an image and a question (the process's first answer)
  turn 2, 3     follow-ups in the same conversation (longer prompts: shapes not seen yet)
  turn 4        a new conversation, another image, turn 1's question (turn 1's shapes again)
  vision        the vision towers alone on one image, twice
  batch 32      `generate` over 32 one-image prompts, 128 new tokens, twice (first: new shapes; second: seen)

`generate` is what a user writes by hand and what vlmops ran before session 28: `model.generate` under inference
mode, with torch's default attention backends (on Hopper cuDNN's SDPA first, which builds a kernel graph for each
new attention shape). `vlmops` is `ChatModel.chat` and `vlmops.infer.generation.generate` (SDPA off cuDNN).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.infer_bench import build_random, make_requests, random_images
from bench.results_file import gpu_machine, write_results
from vlmops.config import InferConfig
from vlmops.infer.chat import ChatModel
from vlmops.infer.generation import (
    _CUDNN_ATTENTION_OFF,
    answer_tokens,
    decode_answer,
    generate,
    generation_config,
    model_inputs,
)
from vlmops.models.vision_graphs import image_features

QUESTIONS = ["Describe the picture in detail.", "What colours stand out, and where?", "Name every object you see."]
WAYS = ("generate", "vlmops")


def timed(fn: Any) -> tuple[Any, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def child(arch: str, way: str, new_tokens: int, work: Path) -> list[dict[str, Any]]:
    """The turns and the batch rows of one (model, way) in this process."""
    loaded = build_random(arch, "full", work, "cuda")
    infer_cfg = InferConfig(max_new_tokens=new_tokens)
    chat = ChatModel(loaded, system_prompt="", infer_cfg=infer_cfg)
    images = random_images(2, 1)
    paths = []
    for index, image in enumerate(images):
        paths.append(work / f"chat-{index}.png")
        image.save(paths[-1])

    def hand_written(query: str, history: list[list[str]]) -> tuple[str, int]:
        _turn, prompt, pil_images = chat._prompt(query, history, None, None)
        inputs = model_inputs(loaded, [prompt], pil_images)
        with torch.inference_mode():
            output = loaded.model.generate(**inputs, generation_config=generation_config(loaded, infer_cfg))
        tokens = answer_tokens(output[0, inputs["input_ids"].shape[1] :].tolist(), loaded.tokenizer.eos_token_id)
        return decode_answer(loaded, tokens), len(tokens)

    steps = [0]  # language-model head calls: one a generated token
    loaded.model.lm_head.register_forward_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))

    def answer(query: str, history: list[list[str]]) -> tuple[str, int, float]:
        steps[0] = 0
        if way == "generate":
            (text, _), seconds = timed(lambda: hand_written(query, history))
        else:
            (text, _), seconds = timed(lambda: chat.chat(query, history))
        return text, steps[0], seconds

    rows: list[dict[str, Any]] = []
    history: list[list[str]] = []
    turns = [(f"<img>{paths[0]}</img>{QUESTIONS[0]}", "turn 1"), (QUESTIONS[1], "turn 2"), (QUESTIONS[2], "turn 3")]
    for query, step in turns:
        text, count, seconds = answer(query, history)
        history.append([query, text])
        rows.append({"step": step, "seconds": round(seconds, 3), "tokens": count})
    _, count, seconds = answer(f"<img>{paths[1]}</img>{QUESTIONS[0]}", [])
    rows.append({"step": "turn 4", "seconds": round(seconds, 3), "tokens": count})

    # The vision towers alone on one image (inside every turn's prefill): cuDNN's attention or not.
    pixels = {k: v for k, v in model_inputs(loaded, [[0]], [images[0]]).items() if "pixel" in k}
    for step in ("vision, first", "vision, again"):
        with torch.inference_mode(), _CUDNN_ATTENTION_OFF.held() if way == "vlmops" else contextlib.nullcontext():
            _, seconds = timed(lambda: image_features(loaded.model.model, pixels))
        rows.append({"step": step, "seconds": round(seconds, 4), "tokens": 0})

    reqs = make_requests(loaded, 32, random_images(8, 0), 0)
    config = generation_config(loaded, InferConfig(max_new_tokens=128))
    config.min_new_tokens = 128
    inputs = model_inputs(loaded, [r.prompt_ids for r in reqs], [image for r in reqs for image in r.images])

    def batch() -> Any:
        if way == "vlmops":
            return generate(loaded, inputs, config)
        with torch.inference_mode():
            return loaded.model.generate(**inputs, generation_config=config)

    for step in ("batch 32, first", "batch 32, second"):
        _, seconds = timed(batch)
        rows.append({"step": step, "seconds": round(seconds, 3), "tokens": 32 * 128})
    for row in rows:
        row.update(model=arch, way=way, tokens_per_s=round(row["tokens"] / row["seconds"], 1))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | step | generate s (tokens) | vlmops s (tokens) | speed-up |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    by = {(r["model"], r["way"], r["step"]): r for r in rows}
    for model, step in dict.fromkeys((r["model"], r["step"]) for r in rows):
        base, ours = by.get((model, "generate", step)), by.get((model, "vlmops", step))
        cells = [f"{r['seconds']:.3f} ({r['tokens']})" if r else "-" for r in (base, ours)]
        ratio = f"{base['seconds'] / ours['seconds']:.2f}x" if base and ours else "-"
        lines.append(f"| {model} | {step} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="1.3b,7b", help="comma-separated: 1.3b, 7b")
    parser.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens of each chat answer")
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("chat_latency_bench needs CUDA (the cost it measures is cuDNN's)", file=sys.stderr)
        return 2
    if args.child:
        with tempfile.TemporaryDirectory() as work:
            print("ROWS " + json.dumps(child(args.child[0], args.child[1], args.new_tokens, Path(work))), flush=True)
        return 0
    rows: list[dict[str, Any]] = []
    for model in args.models.split(","):
        for way in WAYS:
            command = [sys.executable, __file__, "--child", model, way, "--new-tokens", str(args.new_tokens)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            found = [line for line in done.stdout.splitlines() if line.startswith("ROWS ")]
            if done.returncode or not found:
                print(f"{model} {way} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.extend(json.loads(found[-1][5:]))
    print(table(rows))
    if args.out:
        write_results(
            args.out,
            gpu_machine(),
            rows,
            baseline="`generate`: a hand-written model.generate with torch's default attention backends, same run",
        )
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
