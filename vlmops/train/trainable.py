"""What trains: the model's parts (vision / aligner / llm), LoRA targets and freezing, for both modes.

Parts of a native DeepSeek-VL checkpoint, by parameter name:

    vision   model.vision_model.* (SigLIP); on the hybrid 7b also model.high_res_vision_model.* (SAM),
             model.high_res_vision_neck.*, model.high_res_vision_proj.* and model.high_res_vision_alpha
    aligner  model.aligner.*
    llm      model.language_model.* and lm_head.*

LoRA targets (`train.lora.targets`): `qkv` (the LLM's q/k/v, the seed's default), `all-linear` (every
linear layer of the LLM, lm_head excluded), `ALL` (every linear layer, vision towers and aligner too,
lm_head excluded, as swift's `--lora_target_modules ALL`), or a regex that must match whole module names
(peft's `fullmatch`), e.g. `model\\.language_model\\.layers\\.\\d+\\.mlp\\..*_proj`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmops.config import TrainConfig
from vlmops.plural import counted

log = logging.getLogger(__name__)

PART_PREFIXES: dict[str, tuple[str, ...]] = {
    "vision": (
        "model.vision_model",
        "model.high_res_vision_model",
        "model.high_res_vision_neck",
        "model.high_res_vision_proj",
        "model.high_res_vision_alpha",
    ),
    "aligner": ("model.aligner",),
    "llm": ("model.language_model", "lm_head"),
}
PARTS = tuple(PART_PREFIXES)
# Trained by default when train.freeze.<part> is null.
MODE_DEFAULT_TRAINED = {"lora": frozenset[str](), "full": frozenset({"aligner", "llm"})}
QKV = ("q_proj", "k_proj", "v_proj")
LORA_MODULE_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class TrainableSummary:
    """What `prepare_trainable` set up; the counts are logged and recorded in the run result."""

    mode: str
    lora_targets: list[str] = field(default_factory=list)
    """Module names that got a LoRA adapter."""
    fully_trained_parts: list[str] = field(default_factory=list)
    """Parts whose own weights train (full mode, or peft `modules_to_save` under LoRA)."""
    trainable_params: int = 0
    total_params: int = 0
    trainable_names: list[str] = field(default_factory=list)

    def describe(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        what = f"LoRA on {counted(len(self.lora_targets), 'module')}" if self.mode == "lora" else "full"
        parts = ", ".join(self.fully_trained_parts) or "none"
        return (
            f"trainable params: {self.trainable_params:,} of {self.total_params:,} ({share:.4f}%); "
            f"{what}; fully trained parts: {parts}"
        )


def part_of(name: str) -> str:
    """The part ('vision', 'aligner', 'llm') a module or parameter name belongs to."""
    for part, prefixes in PART_PREFIXES.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return part
    raise ValueError(
        f"parameter {name!r} belongs to no known part of a DeepSeek-VL model; "
        "this transformers version lays the model out differently than vlmops expects"
    )


def trained_parts(train: TrainConfig) -> set[str]:
    """Parts whose base weights train, from `train.freeze` and the mode's defaults."""
    default = MODE_DEFAULT_TRAINED[train.mode]
    out = set()
    for part in PARTS:
        frozen = getattr(train.freeze, part)
        if (part in default) if frozen is None else not frozen:
            out.add(part)
    return out


def lora_target_modules(model: nn.Module, targets: str) -> tuple[str, set[str]]:
    """The peft `target_modules` regex for `train.lora.targets`, and the module names it selects."""
    names = [name for name, _ in model.named_modules() if name]
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if targets == "qkv":
        chosen = {n for n in linear if part_of(n) == "llm" and n.rsplit(".", 1)[-1] in QKV and n != "lm_head"}
    elif targets == "all-linear":
        chosen = {n for n in linear if part_of(n) == "llm" and n != "lm_head"}
    elif targets == "ALL":
        chosen = {n for n in linear if n != "lm_head"}
    else:
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ValueError(f"train.lora.targets: {targets!r} is not a valid regex ({err})") from None
        modules = dict(model.named_modules())
        chosen = {n for n in names if pattern.fullmatch(n)}
        unsupported = sorted(n for n in chosen if not isinstance(modules[n], LORA_MODULE_TYPES))
        if unsupported:
            shown = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in unsupported[:4])
            raise ValueError(
                f"train.lora.targets: the regex {targets!r} also matches modules LoRA cannot adapt: {shown}; "
                "make it match only linear (or conv/embedding) layers, e.g. end it in `_proj`"
            )
        if not chosen:
            examples = ", ".join(n for n in linear[:3])
            raise ValueError(
                f"train.lora.targets: the regex {targets!r} matches no module name (it must match whole names, "
                f"e.g. {examples}); or use qkv, all-linear or ALL"
            )
        return targets, chosen
    if not chosen:
        raise ValueError(f"train.lora.targets: {targets} selects no linear layer in this model")
    regex = _names_regex(chosen)
    matched = {n for n in names if re.fullmatch(regex, n)}
    if matched != chosen:  # the digit generalisation must not reach other modules
        raise RuntimeError(f"internal: target regex {regex} selects {sorted(matched ^ chosen)[:5]} wrongly")
    return regex, chosen


def _names_regex(names: set[str]) -> str:
    """A compact regex for a set of module names: layer numbers generalised to `\\d+`."""
    templates = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in names})
    return "(?:" + "|".join(templates) + ")"


