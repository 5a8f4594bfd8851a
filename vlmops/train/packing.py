"""Padding-free training batches for DeepSeek-VL (`train.packing`) and length-grouped batches (`train.group_by_length`).

Packing puts the samples of a micro-batch one after the other in a single row: no padding, so every token the
model computes is a real one. What keeps the samples apart:

- `position_ids` restart at 0 for each sample and there is no `attention_mask`. transformers (>= 5) then finds
  the sample boundaries from the position ids (`masking_utils.find_packed_sequence_indices`) and builds a
  block-diagonal causal mask: SDPA gets it as a boolean mask, FlexAttention as a block mask that skips the
  blocks between samples, flash-attention as varlen sequence lengths. RoPE uses the same restarted positions, so
  each sample sees exactly the positions it would see alone.
- the first label of every sample is -100, so the last token of one sample never learns to predict the first
  token of the next (the loss shifts labels by one over the whole row).
- the images of the row are concatenated in row order: DeepSeek-VL scatters image features into the
  image-token positions in row-major order (`masked_scatter`), which is sample 0's images, then sample 1's, ...

The LLM must not build a KV cache while training: with a cache object present, transformers does not look for
packed sequences and the samples would attend to each other (`check_packing_support` refuses such a model).

Groups are made once per run from the measured sample lengths (seeded), and the Trainer's sampler shuffles
their order every epoch. Evaluation batches stay plain padded batches, so `eval_loss` means the same with
and without packing.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from vlmops.models.template import IGNORE_INDEX
from vlmops.train.data import PIXEL_KEYS, VisionLanguageCollator, next_token_targets

log = logging.getLogger(__name__)

# What a training batch carries beside the model's inputs (`GroupCollator`, computed on the CPU in the DataLoader's
# workers, so that the step on the GPU never waits for the host to read a count back; `VLTrainer` takes them out):
REAL_TOKENS_KEY = "real_tokens"  # int: the batch's real tokens (padding and a packed row's filler not counted)
TRAINED_INDEX_KEY = "trained_index"  # flat positions (row x length + column) whose next token is learned
TRAINED_TARGETS_KEY = "trained_targets"  # the tokens they learn
STEP_KEYS = (REAL_TOKENS_KEY, TRAINED_INDEX_KEY, TRAINED_TARGETS_KEY)
# Attention kernels whose transformers mask path understands packed position ids (eager builds the same mask).
PACKING_ATTENTION = ("sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "eager")
# Length-grouped batches are formed within windows of this many batches: similar lengths in a batch, while the
# windows keep the order random.
GROUP_WINDOW_BATCHES = 50


class SizedSamples(Protocol):
    """What grouping needs from a dataset: its samples and their token lengths (`SFTDataset` is one)."""

    lengths: list[int]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


# Attention implementations that skip the masked-out blocks of a packed row. SDPA gets a dense per-row mask
# instead: on an H200 (7b LoRA, 8 samples of ~1,100 tokens per row) packed SDPA ran at 0.75x the padded batches.
BLOCK_SPARSE_ATTENTION = ("flash_attention_2", "flex_attention")
# `train.packing: auto` with the default SDPA packs (the language model then attends with FlexAttention) when padded
# batches of the training split would be at least this share padding. Measured on an H200, 1.3b LoRA at 16 GiB, the
# same run: realistic data (64-1,500 text tokens, 0-2 images; 40% padding in random batches of 8) trained at 32.0k
# real tokens/s packed with FlexAttention against 8.0k in padded batches; uniform data (1% padding) stays padded
# with SDPA (50.9k tokens/s).
PACKING_MIN_PADDING = 0.15


def shuffled_batches(lengths: Sequence[int], batch_size: int, seed: int = 0) -> Iterator[list[int]]:
    """The lengths of random batches of `batch_size` samples over one shuffled pass (how unpacked runs batch)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [lengths[i] for i in order[start : start + batch_size]]


def padding_share(lengths: Sequence[int], batch_size: int, seed: int = 0) -> float:
    """Share of padding in shuffled padded batches of `batch_size` samples: what an unpacked run would compute."""
    computed = real = 0
    for batch in shuffled_batches(lengths, batch_size, seed):
        computed += max(batch) * len(batch)
        real += sum(batch)
    return 0.0 if computed == 0 else 1.0 - real / computed


