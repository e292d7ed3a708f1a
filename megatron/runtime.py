"""Process-level settings that make CPU training faster, the process's memory as the OS sees it, and optional
packages imported with a one-line hint at the extra that installs them."""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
from types import ModuleType

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def keep_freed_memory_in_process() -> bool:
    """Stops glibc from handing large freed blocks back to the OS; returns whether it took effect.

    By default glibc serves every allocation of 128 KiB or more with its own mmap and unmaps it when
    freed, so each training step page-faults its activations and gradients in again. Serving them from
    the heap and never trimming it made the MoE layer's forward+backward 18% faster and StructMoE's 30%
    faster on the 2-core CI machine (benchmarks/moe_layer.py). The cost: memory freed by the process is
    kept for reuse rather than returned to the OS. Only for CPU runs; a no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def resident_memory_mb() -> float | None:
    """This process's resident set size in MiB (Linux /proc), None where unavailable: logged every interval so a
    slow leak over a long run shows up as a rising line."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class MissingExtra(ImportError):
    """An optional package a feature needs is not installed: one line naming the pip extra that brings it."""


def optional_import(module: str, extra: str, feature: str, also: str = "requirements.txt") -> ModuleType:
    """`module`, or one line saying which extra of this package installs it (pip install -e '.[EXTRA]'), and
    which requirements file (`also`) does too."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{feature} needs {module.split('.')[0]}, which is not installed: "
                           f"pip install -e '.[{extra}]' (or pip install -r {also})") from None
