"""A vision tower's forward through torch.compile, with the image count a dynamic size (frozen towers, GPU).

`set_tower_compiled` swaps a tower's forward (per instance) for a compiled one, or undoes that; what is compiled is
the tower's own forward, so the same function, fused. A tower the compiler fails on (tracing or the backend) runs
eagerly from then on, with a warning; a tower already compiled with the same backend keeps its compiled forward (each
engine built over a model asks again: nothing compiles twice). The first call compiles: the engine and the trainer
make it before any CUDA graph is captured, in the capture's warm-up run.

- SAM, the 7b's high-resolution tower: `vlmops.models.sam_attention.set_sam_compiled` (with its attention folded).
- SigLIP, the 384 px tower of both models: `set_siglip_compiled`. Its layers are matmuls, SDPA and the elementwise
  work around them (layer norms, biases, GELU, residual adds, the q/k/v reshapes), which eagerly are separate kernels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)

Backend = str | Callable[..., Any]

# Inductor's fused kernels keep intermediates in float32; with precision casts emulated they round each value that
# eager code stores in the tower's dtype, as transformers' separate kernels do (bf16: without it, the compiled SigLIP
# changed 4 of 192 greedy tokens of a trained tiny model against `generate`, H200, torch 2.11). Without the pattern
# matcher: it rewrites `x + F.linear(...)` into addmm, which rounds differently (see vlmops.infer.fast_decode).
INDUCTOR_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {
    "pattern_matcher": False,
    "emulate_precision_casts": True,
}


def set_tower_compiled(
    towers: Iterable[torch.nn.Module], on: bool, backend: Backend, label: str, exact_casts: bool = False
) -> int:
    """Each of `towers` through torch.compile (`on`) or eagerly, undoing an earlier call; how many are compiled now.
    `label` names the tower in the warning of a failed compilation; `exact_casts`: inductor with `INDUCTOR_OPTIONS`."""
    changed = 0
    for tower in {id(tower): tower for tower in towers}.values():
        compiled_with = getattr(tower.__dict__.get("forward"), "compiled_with", None)
        if on and compiled_with is not None and compiled_with == backend:
            changed += 1
            continue
        if compiled_with is not None:
            del tower.forward  # the instance's forward shadowed the class's
        if on:
            tower.forward = _compiled_forward(tower.forward, backend, label, exact_casts)
            changed += 1
    return changed


def set_siglip_compiled(model: Any, on: bool, backend: Backend = "inductor") -> int:
    """The SigLIP tower of `model` (its VLM's `vision_model`) through torch.compile or eagerly; see the module."""
    towers = [m.vision_model for m in model.modules() if isinstance(getattr(m, "vision_model", None), torch.nn.Module)]
    return set_tower_compiled(towers, on, backend, "SigLIP tower", exact_casts=True)


def _compiled_forward(eager: Callable[..., Any], backend: Backend, label: str, exact_casts: bool) -> Callable[..., Any]:
    options = INDUCTOR_OPTIONS if exact_casts and backend == "inductor" else None
    compiled = torch.compile(eager, backend=backend, options=options)
    failed: list[str] = []

    def forward(pixel_values: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if not failed:
            if pixel_values is not None:
                torch._dynamo.maybe_mark_dynamic(pixel_values, 0)
            try:
                return compiled(pixel_values, *args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as err:  # tracing or the backend failed, not the tower
                failed.append(str(err).splitlines()[0])
                log.warning("%s: torch.compile failed (%s); running it eagerly", label, failed[0])
        return eager(pixel_values, *args, **kwargs)

    forward.compiled_with = backend  # type: ignore[attr-defined]
    return forward
