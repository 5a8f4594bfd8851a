"""What makes a training step fast on a GPU, decided once per run and applied to the model.

Measured on an H200 (bench/train_bench.py, bench/RESULTS.md "Training speed"), each lever on its own:

- **Compiled decoder layers** (`train.compile`): `torch.compile` on each Llama decoder layer, not on the whole
  VLM (the whole VLM does not compile cleanly, DESIGN.md §7; the towers, eager, lost speed compiled before SAM's
  attention was folded). Fuses the norms, SwiGLU, rotary embedding and the LoRA branches, and cuts the kernel
  launches that made the step host-bound.
- **Fused linear + cross-entropy** (`train.fused_loss`): Liger Kernel's chunked LM head + loss, over the answer
  positions only: the 102,400-word logits are never materialised (7b, batch 4: ~1.8 GB in float32, twice with
  its gradient). DeepSeek-VL is not in Liger's model map, so the head is applied here, in the model's own
  forward (patched on the instance, so DDP and the Trainer call it as usual).
- **LoRA in the compute dtype**: peft casts each LoRA input to the adapter's float32; under autocast the
  adapter's matmul is bf16 anyway, so the float32 copy of every q/k/v input only costs memory and time.
- **Fused AdamW** (`adamw_torch_fused`): one kernel per step for all trainable tensors.
- **Frozen vision towers from CUDA graphs** (`train.vision_graphs`): where nothing in the towers or the aligner
  trains, `get_image_features` replays a graph of one image per image (vlmops.models.vision_graphs) instead of
  launching SigLIP's and SAM's hundreds of small kernels from Python, which kept the GPU waiting at the start of
  every micro-batch.
- **SAM folded and compiled** (`train.sam_attention: folded`, `train.sam_compile`): the 7b's SAM tower without its
  dense relative-position bias, then through torch.compile (vlmops.models.sam_attention); frozen, it is compiled by
  the graphs' warm-up run and captured as compiled kernels.
- **Padded batches attend causally, without a mask** (`causal_padding`): batches are right-padded, so under causal
  attention no real token can see the padding after it, and the padding's outputs train nothing; without the
  padding mask SDPA takes its FlashAttention kernel, which skips the blocks above the diagonal, instead of the
  memory-efficient kernel with a dense mask. Loss and gradients are unchanged (tests/train/test_train_loop.py).

None of it applies on CPU (the plain path, the reference for the tests), and compile/fused loss are off under
DeepSpeed (ZeRO-3 shards the LM head the fused loss reads; DeepSpeed wraps the layers itself).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmops.config import ConfigError, TrainConfig
from vlmops.models.sam_attention import set_sam_compiled, use_flex_sam_attention, use_folded_sam_attention
from vlmops.models.template import IGNORE_INDEX
from vlmops.models.vision_graphs import graph_image_features, towers_frozen
from vlmops.train.data import next_token_targets

log = logging.getLogger(__name__)

COMPILE_BUCKET = 64
LIGER_HINT = "pip install 'vlmops[gpu]' (Liger Kernel; it needs CUDA and Triton)"


@dataclass(frozen=True)
class SpeedPlan:
    """Which levers a run uses; logged, and recorded in the run's result."""

    compile_layers: bool = False
    fused_loss: bool = False
    fused_adamw: bool = False
    causal_padding: bool = False
    lora_compute_dtype: bool = False
    vision_graphs: bool = False
    """Frozen towers from CUDA graphs where the towers turn out frozen (checked on the model in `apply_speed`)."""
    sam_flex: bool = False
    """The 7b's SAM attention with its relative-position bias inside FlexAttention (`train.sam_attention: flex`)."""
    sam_folded: bool = False
    """The 7b's SAM attention with its relative positions folded into the query and key (`train.sam_attention:
    folded`): no dense bias tensors."""
    sam_compiled: bool = False
    """The 7b's (folded, frozen) SAM tower through torch.compile (`train.sam_compile`)."""
    why_off: dict[str, str] = field(default_factory=dict)
    """For each lever that is off: why (CPU, DeepSpeed, not installed, switched off)."""

    @property
    def pad_to_multiple_of(self) -> int:
        """Padded and packed lengths are multiples of this: compiled layers are specialised per shape (dynamic shapes
        measured slower than the uncompiled layers on the H200), so lengths come in a few buckets
        (`vlmops.train.batching.collator`: packed rows one length, padded batches at most `COMPILED_LENGTHS`)."""
        return COMPILE_BUCKET if self.compile_layers else 1

    def describe(self) -> str:
        on = [f.name for f in dataclasses.fields(self) if f.type == "bool" and getattr(self, f.name)]
        off = [f"{name} ({why})" for name, why in self.why_off.items()]
        return f"speed: on {', '.join(on) or 'nothing'}; off {', '.join(off) or 'nothing'}"


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def plan_speed(train: TrainConfig, cuda: bool, precision: str) -> SpeedPlan:
    """The levers for this run: `auto` turns each on where it applies; `on` insists (an error where it cannot)."""
    why_off: dict[str, str] = {}
    deepspeed = train.deepspeed is not None

    def decide(name: str, setting: str, blocker: str | None) -> bool:
        if setting == "off":
            why_off[name] = f"train.{name}: off"
            return False
        if blocker is None:
            return True
        if setting == "on":
            raise ConfigError([f"train.{name}: on, but {blocker}; set it to auto (or off)"])
        why_off[name] = blocker
        return False

    common = "no CUDA GPU" if not cuda else ("DeepSpeed is on" if deepspeed else None)
    compile_layers = decide("compile", train.compile, common)
    loss_blocker = common or (None if liger_available() else f"Liger Kernel is not installed: {LIGER_HINT}")
    fused_loss = decide("fused_loss", train.fused_loss, loss_blocker)
    lora_dtype = cuda and train.mode == "lora" and precision in ("bf16", "fp16") and not deepspeed
    vision_graphs = decide("vision_graphs", train.vision_graphs, common)
    sam_flex = train.sam_attention == "flex" and decide("sam_flex", "auto", common)
    sam_folded = train.sam_attention == "folded" and decide("sam_folded", "auto", common)
    sam_compiled = decide(
        "sam_compile", train.sam_compile, common or (None if sam_folded else "SAM's attention is not folded")
    )
    return SpeedPlan(
        compile_layers=compile_layers,
        fused_loss=fused_loss,
        fused_adamw=cuda and not deepspeed,
        causal_padding=cuda,
        lora_compute_dtype=lora_dtype,
        vision_graphs=vision_graphs,
        sam_flex=sam_flex,
        sam_folded=sam_folded,
        sam_compiled=sam_compiled,
        why_off=why_off,
    )


