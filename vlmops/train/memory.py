"""`train.memory_gib`: the micro-batch, gradient accumulation and recompute that fit a GPU memory budget.

`plan_batch` is a pure function of the model's shape, the budget and the data's lengths; it keeps the samples per
optimizer step (`train.batch_size` x `train.grad_accum`) and only changes how they are split into micro-batches
(the Trainer normalises the loss by the trained tokens of the whole step, so the split does not change what is
learned). The estimate is deliberately simple (DeepSeek-VL's language model dominates; numbers per token, bf16):

- for the whole step: frozen parameters at their load dtype; trained ones at 12 bytes (float32 weight and the
  two AdamW moments);
- within a micro-batch: the 4-byte gradients, a 2-byte autocast copy of each trained weight when the weights are
  float32 masters (full training), and the activations below. The backward pass frees a layer's activations and
  weight copies as it fills in that layer's gradients, so a step without accumulation peaks at the larger of the
  two; with accumulation the earlier micro-batches' gradients stay, and all three add up (full 7b on an H200,
  micro-batches of 4 x 1,135 tokens without recompute: 113.2 GiB; of 2, accumulated twice: 128.7 GiB);
- activations saved for the backward pass, per token and LLM layer, without recompute: about 13 hidden-size
  and 4 intermediate-size vectors (norm inputs and outputs, q/k/v, rotary q/k, attention output, residuals,
  gate/up/activation products); with recompute only the layer input is kept, plus one layer's worth while it is
  recomputed (7b: 5.7 MB/token without, 0.43 MB with; checked against the plain loop's 40.8 GiB at
  4 x ~1,100 tokens without recompute);
- logits: bf16 logits, their float32 copy in the loss and its gradient over the 102,400-word vocabulary, for
  every position (an upper bound: only answer positions get logits in `VLTrainer`);
- a fixed reserve for the CUDA context, the allocator's slack and the vision towers' working memory (their
  activations are not kept when they are frozen). The 7b's SAM tower holds large transients while it runs, one
  image per sample when the towers run eagerly; from CUDA graphs of one image (`train.vision_graphs`) only one
  image's, whatever the micro-batch (the 7b LoRA at 4 x 1,135 tokens with recompute: 17.45 GiB eagerly, 15.97 from
  graphs, H200).

Recompute (gradient checkpointing) costs about a third of the forward pass again, so it is chosen only when,
without it, a micro-batch could not hold `SATURATING_TOKENS` tokens (or the whole step): below that the GPU's
matmuls are not yet busy enough for a bigger batch to be worth less than the recompute (the 7b plain loop does
7.5k tokens/s at 1 x ~1,100 tokens and 11.4k at 4 x ~1,100; vlmops' 7b LoRA at 20 GiB did 10.6k with micro-batches
of 4 x 1,135 tokens under recompute, 7.7k with micro-batches of 1 without it, 7.4k with 1 and selective recompute,
H200, 2026-12-02). Full training of the 7b on an H200 (126 GiB) runs micro-batches of 4 without recompute: 8.8k
tokens/s, against 5.6k with it.

With compiled decoder layers there is a third way, chosen first when it gives bigger micro-batches: **selective
recompute**. The compiler's partitioner keeps only a share of the layer activations it would keep
(`activation_budget`, torch's `activation_memory_budget`) and recomputes the cheapest of the rest in the backward
pass. Fewer, bigger micro-batches then fit: the 1.3b at 16 GiB trained at 50.9k tokens/s with micro-batches of
8 samples and a budget of 0.5 (11.8 GiB), against 31.7k with micro-batches of 4 and no recompute (11.4 GiB), in
the same run on an H200. The budget is never set below `SELECTIVE_MIN_BUDGET`, the share measured.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from vlmops.plural import counted

log = logging.getLogger(__name__)

GIB = 2**30
RESERVE_GIB = 2.0
# Measured on an H200 with the GPU speed levers (bench/RESULTS.md "Training speed"): the 7b at 2 x ~1,100 tokens
# without recompute beat 4 x ~1,100 with it, and 1 x ~1,100 lost; the 1.3b never gained from recompute.
SATURATING_TOKENS = 2048
# With compiled layers, inductor recomputes the cheap pointwise ops itself: the saved activations measured
# 0.9x (7b) and 0.65x (1.3b) of the plain estimate; the larger share is kept, to stay on the safe side.
COMPILED_ACTIVATION_SHARE = 0.9
# The 7b's SAM tower at 1024x1024 (4,096 patches, global-attention layers) holds large transients while it runs,
# one image per ~1,100-token sample: a 7b LoRA micro-batch of 8 x 1,088 tokens peaked 2.5 GiB above the estimate
# without this term (H200, 2026-12-01).
HIGH_RES_VISION_BYTES_PER_TOKEN = 300_000
# The same towers replayed from CUDA graphs of one image (`train.vision_graphs`): one image's working set, kept by
# the graphs' pool (reserved rather than allocated, counted all the same).
HIGH_RES_VISION_GRAPH_BYTES = 2**29
# What full training falls back to on a GPU it does not fit (`resolve_deepspeed`): parameters and 70% of the
# optimizer state on the GPU, the rest on the host.
OFFLOAD_PRESET = "zero3-offload-partial"
# Selective recompute keeps at least this share of the compiled layers' activations (the share measured; less
# recomputes matmuls too, and full recompute is then the better trade).
SELECTIVE_MIN_BUDGET = 0.5
TRAINED_PARAM_BYTES = 16  # float32 weight + gradient + AdamW's two moments
GRADIENT_BYTES = 4  # the float32 gradient, allocated in the backward pass and freed after the optimizer step
AUTOCAST_COPY_BYTES = 2  # the bf16 copy autocast makes of a float32 master weight
ACTIVATION_BYTES = 2  # bf16 / fp16 activations (train.precision fp32: 4)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model: parameter counts and the language model's sizes."""

    total_params: int
    trained_params: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    frozen_bytes: int = 2
    """Bytes per frozen parameter (2: bf16/fp16 weights; 4: float32 masters in full training)."""
    master_weights: bool = False
    """Trained weights are float32 masters under autocast (full training without DeepSpeed)."""
    fused_loss: bool = False
    """The LM head and the loss run fused (train.fused_loss): no logits are kept."""
    compiled: bool = False
    """The decoder layers are compiled (train.compile)."""
    high_res_vision: bool = False
    """The model has the hybrid 7b's high-resolution (SAM) tower."""
    vision_graphs: bool = False
    """The frozen towers run from CUDA graphs of one image (train.vision_graphs)."""
    activation_bytes: int = ACTIVATION_BYTES
    """Bytes per activation and logit: 2 under bf16 / fp16 autocast, 4 with train.precision fp32."""
    ddp: bool = False
    """Several processes without DeepSpeed: DDP keeps a bucket of every trained gradient for the whole run (the
    Trainer leaves gradient_as_bucket_view off), beside the gradients themselves."""

    @classmethod
    def from_config(
        cls, config: Any, trained_params: int, frozen_bytes: int = 2, master_weights: bool = False
    ) -> ModelShape:
        """The shape of a DeepSeek-VL config, its parameters counted on the meta device (no memory, no weights)."""
        text = config.text_config
        return cls(
            high_res_vision=hasattr(config, "high_res_vision_config"),
            total_params=count_parameters(config),
            trained_params=trained_params,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            vocab_size=text.vocab_size,
            frozen_bytes=frozen_bytes,
            master_weights=master_weights,
        )

    def persistent_bytes(self) -> int:
        """What stays allocated through the whole step: weights, the optimizer state, the vision graphs' pool and
        DDP's gradient buckets."""
        trained = self.trained_params * (TRAINED_PARAM_BYTES - GRADIENT_BYTES)
        graphs = HIGH_RES_VISION_GRAPH_BYTES if self.high_res_vision and self.vision_graphs else 0
        buckets = self.trained_params * GRADIENT_BYTES if self.ddp else 0
        return (self.total_params - self.trained_params) * self.frozen_bytes + trained + graphs + buckets

    def transient_bytes(self, tokens: int, per_token: int, accumulates: bool) -> int:
        """What comes and goes within a micro-batch's forward and backward on top of `persistent_bytes`: the
        gradients, autocast's weight copies and `tokens` x `per_token` of activations.

        The backward pass frees each layer's activations and weight copies as it fills in that layer's gradients,
        so without accumulation the peak is the larger of the two (measured on the full 7b, H200: 113.2 GiB at
        4 x 1,135 tokens without recompute, 105.0 with it). With accumulation the gradients of the earlier
        micro-batches are there all along (128.7 GiB at 2 x 1,135 tokens, 2 accumulated)."""
        gradients, copies = self._gradients_and_copies()
        activations = tokens * per_token
        return gradients + copies + activations if accumulates else max(gradients, copies + activations)

    def activation_room(self, memory_bytes: float, accumulates: bool) -> float:
        """Bytes left for activations in `memory_bytes` (negative: not even the weights and gradients fit)."""
        gradients, copies = self._gradients_and_copies()
        room = memory_bytes - self.persistent_bytes() - RESERVE_GIB * GIB - copies
        if accumulates:
            return room - gradients
        return room if room + copies >= gradients else -1.0

    def _gradients_and_copies(self) -> tuple[int, int]:
        """Bytes of the trained weights' gradients and of autocast's bf16 copies of them (float32 masters only)."""
        copies = self.trained_params * AUTOCAST_COPY_BYTES if self.master_weights else 0
        return self.trained_params * GRADIENT_BYTES, copies

    def bytes_per_token(self, recompute: bool, activation_budget: float = 1.0) -> int:
        """Activation and logit memory of one token of a micro-batch; `activation_budget` < 1: selective recompute
        keeping that share of the layer activations (compiled layers, no full recompute)."""
        layer = (13 * self.hidden_size + 4 * self.intermediate_size) * self.activation_bytes
        if self.compiled:
            layer = int(layer * COMPILED_ACTIVATION_SHARE)
        if recompute:
            kept = self.num_layers * self.hidden_size * self.activation_bytes + layer
        else:
            kept = int(self.num_layers * layer * activation_budget)
        vision = HIGH_RES_VISION_BYTES_PER_TOKEN if self.high_res_vision and not self.vision_graphs else 0
        return kept + vision + (0 if self.fused_loss else self.vocab_size * self.logit_bytes)

    @property
    def logit_bytes(self) -> int:
        """Bytes per logit of a micro-batch (no fused loss): itself, the loss's float32 copy of a 16-bit one and its
        float32 gradient."""
        return self.activation_bytes + (4 if self.activation_bytes < 4 else 0) + 4

    def activation_budget_for(self, room: float, tokens: int) -> float:
        """The share of the layer activations that `tokens` tokens may keep in `room` bytes (may exceed 1)."""
        full = self.bytes_per_token(False)
        other = self.bytes_per_token(False, 0.0)  # what the budget does not shrink: vision transients, logits
        return (room / tokens - other) / max(1, full - other)


