"""How a run batches its training samples: packing, length grouping, micro-batch, accumulation and recompute.

`resolve_batching` turns the `train` section (packing, packing_tokens, group_by_length, memory_gib,
auto_batch, gradient_checkpointing) and the measured sample lengths into one `Batching`, decided before the
model is loaded (the TrainingArguments carry it, and under ZeRO-3 they must exist before the weights load).
`train_dataset` and `collator` build the data path it describes.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vlmops.config import PipelineConfig, TrainConfig
from vlmops.plural import counted
from vlmops.train.data import round_up
from vlmops.train.deepspeed_config import require_deepspeed
from vlmops.train.memory import OFFLOAD_PRESET, ModelShape, fits_without_deepspeed, gpu_memory_gib, plan_batch
from vlmops.train.packing import (
    GroupCollator,
    GroupedDataset,
    length_groups,
    pack_groups,
    padded_lengths,
    padding_share,
    resolve_packing,
)
from vlmops.train.speed import SpeedPlan

log = logging.getLogger(__name__)

# DeepSpeed presets that only shard state across processes (no offload): nothing to gain in a run of one process.
SHARDING_PRESETS = ("zero2", "zero3")

# With compiled layers, padded batches come in at most this many lengths (see `length_buckets`): each is a compile
# (seconds to tens of seconds), each bucket boundary costs padding (uniform lengths of 64-2,700 tokens: ~6% at 16).
COMPILED_LENGTHS = 16
# ... and no more lengths than it takes to come within this share of the computed tokens of the least padding:
# a length that saves less is not worth its compile. Near-uniform data (one image + ~490-540 text tokens) in
# batches of 8: a second length would serve about one batch in 30 and save ~0.2% of the tokens, for a compile
# that can come at any step of the run.
LENGTH_TOLERANCE = 0.005
# ... and a length must save at least this many padding tokens over the run: a new length compiles the decoder
# layers twice (the first layer's input needs no gradient, the others' do), ~11 s for the 1.3b on an H200 while
# training waits, the time of ~600k of its tokens (~130k of the 7b's). Measured: a 160-sample benchmark run took a
# second length to save ~1% of its tokens, and the compile landing among its measured steps cost 40% of them.
LENGTH_COST_TOKENS = 200_000


@dataclass(frozen=True)
class Batching:
    """The resolved batching of a run."""

    batch_size: int
    """Samples per micro-batch (unpacked); with packing, the number the token budget was sized for."""
    grad_accum: int
    recompute: bool
    packing: bool
    packing_tokens: int | None
    """Tokens per packed micro-batch (packing only)."""
    group_by_length: bool
    activation_budget: float = 1.0
    """Below 1: selective recompute (compiled layers keep this share of their activations; `vlmops.train.memory`)."""

    @property
    def grouped(self) -> bool:
        """The train split is served as ready-made groups, one per micro-batch (the Trainer's batch size is 1)."""
        return self.packing or self.group_by_length

    @property
    def per_device_batch(self) -> int:
        """`per_device_train_batch_size` for the Trainer."""
        return 1 if self.grouped else self.batch_size


def resolve_batching(
    config: PipelineConfig,
    base_model: Path,
    lengths: list[int],
    weights_dtype: torch.dtype,
    speed: SpeedPlan | None = None,
) -> Batching:
    """The batching of a run: the config as written, or on a GPU the memory policy's split (see `TrainConfig`)."""
    t = config.train
    packing = resolve_packing(t.packing, config.model.attn, padding_share(lengths, t.batch_size, config.run.seed))
    recompute = None if t.gradient_checkpointing == "auto" else bool(t.gradient_checkpointing)
    batch_size, grad_accum, tokens = t.batch_size, t.grad_accum, t.packing_tokens
    activation_budget = 1.0
    mean = sum(lengths) / len(lengths)
    fixed_budget = packing and t.packing_tokens is not None  # the user sized the micro-batch: keep the split
    if torch.cuda.is_available() and t.deepspeed is None and t.auto_batch and not fixed_budget:
        shape = training_shape(base_model, t, weights_dtype, speed)
        plan = plan_batch(
            shape, gpu_memory_gib(t.memory_gib), t.batch_size * t.grad_accum, max(lengths), mean, packing, recompute
        )
        log.info("train.memory_gib: %s", plan.describe())
        batch_size, grad_accum, recompute, tokens, activation_budget = (
            plan.micro_batch,
            plan.grad_accum,
            plan.recompute,
            plan.packing_tokens,
            plan.activation_budget,
        )
    elif t.memory_gib is not None:
        why = (
            "there is no CUDA GPU"
            if not torch.cuda.is_available()
            else "the run uses DeepSpeed, train.auto_batch false or a fixed train.packing_tokens"
        )
        log.info("train.memory_gib is ignored: %s; batch_size and grad_accum are used as written", why)
    if packing and tokens is None:
        tokens = max(max(lengths), math.ceil(batch_size * mean))
    return Batching(
        batch_size=batch_size,
        grad_accum=grad_accum,
        recompute=True if recompute is None else recompute,  # auto without the policy: on, as before
        packing=packing,
        packing_tokens=tokens if packing else None,
        group_by_length=t.group_by_length and not packing,
        activation_budget=activation_budget,
    )


def resolve_deepspeed(config: PipelineConfig, base_model: Path, speed: SpeedPlan | None = None) -> PipelineConfig:
    """`config` with `train.deepspeed` chosen where it is null and full training would not fit the GPU.

    Full training on one GPU is fastest without DeepSpeed (float32 masters under autocast, fused AdamW, no
    offload): that is kept whenever one sample of `data.max_length` tokens fits `train.memory_gib` with recompute.
    Otherwise the run takes the `OFFLOAD_PRESET` preset instead of failing for memory. LoRA, CPU runs, an explicit
    `train.deepspeed`, `model.dtype` set, and `train.auto_batch: false` keep the config as written, except that a
    sharding preset (zero2, zero3) in a run of one process is taken as null, with a warning: it would shard nothing,
    only cost speed (ZeRO-2 measured 0.92x a plain loop on one H200) and turn off the run's own levers; so one config
    serves runs of one process and of several. `speed`: the levers the run would use without DeepSpeed (a fused loss
    keeps no logits).
    """
    t = config.train
    if t.deepspeed in SHARDING_PRESETS and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        log.warning(
            "train.deepspeed: %s shards training state across processes, and this run has one, so it would shard "
            "nothing, only cost speed and turn off the run's own levers (the compiled SAM tower, for one): this run "
            "trains without DeepSpeed, as with train.deepspeed null (where full training would not fit the GPU, an "
            "offload preset is still taken); runs of several processes (NPROC_PER_NODE, torchrun) keep %s",
            t.deepspeed,
            t.deepspeed,
        )
        t = t.model_copy(update={"deepspeed": None})
        config = config.model_copy(update={"train": t})
    if t.deepspeed is not None or t.mode != "full" or not t.auto_batch or config.model.dtype != "auto":
        return config
    if not torch.cuda.is_available():
        return config
    budget = gpu_memory_gib(t.memory_gib)
    shape = training_shape(base_model, t, torch.float32, speed)  # float32 masters: full training without DeepSpeed
    if fits_without_deepspeed(shape, budget, config.data.max_length):
        return config
    require_deepspeed(
        f"full training of {base_model.name} does not fit {budget:.0f} GiB of GPU memory without DeepSpeed (it would "
        f"take the {OFFLOAD_PRESET} preset; or raise train.memory_gib, lower data.max_length, or train with LoRA)"
    )
    log.warning(
        "train.deepspeed: full training of %s does not fit %.0f GiB of GPU memory without DeepSpeed; using the %s "
        "preset (set train.deepspeed to choose another, or raise train.memory_gib)",
        base_model.name,
        budget,
        OFFLOAD_PRESET,
    )
    return config.model_copy(update={"train": t.model_copy(update={"deepspeed": OFFLOAD_PRESET})})


def training_shape(
    base_model: Path, train: TrainConfig, weights_dtype: torch.dtype, speed: SpeedPlan | None = None
) -> ModelShape:
    """The `ModelShape` of training `base_model` with `train`, from its config on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmops.train.trainable import lora_target_modules, part_of, trained_parts

    config = AutoConfig.from_pretrained(base_model)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    full = trained_parts(train)
    trained = sum(p.numel() for name, p in model.named_parameters() if part_of(name) in full)
    targets: set[str] = set()
    if train.mode == "lora":
        modules = dict(model.named_modules())
        _, targets = lora_target_modules(model, train.lora.targets)
        for name in targets:
            module = modules[name]
            if isinstance(module, torch.nn.Linear) and part_of(name) not in full:
                trained += train.lora.r * (module.in_features + module.out_features)
    text = config.text_config
    return ModelShape(
        total_params=sum(p.numel() for p in model.parameters()),
        trained_params=trained,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        frozen_bytes=torch.finfo(weights_dtype).bits // 8,
        master_weights=weights_dtype == torch.float32 and train.mode == "full",
        fused_loss=speed is not None and speed.fused_loss,
        compiled=speed is not None and speed.compile_layers,
        high_res_vision=hasattr(config, "high_res_vision_config"),
        activation_bytes=4 if train.precision == "fp32" else 2,  # auto on a GPU: bf16 or fp16
        ddp=train.deepspeed is None and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        # what `apply_speed` finds on the loaded model: graphs only where nothing behind the towers trains
        vision_graphs=speed is not None
        and speed.vision_graphs
        and full <= {"llm"}
        and all(part_of(name) == "llm" for name in targets),
    )


def train_dataset(batching: Batching, dataset: Any, seed: int) -> Dataset[Any]:
    """The train split as the Trainer should see it: packed or length-grouped micro-batches, or samples."""
    if batching.packing:
        assert batching.packing_tokens is not None
        grouped = GroupedDataset(dataset, pack_groups(dataset.lengths, batching.packing_tokens, seed))
        log.info(
            "packing: %s into %s of <= %d tokens (%.1f samples each on average)",
            counted(len(dataset), "sample"),
            counted(len(grouped), "micro-batch", "micro-batches"),
            batching.packing_tokens,
            grouped.mean_group_size,
        )
        return grouped
    if batching.group_by_length:
        return GroupedDataset(dataset, length_groups(dataset.lengths, batching.batch_size, seed))
    return dataset


def collator(
    batching: Batching,
    pad_token_id: int,
    pad_to_multiple_of: int = 1,
    lengths: Sequence[int] = (),
    seed: int = 0,
    passes: float = 1.0,
) -> GroupCollator:
    """Packs groups into one row (packing), pads groups and plain samples (everything else, and evaluation).

    `pad_to_multiple_of` > 1 (compiled layers, specialised per shape): packed rows are filled to the budget, one
    shape; padded batches pad up to at most `COMPILED_LENGTHS` lengths chosen from the train split's `lengths` as
    they pad in batches: grouped by length, or shuffled (`seed`) micro-batches, each as long as its longest. A
    length must save `LENGTH_COST_TOKENS` over the run's `passes` through the split (epochs).
    """
    packed_length = None
    buckets: tuple[int, ...] = ()
    if batching.packing and pad_to_multiple_of > 1:
        assert batching.packing_tokens is not None
        packed_length = round_up(batching.packing_tokens, pad_to_multiple_of)
    elif pad_to_multiple_of > 1 and lengths:
        padded = lengths if batching.group_by_length else padded_lengths(lengths, batching.per_device_batch, seed)
        cost = LENGTH_COST_TOKENS / max(passes, 1e-9)  # per pass: `padded` is one pass's padded lengths
        buckets = length_buckets(padded, COMPILED_LENGTHS, pad_to_multiple_of, LENGTH_TOLERANCE, round(cost))
        log.info("padded batch lengths: %s tokens", ", ".join(map(str, buckets)))
    return GroupCollator(
        pad_token_id=pad_token_id,
        pack=batching.packing,
        pad_to_multiple_of=pad_to_multiple_of,
        packed_length=packed_length,
        pad_to_lengths=buckets,
    )


def train_passes(train: TrainConfig, batching: Batching, samples: int) -> float:
    """How many times the run goes through its `samples` training samples: `train.epochs`, or as many as
    `train.max_steps` steps take (the Trainer stops there whatever the epochs)."""
    if train.max_steps is None:
        return train.epochs
    return train.max_steps * batching.batch_size * batching.grad_accum / max(samples, 1)


def length_buckets(
    lengths: Sequence[int], count: int, multiple: int, tolerance: float = 0.0, length_cost: int = 0
) -> tuple[int, ...]:
    """At most `count` padded lengths (multiples of `multiple`, the longest sample's among them) that waste the
    fewest padding tokens when each sample pads up to the smallest one that holds it; with `length_cost` > 0, the
    number of lengths that minimises padding + `length_cost` per length after the first; with `tolerance` > 0, then
    the fewest lengths whose padding is within that share of the computed tokens of that number's.

    An exact split of the sorted distinct lengths into runs (dynamic programming over at most a few hundred
    distinct values). Padded batches then come in at most `count` lengths: each length is one compiled graph per
    layer, and on realistic data (64 to ~2,700 tokens) multiples of 64 alone gave dozens, each compiled anew while
    training waited.
    """
    if count < 1 or multiple < 1:
        raise ValueError("length_buckets needs count >= 1 and multiple >= 1")
    rounded = Counter(round_up(n, multiple) for n in lengths)
    values = sorted(rounded)
    # cost(i, j): padding when the samples of values[i..j] all pad to values[j]
    weights = [rounded[v] for v in values]
    prefix_n = [0, *itertools.accumulate(weights)]
    prefix_sum = [0, *itertools.accumulate(w * v for w, v in zip(weights, values, strict=True))]

    def cost(i: int, j: int) -> int:
        return values[j] * (prefix_n[j + 1] - prefix_n[i]) - (prefix_sum[j + 1] - prefix_sum[i])

    # total[k][j]: the least padding of values[0..j] in k + 1 buckets, the last ending at values[j]; `start`: where
    # the bucket before it ended. More buckets never cost padding, so the best uses min(count, n).
    n = len(values)
    count = min(count, n)
    total = [[cost(0, j) for j in range(n)]]
    start = [[-1] * n]
    for k in range(1, count):
        row, back = [0] * n, [-1] * n
        for j in range(k, n):
            row[j], back[j] = min((total[k - 1][i] + cost(i + 1, j), i) for i in range(k - 1, j))
        total.append(row)
        start.append(back)
    count = min(range(1, count + 1), key=lambda k: total[k - 1][n - 1] + (k - 1) * length_cost)  # the fewest at a tie
    allowed = total[count - 1][n - 1] + tolerance * prefix_sum[-1]  # prefix_sum[-1]: the tokens unbucketed
    count = next(k + 1 for k in range(count) if total[k][n - 1] <= allowed)
    edges, j = [], n - 1
    for k in range(count - 1, -1, -1):
        edges.append(values[j])
        j = start[k][j]
    return tuple(sorted(edges))