def padded_lengths(lengths: Sequence[int], batch_size: int, seed: int = 0) -> list[int]:
    """Each sample's length once padded in a shuffled batch of `batch_size`: its batch's longest, per sample."""
    return [max(batch) for batch in shuffled_batches(lengths, batch_size, seed) for _ in batch]


def resolve_packing(value: bool | str, attn: str = "sdpa", padding: float = 0.0, cuda: bool | None = None) -> bool:
    """`train.packing` as a bool. `auto` packs on a CUDA GPU when the attention skips masked blocks, and with the
    default SDPA when padded batches would be at least `PACKING_MIN_PADDING` padding (`padding`; see the key)."""
    if value == "auto":
        on_gpu = torch.cuda.is_available() if cuda is None else cuda
        return on_gpu and (attn in BLOCK_SPARSE_ATTENTION or (attn == "sdpa" and padding >= PACKING_MIN_PADDING))
    if not isinstance(value, bool):
        raise ValueError(f"train.packing must be auto, true or false, not {value!r}")
    return value


def training_attention(attn: str, packing_setting: bool | str, packing: bool) -> str:
    """The language model's attention for a run: rows that `auto` packed take FlexAttention where model.attn is SDPA
    (SDPA would compute each packed row densely); anything else as configured."""
    return "flex_attention" if packing and packing_setting == "auto" and attn == "sdpa" else attn


def pack_groups(lengths: Sequence[int], budget: int, seed: int = 0) -> list[list[int]]:
    """Sample indices grouped so that each group's total length is at most `budget` tokens.

    Best-fit decreasing: the longest sample first, each into the fullest group it still fits, so groups come out
    nearly full. Ties are broken by a seeded shuffle, so equal-length samples are not grouped by file order.

    Raises ValueError when a sample is longer than the budget.
    """
    if budget < 1:
        raise ValueError(f"the packing budget must be at least 1 token, not {budget}")
    longest = max(lengths, default=0)
    if longest > budget:
        raise ValueError(
            f"a sample of {longest} tokens does not fit the packing budget of {budget} tokens per micro-batch: "
            "raise train.packing_tokens (or train.batch_size) to at least the longest sample, or lower data.max_length"
        )
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: lengths[i], reverse=True)  # stable: the shuffle breaks ties
    groups: list[list[int]] = []
    room: list[
        tuple[int, int]
    ] = []  # (free tokens, group index), sorted: the fullest group that fits is found by bisect
    for i in order:
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            groups.append([i])
            free, g = budget - lengths[i], len(groups) - 1
        else:
            free, g = room.pop(at)
            groups[g].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, g))
    return groups