def count_parameters(config: Any) -> int:
    """Parameters of the model a transformers config describes, built on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's samples are split, and whether activations are recomputed."""

    micro_batch: int
    """Samples per micro-batch (unpacked); with packing, the average."""
    grad_accum: int
    recompute: bool
    packing_tokens: int | None
    """Tokens per packed micro-batch (None: not packed)."""
    estimate_gib: float
    """Estimated peak GPU memory of the plan."""
    activation_budget: float = 1.0
    """Below 1: selective recompute, the compiled layers keep this share of their activations."""

    def describe(self) -> str:
        split = f"{self.packing_tokens} packed tokens" if self.packing_tokens else counted(self.micro_batch, "sample")
        recompute = "on" if self.recompute else "off"
        if self.activation_budget < 1:
            recompute = f"selective (activation budget {self.activation_budget:g})"
        return f"micro-batch {split} x {self.grad_accum} accumulation, recompute {recompute}, ~{self.estimate_gib:.1f} GiB estimated"


def plan_batch(
    shape: ModelShape,
    memory_gib: float,
    samples_per_step: int,
    longest: int,
    mean_length: float,
    packing: bool,
    recompute: bool | None = None,
) -> BatchPlan:
    """The fastest split of `samples_per_step` samples that fits `memory_gib` (see the module docstring).

    Args:
        longest: the longest sample of the training split, in tokens (a padded micro-batch is this wide).
        mean_length: the mean sample length: with packing, a step holds about `samples_per_step` x this many tokens.
        recompute: None chooses; True / False is what the config asked for.

    Raises ValueError when not even one sample fits.
    """
    if samples_per_step < 1 or longest < 1:
        raise ValueError("plan_batch needs at least one sample per step and a positive longest length")
    memory = memory_gib * GIB
    step_tokens = max(longest, math.ceil(samples_per_step * mean_length))
    sizes = _micro_batch_sizes(samples_per_step, longest, step_tokens, packing)

    def biggest(checkpointed: bool) -> int:
        """Tokens of the biggest micro-batch that fits (0: not even the longest sample)."""
        per_token = shape.bytes_per_token(checkpointed)
        return next((t for t, accumulates in sizes if t * per_token <= shape.activation_room(memory, accumulates)), 0)

    choices = [recompute] if recompute is not None else [False, True]
    best: tuple[bool, int] | None = None
    for checkpointed in choices:
        tokens = biggest(checkpointed)
        if tokens == 0:
            continue
        if best is None:
            best = (checkpointed, tokens)
            if tokens >= min(SATURATING_TOKENS, step_tokens):
                break  # busy enough without recompute
        elif tokens > best[1]:
            best = (checkpointed, tokens)
    selective = _selective(shape, memory, sizes) if recompute is None else None
    if selective is not None and (best is None or selective[1] > best[1]):
        budget, tokens = selective
        return _plan(shape, samples_per_step, longest, step_tokens, packing, False, tokens, budget)
    if best is None:
        raise ValueError(_no_sample_fits(shape, memory_gib, longest, samples_per_step > 1, recompute))
    checkpointed, tokens = best
    return _plan(shape, samples_per_step, longest, step_tokens, packing, checkpointed, tokens)