def prepare_trainable(model: nn.Module, train: TrainConfig, seed: int = 0) -> tuple[nn.Module, TrainableSummary]:
    """Freeze and wrap the model for `train.mode`; returns the model to train (a PeftModel for LoRA)."""
    full_parts = trained_parts(train)
    for name, param in model.named_parameters():
        part_of(name)  # every parameter must belong to a known part
        param.requires_grad_(False)
    summary = TrainableSummary(mode=train.mode, fully_trained_parts=sorted(full_parts))
    if train.mode == "full":
        if not full_parts:
            raise ValueError(
                "train.mode is full but train.freeze freezes every part: unfreeze at least one of "
                "train.freeze.vision / aligner / llm"
            )
        for name, param in model.named_parameters():
            if part_of(name) in full_parts:
                param.requires_grad_(True)
    else:
        model = _apply_lora(model, train, full_parts, summary, seed)
    summary.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    summary.trainable_params = _count_params(model, trainable_only=True)
    summary.total_params = _count_params(model)
    log.info(summary.describe())
    return model, summary


def _apply_lora(
    model: nn.Module, train: TrainConfig, full_parts: set[str], summary: TrainableSummary, seed: int
) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    regex, chosen = lora_target_modules(model, train.lora.targets)
    clash = sorted(n for n in chosen if part_of(n) in full_parts)
    if clash:
        parts = sorted({part_of(n) for n in clash})
        raise ValueError(
            f"train.lora.targets {train.lora.targets!r} puts adapters inside {', '.join(parts)}, which "
            f"train.freeze unfreezes (trained fully): choose one; e.g. set train.freeze.{parts[0]}: true, "
            "or targets that leave that part out"
        )
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    modules_to_save: list[str] = []
    for part in sorted(full_parts):
        for name in PART_PREFIXES[part]:
            if name in modules:
                modules_to_save.append(name)
            elif name in params:
                # peft trains whole modules only; a bare parameter (the hybrid's scalar gate
                # high_res_vision_alpha) keeps its released value.
                log.info("LoRA mode: %s is a bare parameter, not a module; it stays frozen", name)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=train.lora.r,
        lora_alpha=train.lora.alpha,
        lora_dropout=train.lora.dropout,
        target_modules=regex,
        modules_to_save=modules_to_save or None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    summary.lora_targets = sorted(chosen)
    return peft_model


def _count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of the model as it runs: peft's `modules_to_save` copies are counted once."""
    total = 0
    for name, param in model.named_parameters():
        if ".original_module." in name or (trainable_only and not param.requires_grad):
            continue
        # DeepSpeed ZeRO-3 partitions parameters; ds_numel is the full size.
        total += int(getattr(param, "ds_numel", param.numel()))
    return total


def require_grads_on_inputs(model: nn.Module) -> list[str]:
    """Make the outputs of the input embeddings require grad (peft + gradient checkpointing needs it), but
    only for the towers that have something to train behind them; returns the hooked modules' names.

    transformers' `enable_input_require_grads` hooks every tower's embeddings: with a frozen vision side that
    makes SigLIP (and SAM on the 7b) record their whole graph and run their backward for nothing (measured on
    the 7b LoRA q/k/v case: 24 SigLIP attention backwards per step, and the CPU time that goes with them). The
    handles go where transformers keeps its own (`_require_grads_hooks`), so `disable_input_require_grads`
    removes these too.
    """
    trained = {part_of(_base_name(name)) for name, param in model.named_parameters() if param.requires_grad}
    top = _unwrapped(model)
    for handle in getattr(top, "_require_grads_hooks", []):  # called again: hook once
        handle.remove()
    handles, hooked = [], []
    for name, module in model.named_modules():
        base = _base_name(name)
        is_text_embedding = base.endswith("language_model.embed_tokens")
        is_vision_embedding = base.endswith(("vision_model.embeddings.patch_embedding", "vision_encoder.patch_embed"))
        if (is_text_embedding and "llm" in trained) or (is_vision_embedding and "vision" in trained):
            handles.append(module.register_forward_hook(_output_requires_grad))
            hooked.append(base)
    setattr(top, "_require_grads_hooks", handles)  # noqa: B010 (nn.Module's typed __setattr__)
    return hooked


def route_input_grads(model: nn.Module) -> None:
    """Make transformers' own `enable_input_require_grads` on this model instance do `require_grads_on_inputs`.

    The Trainer turns activation checkpointing on inside `train()`, and that calls the model's
    `enable_input_require_grads` (transformers 5, for every model whose main input is `input_ids`): every
    tower's embeddings, so the frozen SigLIP and SAM recorded a graph and ran their backward on every step of a
    recomputing run (LoRA and full alike; on the 7b ~195 needless linear backwards per step). Only the towers
    with trained weights behind them get input gradients now.
    """
    top = _unwrapped(model)
    setattr(top, "enable_input_require_grads", lambda: require_grads_on_inputs(model))  # noqa: B010
    if getattr(top, "_require_grads_hooks", None):  # hooked already (peft does when checkpointing was on)
        require_grads_on_inputs(model)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself when not wrapped)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _output_requires_grad(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def _base_name(name: str) -> str:
    """A parameter or module name without peft's wrapper prefix and adapter infixes."""
    name = name.removeprefix("base_model.model.")
    for infix in (".base_layer", ".modules_to_save.default", ".original_module"):
        name = name.replace(infix, "")
    return name
