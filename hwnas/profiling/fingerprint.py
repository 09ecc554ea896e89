"""What identifies a device for latency purposes: CPU model, cores, runtime versions."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, platform otherwise)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def device_fingerprint() -> dict[str, object]:
    """Facts that change latency and are known before any measurement."""
    import onnxruntime as ort

    return {
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "machine": platform.machine(),
        "system": platform.system(),
        "onnxruntime_version": ort.__version__,
        "providers": ort.get_available_providers(),
    }


def device_slug(threads: int = 1) -> str:
    """A file-name-safe profile name for this machine: CPU model, usable cores, onnxruntime threads."""
    import re

    model = re.sub(r"\((?:R|TM|tm|r)\)|\bCPU\b|\bProcessor\b|@.*$", " ", cpu_model())
    words = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or platform.machine().lower()
    return f"{words}-{usable_cores()}c-{threads}t"