def _no_sample_fits(
    shape: ModelShape, memory_gib: float, longest: int, accumulates: bool, recompute: bool | None
) -> str:
    """Why not even one sample of `longest` tokens fits `memory_gib`, and what to change."""
    need = estimate_peak_bytes(shape, longest, True, 1.0, accumulates) / GIB
    lora = "" if shape.trained_params < shape.total_params // 2 else "train with LoRA, "  # a LoRA run trains LoRA
    fixes = f"raise train.memory_gib, lower data.max_length, {lora}or use a DeepSpeed offload preset"
    if recompute is not False:
        return (
            f"train.memory_gib {memory_gib:g}: not even one sample of {longest} tokens fits (about {need:.1f} GiB "
            f"needed with recompute): {fixes} (train.deepspeed)"
        )
    # train.gradient_checkpointing: false ruled recompute out: that, not the budget, may be what does not fit.
    without = estimate_peak_bytes(shape, longest, False, 1.0, accumulates) / GIB
    problem = (
        f"train.memory_gib {memory_gib:g}: not even one sample of {longest} tokens fits without recompute "
        f"(train.gradient_checkpointing: false; about {without:.1f} GiB needed, {need:.1f} with recompute)"
    )
    if need <= memory_gib:
        return f"{problem}: set train.gradient_checkpointing: auto (or true)"
    return f"{problem}: set train.gradient_checkpointing: auto and {fixes} (train.deepspeed)"


