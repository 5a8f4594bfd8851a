"""Realistic training data for bench/train_bench.py (`--data realistic`), and the padding it costs.

Samples mix what a team's data looks like: 64-1,500 text tokens (prompt and answer in random proportion), and
0, 1 or 2 images (a third each) of 576 tokens on the released models, so the lengths range from 64 to ~2,700
tokens and random batches pad a lot. `padding_fraction` measures that share for a batching.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEXT_TOKENS = (64, 1500)
IMAGES_PER_SAMPLE = (0, 1, 2)


def realistic_records(
    count: int, images: Sequence[str], words: Sequence[str], tokens_per_word: float, seed: int = 0
) -> list[dict[str, Any]]:
    """`count` records in the `conversations` format: 64-1,500 text tokens and 0-2 images each, mixed."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        text_tokens = rng.randint(*TEXT_TOKENS)
        answer_share = rng.uniform(0.2, 0.6)
        answer_words = max(1, round(text_tokens * answer_share / tokens_per_word))
        prompt_words = max(1, round(text_tokens * (1 - answer_share) / tokens_per_word))
        tags = "".join(f"<img>{images[(i + k) % len(images)]}</img>" for k in range(rng.choice(IMAGES_PER_SAMPLE)))
        prompt = tags + " ".join(rng.choice(words) for _ in range(prompt_words))
        answer = " ".join(rng.choice(words) for _ in range(answer_words))
        records.append({"conversations": [{"from": "user", "value": prompt}, {"from": "assistant", "value": answer}]})
    return records


def write_realistic_dataset(folder: Path, processor: Any, count: int, seed: int = 0) -> Path:
    """train.jsonl (and a one-record eval.jsonl) of `realistic_records` with 16 noise images under `folder`."""
    from PIL import Image

    from vlmops.models.tiny import _CORPUS_WORDS

    if (folder / "train.jsonl").is_file():
        return folder
    words = _CORPUS_WORDS.split()
    rng = random.Random(seed)
    sample = " ".join(rng.choice(words) for _ in range(2000))
    tokens_per_word = len(processor.tokenizer.encode(sample, add_special_tokens=False)) / 2000
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(16):
        path = folder / "images" / f"{i:02d}.png"
        if not path.exists():
            Image.frombytes("RGB", (384, 384), bytes(rng.randrange(256) for _ in range(384 * 384 * 3))).save(path)
        images.append(str(path))
    lines = [json.dumps(r) for r in realistic_records(count, images, words, tokens_per_word, seed)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "eval.jsonl").write_text(lines[0] + "\n")
    return folder


def padding_fraction(
    lengths: Sequence[int], groups: Sequence[Sequence[int]], packed: bool = False, packed_length: int | None = None
) -> float:
    """Share of the computed positions that are padding when each group of sample indices is one micro-batch:
    padded to its longest sample, or (packed) one row with none, or filled up to `packed_length` tokens."""
    real = sum(lengths[i] for g in groups for i in g)
    if packed:
        computed = len(groups) * packed_length if packed_length else real
        return 0.0 if computed == 0 else 1.0 - real / computed
    computed = sum(len(g) * max(lengths[i] for i in g) for g in groups if g)
    return 0.0 if computed == 0 else 1.0 - real / computed


def random_batches(count: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """Shuffled batches of sample indices, as a plain DataLoader with shuffle=True makes them."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, count, batch_size)]
