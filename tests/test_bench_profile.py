"""bench/profiling.py (both benchmarks' `--profile`): where the GPU's time went, from the profiler's kernel intervals."""

from __future__ import annotations

from bench.profiling import gpu_time_summary, kernel_group


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
