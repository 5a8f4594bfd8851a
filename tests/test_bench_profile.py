"""bench/profiling.py (both benchmarks' `--profile`): where the GPU's time went, from the profiler's kernel intervals."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.profiling import gpu_time_summary, idle_gaps, idle_timeline, kernel_group, kernel_sources


def test_busy_time_counts_overlapping_kernels_once_and_groups_them() -> None:
    kernels = [
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 0.0, 10_000.0),
        ("triton_poi_fused_add_mul_0", 5_000.0, 15_000.0),  # overlaps the GEMM (another stream)
        ("pytorch_flash::flash_fwd_kernel", 20_000.0, 30_000.0),
        ("Memcpy HtoD (Pageable -> Device)", 40_000.0, 41_000.0),
        ("void at::native::vectorized_elementwise_kernel", 41_000.0, 45_000.0),
    ]
    assert gpu_time_summary(kernels, wall_us=50_000.0) == [
        "GPU busy 30.0 ms of 50.0 ms wall (idle 40%)",
        "  matmul                    10.0 ms    33% of busy",
        "  compiled / Triton         10.0 ms    33% of busy",
        "  attention                 10.0 ms    33% of busy",
        "  other                      4.0 ms    13% of busy",
        "  copies                     1.0 ms     3% of busy",
    ]
    assert kernel_group("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_TNT") == "matmul"
    assert kernel_group("multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"


def test_idle_gaps_name_what_the_host_was_doing() -> None:
    kernels = [
        ("gemm_a", 0.0, 1_000.0),
        ("gemm_b", 500.0, 2_000.0),  # overlaps: one busy stretch
        ("gemm_c", 2_100.0, 3_000.0),  # a 0.1 ms gap: too short to list
        ("gemm_d", 8_000.0, 9_000.0),  # 5 ms idle before it
        ("gemm_e", 10_000.0, 11_000.0),  # 1 ms idle before it
    ]
    host = [
        ("ProfilerStep#9", 0.0, 11_000.0),  # encloses everything: not the explanation
        ("Optimizer.step#AdamW.step", 2_900.0, 8_100.0),
        ("aten::item", 3_000.0, 7_900.0),
        ("aten::add_", 7_950.0, 7_960.0),  # too small a share of the gap
        ("DataLoader.__next__", 9_000.0, 9_950.0),
    ]
    assert idle_gaps(kernels, host) == [
        "GPU idle gaps >= 0.2 ms: 2, 6.0 ms in all",
        "       5.0 ms at +3.0 ms: aten::item, Optimizer.step#AdamW.step, ProfilerStep#9",
        "       1.0 ms at +9.0 ms: DataLoader.__next__, ProfilerStep#9",
    ]
    assert idle_gaps([], host) == ["GPU idle gaps >= 0.2 ms: 0, 0.0 ms in all"]


def test_the_idle_timeline_puts_every_gap_in_its_part_of_the_stretch() -> None:
    """Every gap counts, the 0.1 ms one too; a gap across a boundary is split between the parts it spans."""
    kernels = [
        ("a", 0.0, 1_000.0),
        ("b", 1_100.0, 2_000.0),  # 0.1 ms idle in the first fifth
        ("c", 3_000.0, 5_000.0),  # 1 ms idle: the second fifth ends at 4 ms, so it is the second fifth's
        ("d", 7_000.0, 10_000.0),  # 2 ms idle, 5-7 ms: 1 ms in the third fifth (ends at 6 ms), 1 ms in the fourth
    ]
    assert idle_timeline(kernels, slices=5) == ["GPU idle by 1/5 of the stretch (ms): 0.1 1.0 1.0 1.0 0.0"]
    assert idle_timeline([]) == ["GPU idle by tenth of the stretch (ms): -"]


def test_kernels_are_traced_to_the_host_op_that_launched_them() -> None:
    """Each kernel with its launching op and that op's shapes, largest total first; kernel time no op launched (CUDA
    graph replays) listed apart."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def kernel(name: str, start: float, end: float) -> SimpleNamespace:
        return SimpleNamespace(name=name, device_type=cuda, time_range=SimpleNamespace(start=start, end=end))

    def op(name: str, shapes: list[list[int]], *launched: tuple[str, float]) -> SimpleNamespace:
        kernels = [SimpleNamespace(name=k, duration=d) for k, d in launched]
        return SimpleNamespace(name=name, device_type=cpu, input_shapes=shapes, kernels=kernels)

    events = [
        op("aten::mm", [[8, 4096], [4096, 4096]], ("nvjet_gemm", 900.0), ("nvjet_gemm", 900.0)),
        op("aten::add", [[8, 4096], [8, 4096]], ("elementwise_add", 50.0)),
        kernel("nvjet_gemm", 0.0, 900.0),
        kernel("nvjet_gemm", 1_000.0, 1_900.0),
        kernel("elementwise_add", 2_000.0, 2_050.0),
        kernel("elementwise_add", 3_000.0, 3_400.0),  # replayed from a graph: no op launched it
    ]
    lines = kernel_sources(SimpleNamespace(events=lambda: events)).splitlines()
    assert lines[1].split()[:4] == ["1.8", "2", "nvjet_gemm", "aten::mm"]
    assert lines[1].endswith("[[8, 4096], [4096, 4096]]")
    assert lines[2].split()[:4] == ["0.1", "1", "elementwise_add", "aten::add"]
    assert lines[3].startswith("kernel time no host op launched")
    assert lines[4:] == ["        0.4  elementwise_add"]
