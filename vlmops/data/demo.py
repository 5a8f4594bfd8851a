"""A synthetic image-question dataset in the seed's `conversations` format, for the embedded default.

Every image is one coloured shape on a light background. The held-out eval questions ask for the shape's
colour, so each has exactly one right one-word answer and accuracy is exact. The training split also
holds multi-turn records, two-image records and text-only records, as the seed's custom-dataset example
does.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from vlmops.plural import counted
from vlmops.staging import staged_folder

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
COLOUR_QUESTION = "What colour is the shape?"
TEXT_ONLY = (
    ("Which colours can the shapes have?", "red, green, blue, yellow, purple or orange"),
    ("Which shapes can appear?", "circle, square or triangle"),
    ("Say hello.", "hello"),
)


def draw_shape(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    """One shape of one colour, at a random place and size, on a light, slightly varied background."""
    grey = rng.randint(225, 250)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 2, int(size * 0.8))
    x0 = rng.randint(0, size - extent)
    y0 = rng.randint(0, size - extent)
    box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent - 1), (x0 + extent - 1, y0 + extent - 1)], fill=fill)
    return image


def write_demo_dataset(
    out_dir: str | os.PathLike[str], num_train: int = 320, num_eval: int = 40, image_size: int = 64, seed: int = 0
) -> tuple[Path, Path]:
    """Write `train.jsonl`, `eval.jsonl` and `images/*.png` under `out_dir`; return the two jsonl paths.

    The folder is built aside and renamed into place, so an interrupted run leaves nothing a rerun trusts.
    """
    out = Path(out_dir)
    with staged_folder(out) as staging:
        rng = random.Random(seed)
        (staging / "images").mkdir()
        counter = iter(range(10**9))

        def new_image() -> tuple[str, str, str]:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            rel = f"images/{next(counter):05d}.png"
            draw_shape(colour, shape, image_size, rng).save(staging / rel)
            return rel, colour, shape

        train = [_train_record(rng, new_image) for _ in range(num_train)]
        evals = []
        for _ in range(num_eval):
            rel, colour, _shape = new_image()
            evals.append(_single(rel, COLOUR_QUESTION, colour))
        _write_jsonl(staging / "train.jsonl", train)
        _write_jsonl(staging / "eval.jsonl", evals)
        (staging / "README.md").write_text(
            f"Synthetic vlmops demo data: {counted(num_train, 'train record')}, {counted(num_eval, 'eval record')}, "
            f"{image_size}px images, seed {seed}.\n"
        )
    return out / "train.jsonl", out / "eval.jsonl"


def _train_record(rng: random.Random, new_image: Callable[[], tuple[str, str, str]]) -> dict:
    kind = rng.random()
    if kind < 0.55:
        rel, colour, _ = new_image()
        return _single(rel, COLOUR_QUESTION, colour)
    if kind < 0.72:
        rel, colour, shape = new_image()
        return {
            "conversations": [
                {"from": "user", "value": f"<img>{rel}</img>{COLOUR_QUESTION}"},
                {"from": "assistant", "value": colour},
                {"from": "user", "value": "And what shape is it?"},
                {"from": "assistant", "value": shape},
            ]
        }
    if kind < 0.9:
        (a, colour_a, _), (b, colour_b, _) = new_image(), new_image()
        which = rng.choice(("first", "second"))
        answer = colour_a if which == "first" else colour_b
        return _single(f"{a}</img><img>{b}", f"What colour is the shape in the {which} image?", answer)
    question, answer = rng.choice(TEXT_ONLY)
    return {"conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": answer}]}


def _single(image_rel: str, question: str, answer: str) -> dict:
    return {
        "conversations": [
            {"from": "user", "value": f"<img>{image_rel}</img>{question}"},
            {"from": "assistant", "value": answer},
        ]
    }


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
