"""Where a profiled stretch of GPU work spent its time: busy against wall, by kernel group, and what the host was doing
while the GPU waited (both benchmarks' `--profile`)."""

from __future__ import annotations

import itertools
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


def _busy_stretches(kernels: list[tuple[str, float, float]]) -> list[list[float]]:
    """The union of the kernels' intervals as sorted [start, end] stretches (overlapping streams counted once)."""
    merged: list[list[float]] = []
    for _, start, end in sorted(kernels, key=lambda k: k[1]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def idle_timeline(kernels: list[tuple[str, float, float]], slices: int = 10) -> list[str]:
    """One line: the GPU's idle time (every gap, however short) in each of `slices` equal parts of the stretch from
    the first kernel's start to the last one's end, in ms: where in a call the GPU waits (a prefill phase, the decode
    steps, the tail). A gap across a boundary counts in both parts by its share."""
    merged = _busy_stretches(kernels)
    if not merged:
        return ["GPU idle by tenth of the stretch (ms): -"]
    origin, finish = merged[0][0], merged[-1][1]
    width = (finish - origin) / slices or 1.0
    idle = [0.0] * slices
    for a, b in itertools.pairwise(merged):
        start, end = a[1], b[0]
        for part in range(int((start - origin) // width), min(slices, int((end - origin) // width) + 1)):
            low, high = origin + part * width, origin + (part + 1) * width
            idle[part] += max(0.0, min(end, high) - max(start, low))
    label = "tenth" if slices == 10 else f"1/{slices}"
    return [f"GPU idle by {label} of the stretch (ms): " + " ".join(f"{value / 1e3:.1f}" for value in idle)]


def idle_gaps(
    kernels: list[tuple[str, float, float]],
    host_ops: list[tuple[str, float, float]],
    count: int = 8,
    min_us: float = 200,
) -> list[str]:
    """Lines: the GPU's idle gaps of at least `min_us` (between the union of the kernels' intervals), how many and how
    long in all, then the `count` longest, each with the host ops that explain it: of the ops covering at least half
    the gap, the three shortest (the innermost: what the host was busy with, not the step that encloses everything).
    `kernels`, `host_ops`: (name, start, end) in microseconds on one clock."""
    merged = _busy_stretches(kernels)
    gaps = sorted(
        ((b[0] - a[1], a[1], b[0]) for a, b in itertools.pairwise(merged) if b[0] - a[1] >= min_us),
        reverse=True,
    )
    origin = merged[0][0] if merged else 0.0
    lines = [f"GPU idle gaps >= {min_us / 1e3:g} ms: {len(gaps)}, {sum(g[0] for g in gaps) / 1e3:.1f} ms in all"]
    for length, start, end in gaps[:count]:
        covering = [
            (op_end - op_start, name)
            for name, op_start, op_end in host_ops
            if min(op_end, end) - max(op_start, start) >= length / 2
        ]
        names = [name for _, name in sorted(covering)[:3]]
        lines.append(
            f"  {length / 1e3:8.1f} ms at +{(start - origin) / 1e3:.1f} ms: {', '.join(names) or '(no host op)'}"
        )
    return lines


def cpu_ops(prof: Any) -> list[tuple[str, float, float]]:
    """(name, start, end) in microseconds of every host event a finished `torch.profiler.profile` recorded."""
    import torch

    return [
        (e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CPU
    ]


def cuda_kernels(prof: Any) -> list[tuple[str, float, float]]:
    """(name, start, end) in microseconds of every GPU event a finished `torch.profiler.profile` recorded."""
    import torch

    return [
        (e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]


def op_tables(prof: Any, rows: int = 25) -> str:
    """The top ops by GPU time including their children, then by their own GPU time per input shape (with
    `record_shapes`): which host op launched the eager elementwise kernels and copies, and on what tensors."""
    total = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    own = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cuda_time_total", row_limit=2 * rows, max_name_column_width=50, max_shapes_column_width=90
    )
    return f"{total}\nby own GPU time and input shape:\n{own}\n{kernel_sources(prof, rows)}"


def kernel_sources(prof: Any, rows: int = 25) -> str:
    """Lines: the kernels by total GPU time, each with the host op that launched it and that op's input shapes (kernels
    replayed from a CUDA graph have none: their launch is the graph's)."""
    spent: dict[tuple[str, str, str], list[float]] = {}
    attributed: dict[str, float] = {}
    for event in prof.events():
        for kernel in getattr(event, "kernels", []):
            key = (kernel.name[:70], event.name[:40], str(event.input_shapes)[:110])
            entry = spent.setdefault(key, [0.0, 0])
            entry[0] += kernel.duration
            entry[1] += 1
            attributed[kernel.name] = attributed.get(kernel.name, 0.0) + kernel.duration
    lines = ["kernels by the host op that launched them (total ms, count, kernel, op, op's input shapes):"]
    for (kernel, op, shapes), (total, count) in sorted(spent.items(), key=lambda item: -item[1][0])[:rows]:
        lines.append(f"  {total / 1e3:9.1f} {count:6d}  {kernel:70}  {op:40}  {shapes}")
    alone: dict[str, float] = {}
    for name, start, end in cuda_kernels(prof):
        alone[name] = alone.get(name, 0.0) + end - start
    lines.append("kernel time no host op launched (CUDA graph replays), total ms:")
    unlaunched = {name: total - attributed.get(name, 0.0) for name, total in alone.items()}
    for name, total in sorted(unlaunched.items(), key=lambda item: -item[1])[:10]:
        if total > 0:
            lines.append(f"  {total / 1e3:9.1f}  {name[:100]}")
    return "\n".join(lines)