def apply_speed(model: Any, plan: SpeedPlan, activation_budget: float = 1.0) -> SpeedPlan:
    """Apply the plan to a loaded (and peft-wrapped) model, in place; returns the plan as applied (a lever the model
    turns out not to allow is off). Call before the Trainer wraps it.

    `activation_budget` < 1 (selective recompute, chosen by the memory policy): the compiled layers keep that share
    of their activations and recompute the rest (torch's `activation_memory_budget`, read when they compile)."""
    top = model.get_base_model() if hasattr(model, "get_base_model") else model
    if plan.lora_compute_dtype:
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):  # peft LoRA layers
                module.cast_input_dtype_enabled = False
    if plan.compile_layers:
        # Many layers share one compiled graph; the limit covers a few shapes per layer (eval, last batch).
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        torch._functorch.config.activation_memory_budget = activation_budget
        for layer in top.model.language_model.layers:
            layer.compile(dynamic=False)
    if plan.fused_loss:
        fuse_loss(top, liger_head_loss())
    if not towers_frozen(top.model):
        trains = "the vision towers or the aligner train"
        for lever, setting in (("vision_graphs", "vision_graphs"), ("sam_compiled", "sam_compile")):
            if getattr(plan, lever):
                plan = dataclasses.replace(plan, **{lever: False}, why_off={**plan.why_off, setting: trains})
    if plan.sam_flex:
        use_flex_sam_attention(top.model)  # before any capture: the graphs record the FlexAttention kernels
    if plan.sam_folded:
        use_folded_sam_attention(top.model)
    if plan.sam_compiled:
        set_sam_compiled(top.model, True)  # compiled by the first call: the graphs' warm-up run, before their capture
    if plan.vision_graphs:
        graph_image_features(top.model, images_per_graph=1)
    log.info(plan.describe())
    return plan


HeadLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(LM head weight, hidden states of the trained positions, their targets) -> the summed cross-entropy."""


def liger_head_loss() -> HeadLoss:
    """Liger Kernel's fused linear + cross-entropy: chunks of positions through the head, the logits of one chunk
    at a time, gradients accumulated in float32."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", accum_dtype=torch.float32)
    return lambda weight, hidden, targets: loss(weight.to(hidden.dtype), hidden, targets)


def reference_head_loss(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same sum, through full logits (the unfused computation; tests compare against it on CPU)."""
    logits = (hidden @ weight.to(hidden.dtype).T).float()
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def fuse_loss(top: Any, head_loss: HeadLoss) -> None:
    """Patch the model's forward (on this instance) so that with labels, the LM head and the loss run as one.

    Same loss as transformers' `ForCausalLMLoss`: targets are the labels shifted by one (or `shift_labels`), the
    sum over trained positions divided by `num_items_in_batch` when given (gradient accumulation), else the
    mean. `trained_index` / `trained_targets` (flat positions of the batch and their targets, found on the CPU by
    the collator: `vlmops.train.packing.with_step_keys`) stand in for the labels without the GPU-to-host read that
    selecting positions from a GPU tensor costs. Without labels (generation, logits wanted) the original forward
    runs.
    """
    original = type(top).forward

    def forward(
        self: Any,
        *args: Any,
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        trained_index: torch.Tensor | None = None,
        trained_targets: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if labels is None and shift_labels is None and trained_targets is None:
            return original(self, *args, logits_to_keep=logits_to_keep, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        hidden = self.model(*args, **kwargs).last_hidden_state
        if trained_index is not None and trained_targets is not None:
            rows, targets = hidden.flatten(0, 1).index_select(0, trained_index), trained_targets
        else:
            if shift_labels is None:
                assert labels is not None
                shift_labels = next_token_targets(labels)
            elif isinstance(logits_to_keep, torch.Tensor):
                hidden = hidden[:, logits_to_keep]
            keep = shift_labels.ne(IGNORE_INDEX)
            rows, targets = hidden[keep], shift_labels[keep]
        weight = self.lm_head.weight
        # nothing to learn in this batch: a zero that still reaches every trained weight
        loss = head_loss(weight, rows, targets) if targets.numel() else 0.0 * (hidden.sum() + weight.sum())
        count = num_items_in_batch if num_items_in_batch is not None else max(1, targets.numel())
        return CausalLMOutputWithPast(loss=loss / count)

    top.forward = types.MethodType(forward, top)
