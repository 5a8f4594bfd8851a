"""This process's resident memory from /proc/self/status (Linux), and its peak over a stretch of work: the host-memory
benchmarks reset the high-water mark after their imports, whose peak would otherwise hide any growth."""

from __future__ import annotations

from pathlib import Path


def status_kib(key: str) -> int:
    """A `kB` figure of /proc/self/status (VmRSS: resident now, VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status (this benchmark needs Linux)")


def reset_peak() -> int:
    """Sets VmHWM to VmRSS, so that VmHWM is the peak from here on; returns VmRSS in KiB."""
    resident = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    return resident
