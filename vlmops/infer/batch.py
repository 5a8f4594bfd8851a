"""Batch inference over a dataset file: the single entry point the eval step and the batch flow call.

Each record's prompt is every turn before its last assistant turn; that last turn is the reference answer.
Prompts are sorted by length into batches (less padding), generated left-padded and greedy by default,
and written back in input order as one JSON line per record:

    {"index", "source", "prompt", "history", "reference", "prediction", "num_images",
     "prompt_tokens", "generated_tokens"}

`prompt` is the last user turn with its `<img>` tags; `history` the earlier `[query, response]` pairs.
The file appears only when every record is done (written aside, then renamed), so a crash never leaves a
partial predictions file that a later step could take for a finished one.

This is the plain `transformers.generate` engine; a faster decode path can replace the body of
`batch_infer` without changing its callers.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from vlmops.config import InferConfig, StorageConfig
from vlmops.conversation import Conversation, ImageRef, to_img_tags
from vlmops.data.formats import REMOTE_PREFIXES, DatasetError, read_dataset
from vlmops.data.images import ImageLoadError, load_image
from vlmops.infer.generation import answer_tokens, decode_answer, generation_config, model_inputs
from vlmops.models.loading import LoadedModel
from vlmops.models.template import encode

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """Where the predictions went and how fast they came."""

    path: Path
    count: int
    seconds: float
    generated_tokens: int
    tokens_per_s: float


@dataclass
class _Item:
    index: int
    conversation: Conversation
    prompt_ids: list[int]
    images: list[ImageRef]


def batch_infer(
    loaded: LoadedModel,
    dataset_file: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    infer_cfg: InferConfig,
    system_prompt: str | None = None,
    storage: StorageConfig | None = None,
    shard: tuple[int, int] | None = None,
) -> BatchResult:
    """Predict the last assistant turn of every record of `dataset_file`; write them to `out_file` (jsonl).

    `shard=(rank, world)`: predict only this worker's share (records dealt out in length order, so every
    worker gets a similar mix); `index` stays the record's position in the whole file.

    Raises:
        DatasetError: some records of the file do not parse (none is skipped: fix or remove them).
        ImageLoadError: a record's image cannot be read (the message names the record and the image).
    """
    dataset_path, out_path = Path(dataset_file), Path(out_file)
    dataset = read_dataset(dataset_path)
    if dataset.problems:
        raise DatasetError(dataset.problems, "batch inference predicts every record: fix or remove these first")
    if not dataset.conversations:
        raise ValueError(f"{dataset_path} has no records to predict")
    _check_local_images(dataset.conversations)
    items = [_item(i, conv, loaded, system_prompt) for i, conv in enumerate(dataset.conversations)]
    # Longest first: similar lengths share a batch (less padding), and running out of memory shows at once.
    order = sorted(range(len(items)), key=lambda i: -len(items[i].prompt_ids))
    if shard is not None:
        rank, world = shard
        order = order[rank::world]
    config = generation_config(loaded, infer_cfg)
    predictions: dict[int, dict[str, Any]] = {}
    generated_total = 0
    start = time.perf_counter()
    with tqdm(total=len(order), desc=f"infer {dataset_path.name}", unit="rec") as bar:
        for first in range(0, len(order), infer_cfg.batch_size):
            batch = [items[i] for i in order[first : first + infer_cfg.batch_size]]
            for item, (prediction, tokens) in zip(batch, _generate(loaded, batch, config, storage)):
                predictions[item.index] = _record(item, prediction, tokens)
                generated_total += tokens
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{generated_total / (time.perf_counter() - start):.1f}")
    seconds = time.perf_counter() - start
    missing = sorted(set(order) - predictions.keys())
    if missing:
        raise RuntimeError(f"internal error: no prediction for records {missing[:10]}")
    write_jsonl_atomic(out_path, [predictions[i] for i in sorted(predictions)])
    result = BatchResult(out_path, len(order), seconds, generated_total, generated_total / seconds if seconds else 0.0)
    log.info(
        "predicted %d records in %.1f s (%d tokens, %.1f tokens/s) -> %s",
        result.count,
        seconds,
        generated_total,
        result.tokens_per_s,
        out_path,
    )
    return result


def _check_local_images(conversations: list[Conversation]) -> None:
    """Fail before any generation if a local image is missing (remote ones are checked when loaded)."""
    missing = [
        f"{conv.source}: {ref.uri}"
        for conv in conversations
        for ref in conv.images
        if not ref.uri.startswith(REMOTE_PREFIXES) and not Path(ref.uri).is_file()
    ]
    if missing:
        shown = "\n".join(f"  - {m}" for m in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise ImageLoadError(f"{len(missing)} image file(s) not found:\n{shown}{more}")


def _item(index: int, conversation: Conversation, loaded: LoadedModel, system_prompt: str | None) -> _Item:
    encoded = encode(
        conversation.messages[:-1],
        loaded.tokenizer,
        loaded.num_image_tokens,
        system_prompt,
        add_generation_prompt=True,
    )
    return _Item(index, conversation, encoded.input_ids, encoded.images)


def _generate(
    loaded: LoadedModel, batch: list[_Item], config: Any, storage: StorageConfig | None
) -> list[tuple[str, int]]:
    """(prediction, generated token count) for each item of one batch, in batch order."""
    images: list[Image.Image] = []
    for item in batch:
        for ref in item.images:
            try:
                images.append(load_image(ref.uri, storage))
            except ImageLoadError as err:
                raise ImageLoadError(f"record {item.conversation.source}: {err}") from err
    inputs = model_inputs(loaded, [item.prompt_ids for item in batch], images)
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, generation_config=config)
    prompt_width = inputs["input_ids"].shape[1]
    results = []
    for row in output[:, prompt_width:].tolist():
        tokens = answer_tokens(row, loaded.tokenizer.eos_token_id)
        results.append((decode_answer(loaded, tokens), len(tokens)))
    return results


def _record(item: _Item, prediction: str, generated_tokens: int) -> dict[str, Any]:
    messages = item.conversation.messages
    turns = messages[1:] if messages[0].role == "system" else messages
    history = [[to_img_tags(turns[i].parts), turns[i + 1].text("")] for i in range(0, len(turns) - 2, 2)]
    return {
        "index": item.index,
        "source": item.conversation.source,
        "prompt": to_img_tags(turns[-2].parts),
        "history": history,
        "reference": messages[-1].text("").strip(),
        "prediction": prediction,
        "num_images": len(item.images),
        "prompt_tokens": len(item.prompt_ids),
        "generated_tokens": generated_tokens,
    }


def write_jsonl_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
