"""The training data path: records -> token ids, labels and pixel tensors, lazily, in DataLoader workers.

Records are measured up front to apply `data.max_length_policy` (`vlmops.data.length`, the same policy
validation applies), from the lengths validation saved in the snapshot when it measured them with the same
tokenizer and system prompt, else by tokenising them; images are read and preprocessed in `__getitem__`, so with
`data.num_workers > 0` that work happens in worker processes, overlapping the model's step.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from vlmops.config import StorageConfig
from vlmops.conversation import Conversation
from vlmops.data.images import load_image
from vlmops.data.length import MaxLength, cut_sample
from vlmops.data.problems import DatasetError, RecordProblem
from vlmops.models.pixels import DevicePixels
from vlmops.models.template import IGNORE_INDEX, Encoded, encode
from vlmops.plural import counted

log = logging.getLogger(__name__)


@dataclass
class LengthReport:
    """Records that `data.max_length_policy` dropped or truncated, by `file:line`."""

    dropped: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)


class SFTDataset(Dataset[dict[str, torch.Tensor]]):
    """Conversations as training samples: `input_ids`, `labels`, and the pixel tensors of their images.

    Raises DatasetError listing every too-long record when the policy is `error` (and, for
    `truncate-text`, every record that cannot be cut without losing all its answer tokens).
    """

    def __init__(
        self,
        conversations: list[Conversation],
        processor: Any,
        max_length: int,
        policy: str,
        system_prompt: str | None = None,
        storage: StorageConfig | None = None,
        split: str = "train",
        lengths: list[int] | None = None,
        pixels: DevicePixels | None = None,
    ):
        """`lengths`: the records' token lengths as validation measured them (the snapshot's lengths.json), so
        only the records to cut are tokenised here; None: measure every record. `pixels`: images leave as the
        processor's resized and padded uint8 (a quarter of float32's bytes through the DataLoader's workers, pinning
        and the copy to the GPU), rescaled and normalised where the trainer runs (`VLTrainer`); None: the
        processor's float32."""
        self.processor = processor
        self.pixels = pixels
        self.tokenizer = processor.tokenizer
        self.num_image_tokens = int(processor.num_image_tokens)
        self.limit = MaxLength.for_tokenizer(max_length, policy, self.tokenizer, self.num_image_tokens)
        self.image_token_id = self.limit.image_token_id
        self.system_prompt = system_prompt
        self.storage = storage
        self.report = LengthReport()
        self.records: list[Conversation] = []
        self.cuts: list[int | None] = []
        self.lengths: list[int] = []
        if lengths is not None and len(lengths) != len(conversations):
            raise ValueError(
                f"{counted(len(lengths), 'saved length')} for {counted(len(conversations), split + ' record')}"
            )
        problems: list[RecordProblem] = []
        shortest_dropped: int | None = None
        for i, conv in enumerate(
            tqdm(conversations, desc=f"measure {split}", unit="rec", leave=False, mininterval=1.0)
        ):
            length = lengths[i] if lengths is not None else len(self._encode(conv))
            check = self.limit.check(length, functools.partial(self._encode, conv))
            if check.problem is not None:
                problems.append(RecordProblem(conv.source, "(length)", check.problem))
                continue
            if check.dropped:
                self.report.dropped.append(conv.source)
                shortest_dropped = length if shortest_dropped is None else min(shortest_dropped, length)
                continue
            if check.cut is not None:
                self.report.truncated.append(conv.source)
            self.records.append(conv)
            self.cuts.append(check.cut)
            self.lengths.append(check.cut if check.cut is not None else length)
        if problems:
            raise DatasetError(problems, self.limit.hint())
        if self.report.dropped:
            log.warning(
                "%s: dropped %s longer than data.max_length %d: %s",
                split,
                counted(len(self.report.dropped), "record"),
                max_length,
                ", ".join(self.report.dropped[:10]),
            )
        if self.report.truncated:
            log.warning(
                "%s: cut the text of %s to data.max_length %d: %s",
                split,
                counted(len(self.report.truncated), "record"),
                max_length,
                ", ".join(self.report.truncated[:10]),
            )
        if not self.records:
            raise ValueError(self._nothing_left(split, conversations, max_length, policy, shortest_dropped))

    @staticmethod
    def _nothing_left(
        split: str, conversations: list[Conversation], max_length: int, policy: str, shortest: int | None
    ) -> str:
        """Why the split is empty, naming its files and the setting to change."""
        if shortest is None:  # nothing was dropped: there was nothing to begin with
            return f"the {split} split has no records"
        files = ", ".join(sorted({conv.source.rpartition(":")[0] or conv.source for conv in conversations}))
        return (
            f"{files}: every record of the {split} split ({counted(len(conversations), 'record')}) is longer than "
            f"data.max_length {max_length}, and data.max_length_policy {policy} left none: raise data.max_length to at "
            f"least {shortest} (the shortest record's tokens, image tokens included), or set data.max_length_policy "
            "to truncate-text (cut the text of each record's last turn)"
        )

    def _encode(self, conv: Conversation) -> Encoded:
        return encode(conv.messages, self.tokenizer, self.num_image_tokens, self.system_prompt)

    def __len__(self) -> int:
        return len(self.records)

    def encoded(self, index: int) -> Encoded:
        """Token ids, labels and image references of one sample (truncated if it had to be)."""
        enc = self._encode(self.records[index])
        cut = self.cuts[index]
        return enc if cut is None else cut_sample(enc, cut, self.num_image_tokens, self.image_token_id)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        enc = self.encoded(index)
        sample = {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
        }
        if enc.images:
            images = [load_image(ref.uri, self.storage) for ref in enc.images]
            if self.pixels is not None:
                features = self.pixels.host(images)
            else:
                features = self.processor.image_processor(images, return_tensors="pt")
            sample.update({k: v for k, v in features.items() if k.endswith("pixel_values")})
        return sample


# The image inputs of DeepSeek-VL batches: SigLIP's, and the 7b's high-resolution (SAM) ones.
PIXEL_KEYS = ("pixel_values", "high_res_pixel_values")


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """The label each position learns to predict: the next position's (the last one learns nothing)."""
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `n`."""
    return -(-n // multiple) * multiple


@dataclass
class VisionLanguageCollator:
    """Pads a batch to its longest sample (right padding) and stacks every image of the batch in order.

    The model scatters `pixel_values` (sample 0's images, then sample 1's, ...) into the image-token
    positions, so text-only samples contribute no rows; a batch with no image at all has no
    `pixel_values` key (the trainer then runs a dummy image, see `VLTrainer.compute_loss`).
    """

    pad_token_id: int
    pad_to_multiple_of: int = 1
    pad_to_lengths: tuple[int, ...] = ()
    """Sorted lengths a batch pads up to (the smallest that holds it; longer batches round up to the multiple):
    with compiled layers, a few shapes in all (`vlmops.train.batching.length_buckets`)."""

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        fitting = [n for n in self.pad_to_lengths if n >= longest]
        longest = fitting[0] if fitting else round_up(longest, self.pad_to_multiple_of)
        batch_size = len(features)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = f["input_ids"]
            labels[row, :n] = f["labels"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        for key in PIXEL_KEYS:
            stacks = [f[key] for f in features if key in f]
            if stacks:
                batch[key] = torch.cat(stacks)
        return batch
