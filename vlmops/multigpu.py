"""What every multi-process GPU launch (torchrun training, per-GPU inference workers) shares."""

from __future__ import annotations

# NVLink multicast (NCCL NVLS, PyTorch symmetric memory, NVSHMEM) stays off: on shared multi-GPU hosts a program
# that uses it can put the host's GPUs out of service. Every child process gets these in its environment.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