def length_groups(lengths: Sequence[int], batch_size: int, seed: int = 0) -> list[list[int]]:
    """Batches of `batch_size` samples of similar length (less padding), in a seeded random order.

    The samples are shuffled, cut into windows of `GROUP_WINDOW_BATCHES` batches, and sorted by length within
    each window before being cut into batches: the same idea as transformers' `LengthGroupedSampler`, from
    lengths already measured instead of loading every sample (and its images) once to measure it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    window = batch_size * GROUP_WINDOW_BATCHES
    groups: list[list[int]] = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        groups += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    return groups


class GroupedDataset(Dataset[list[dict[str, torch.Tensor]]]):
    """A dataset whose items are groups of samples: one item is one micro-batch (the Trainer's batch size is 1)."""

    def __init__(self, samples: SizedSamples, groups: list[list[int]]):
        self.samples = samples
        self.groups = groups
        self.lengths = [sum(samples.lengths[i] for i in group) for group in groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[dict[str, torch.Tensor]]:
        return [self.samples[i] for i in self.groups[index]]

    @property
    def mean_group_size(self) -> float:
        """Samples per item, on average (per micro-batch)."""
        return len(self.samples) / max(1, len(self.groups))


def pack_samples(
    samples: Sequence[dict[str, torch.Tensor]], length: int | None = None, pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """One row holding every sample: `input_ids`, `labels`, `position_ids` (1, total) and the images in row order.

    No `attention_mask`: its absence is what makes transformers derive per-sample attention from the
    position ids (a 2-D mask, even all ones, would switch that off).

    `length`: fill the row up to this many tokens with a filler sequence of its own (padding ids, positions from
    0, no labels), so that every packed row has one shape (compiled layers are specialised per shape).
    """
    if not samples:
        raise ValueError("cannot pack an empty list of samples")
    labels = []
    for s in samples:
        own = s["labels"].clone()
        own[0] = IGNORE_INDEX  # the previous sample's last token must not learn to predict this one's first
        labels.append(own)
    ids = [s["input_ids"] for s in samples]
    positions = [torch.arange(len(s["input_ids"])) for s in samples]
    total = sum(len(i) for i in ids)
    filler = 0 if length is None else length - total
    if filler < 0:
        raise ValueError(f"the packed samples hold {total} tokens, more than the row's {length}")
    if filler:
        ids.append(torch.full((filler,), pad_token_id, dtype=ids[0].dtype))
        labels.append(torch.full((filler,), IGNORE_INDEX, dtype=labels[0].dtype))
        positions.append(torch.arange(filler))
    batch = {
        "input_ids": torch.cat(ids).unsqueeze(0),
        "labels": torch.cat(labels).unsqueeze(0),
        "position_ids": torch.cat(positions).unsqueeze(0),
    }
    for key in PIXEL_KEYS:
        stacks = [s[key] for s in samples if key in s]
        if stacks:
            batch[key] = torch.cat(stacks)
    return batch


@dataclass
class GroupCollator:
    """Collates groups (from `GroupedDataset`) into one packed row (`pack`) or one padded batch of similar lengths;
    plain samples (the eval split) into a padded batch, as `VisionLanguageCollator` does."""

    pad_token_id: int
    pack: bool = True
    pad_to_multiple_of: int = 1
    """Padded batches only: round their length up (compiled layers then see a few shapes, not one per length)."""
    packed_length: int | None = None
    """Packed rows only: fill each to this many tokens (one shape for compiled layers); None: as long as its samples."""
    pad_to_lengths: tuple[int, ...] = ()
    """Padded batches only: the lengths they pad up to (see `VisionLanguageCollator`)."""

    def __call__(
        self, features: Sequence[list[dict[str, torch.Tensor]]] | Sequence[dict[str, torch.Tensor]]
    ) -> dict[str, Any]:
        samples: list[dict[str, torch.Tensor]] = []
        grouped = False
        for f in features:
            if isinstance(f, dict):
                samples.append(f)
            else:
                grouped = True
                samples.extend(f)
        if grouped and self.pack:
            batch = pack_samples(samples, self.packed_length, self.pad_token_id)
        else:
            batch = VisionLanguageCollator(self.pad_token_id, self.pad_to_multiple_of, self.pad_to_lengths)(samples)
        return with_step_keys(batch, sum(len(s["input_ids"]) for s in samples))


def with_step_keys(batch: dict[str, Any], real_tokens: int) -> dict[str, Any]:
    """`batch` plus `STEP_KEYS`: its real token count and, from its labels, the positions that learn a next token
    and their targets (the labels shifted by one, over the flattened batch)."""
    targets = next_token_targets(batch["labels"]).reshape(-1)
    index = targets.ne(IGNORE_INDEX).nonzero().squeeze(-1)
    batch[REAL_TOKENS_KEY] = real_tokens
    batch[TRAINED_INDEX_KEY] = index
    batch[TRAINED_TARGETS_KEY] = targets[index]
    return batch


def check_packing_support(model: Any) -> None:
    """Raise ValueError unless `model` (a DeepSeek-VL model, possibly peft-wrapped) keeps packed samples apart."""
    config = model.config
    text = getattr(config, "text_config", config)
    attn = getattr(text, "_attn_implementation", None)
    if attn not in PACKING_ATTENTION:
        raise ValueError(
            f"train.packing needs an attention kernel that reads packed position ids ({', '.join(PACKING_ATTENTION)}); "
            f"the language model uses {attn!r}: set model.attn to sdpa or flex_attention, or train.packing: false"
        )
    if getattr(text, "use_cache", False):
        raise ValueError(
            "train.packing: the language model would build a KV cache while training, and with a cache transformers "
            "does not separate packed samples; set config.text_config.use_cache = False on the model"
        )


def padding_fraction(batches: Sequence[dict[str, Any]]) -> float:
    """Share of the computed token positions that are padding, over collated batches (a packed row's is its filler)."""
    total = sum(b["input_ids"].numel() for b in batches)
    real = sum(
        int(b[REAL_TOKENS_KEY])
        if REAL_TOKENS_KEY in b
        else int(b["attention_mask"].sum())
        if "attention_mask" in b
        else b["input_ids"].numel()
        for b in batches
    )
    return 0.0 if total == 0 else 1.0 - real / total