def _micro_batch_sizes(samples_per_step: int, longest: int, step_tokens: int, packing: bool) -> list[tuple[int, bool]]:
    """(tokens, whether the step accumulates) of each micro-batch size, biggest first: packed, the step in 1, 2,
    3, ... even rows (never shorter than the longest sample); padded, a divisor of the step's samples times the
    longest sample."""
    if packing:
        rows = {max(longest, math.ceil(step_tokens / k)) for k in range(1, samples_per_step + 1)}
        return [(tokens, tokens < step_tokens) for tokens in sorted(rows, reverse=True)]
    divisors = [d for d in range(samples_per_step, 0, -1) if samples_per_step % d == 0]
    return [(d * longest, d < samples_per_step) for d in divisors]


def estimate_peak_bytes(
    shape: ModelShape, tokens: int, checkpointed: bool, activation_budget: float, accumulates: bool
) -> int:
    """Estimated peak GPU memory of micro-batches of `tokens` tokens, reserve included."""
    per_token = shape.bytes_per_token(checkpointed, activation_budget)
    return shape.persistent_bytes() + int(RESERVE_GIB * GIB) + shape.transient_bytes(tokens, per_token, accumulates)


def _selective(shape: ModelShape, memory: float, sizes: list[tuple[int, bool]]) -> tuple[float, int] | None:
    """(activation budget, micro-batch tokens) of the biggest micro-batch selective recompute fits, if any."""
    if not shape.compiled:
        return None  # the budget is the compiler's: eager layers keep everything
    for tokens, accumulates in sizes:
        budget = shape.activation_budget_for(shape.activation_room(memory, accumulates), tokens)
        if budget >= SELECTIVE_MIN_BUDGET:
            return (math.floor(budget * 20) / 20 if budget < 1 else 1.0), tokens
    return None


def _plan(
    shape: ModelShape,
    samples_per_step: int,
    longest: int,
    step_tokens: int,
    packing: bool,
    checkpointed: bool,
    tokens: int,
    activation_budget: float = 1.0,
) -> BatchPlan:
    """The plan whose micro-batches hold `tokens` tokens."""
    if packing:
        grad_accum = math.ceil(step_tokens / tokens)
        budget = max(longest, math.ceil(step_tokens / grad_accum))  # even micro-batches
        micro_batch = max(1, round(samples_per_step / grad_accum))
        used = budget
    else:
        micro_batch = tokens // longest
        grad_accum = samples_per_step // micro_batch
        budget = None
        used = micro_batch * longest
    estimate = estimate_peak_bytes(shape, used, checkpointed, activation_budget, grad_accum > 1) / GIB
    return BatchPlan(micro_batch, grad_accum, checkpointed, budget, round(estimate, 2), activation_budget)


def fits_without_deepspeed(shape: ModelShape, memory_gib: float, longest: int) -> bool:
    """Whether training holds one sample of `longest` tokens, with recompute (and gradient accumulation), in
    `memory_gib` without DeepSpeed."""
    return estimate_peak_bytes(shape, longest, True, 1.0, accumulates=True) <= memory_gib * GIB


def gpu_memory_gib(memory_gib: float | None) -> float:
    """The budget: `train.memory_gib`, or 90% of this process's GPU (the rest for fragmentation and other users)."""
    if memory_gib is not None:
        return memory_gib
    import torch

    return 0.9 * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
