"""Where a profiled stretch of GPU work spent its time: busy against wall, and by kernel group (both benchmarks'
`--profile`)."""

from __future__ import annotations

from typing import Any

# Kernel names -> what they do (first match wins); the rest are eager elementwise ops and reductions (the vision
# towers, the Trainer's own).
KERNEL_GROUPS = (
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "wgmma")),
    ("attention", ("flash", "fmha", "attention")),
    ("compiled / Triton", ("triton",)),
    ("optimizer", ("adam",)),
    ("convolution", ("conv",)),
    ("copies", ("memcpy", "memset", "copy")),
)


def kernel_group(name: str) -> str:
    lowered = name.lower()
    return next((group for group, keys in KERNEL_GROUPS if any(k in lowered for k in keys)), "other")


def gpu_time_summary(kernels: list[tuple[str, float, float]], wall_us: float) -> list[str]:
    """Lines: the GPU's busy time (the union of the kernels' intervals, overlapping streams counted once) and its
    share of the wall time, then each kernel group's time and share of the busy time. `kernels`: (name, start,
    end) in microseconds."""
    busy, reach = 0.0, float("-inf")
    for _, start, end in sorted(kernels, key=lambda k: k[1]):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    groups: dict[str, float] = {}
    for name, start, end in kernels:
        group = kernel_group(name)
        groups[group] = groups.get(group, 0.0) + end - start
    idle = 1 - busy / wall_us if wall_us > 0 else 0.0
    lines = [f"GPU busy {busy / 1e3:.1f} ms of {wall_us / 1e3:.1f} ms wall (idle {idle:.0%})"]
    for group, spent in sorted(groups.items(), key=lambda g: -g[1]):
        lines.append(f"  {group:20} {spent / 1e3:9.1f} ms  {spent / max(busy, 1e-9):5.0%} of busy")
    return lines


def cuda_kernels(prof: Any) -> list[tuple[str, float, float]]:
    """(name, start, end) in microseconds of every GPU event a finished `torch.profiler.profile` recorded."""
    import torch

    return [
        (e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
