"""What identifies a device for latency purposes, read before any timing: CPU, ISA, caches, OS, runtime.

Every reader is best effort: a file or tool missing on macOS, Windows or an ARM board leaves its keys out,
never raises. `compare_fingerprints` tells a stored fingerprint of *this machine* from *another device's*
by the latency-relevant keys, and says "cannot tell" for a fingerprint written before a key existed.
"""
from __future__ import annotations

import copy
import functools
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys whose difference changes latency: a stored fingerprint is this machine's only if all of them agree.
LATENCY_KEYS = (
    "machine", "system", "cpu_vendor", "cpu_model", "cpu_family", "cpu_model_id", "cpu_stepping", "cores",
    "isa", "nominal_mhz", "cache", "hypervisor", "onnxruntime_version",
)
# Keys of profiles written before this module read more than these: present in every stored fingerprint.
LEGACY_KEYS = ("cpu_model", "cores", "machine", "onnxruntime_version")
# ISA extensions that change which kernels onnxruntime (MLAS) picks; anything else in the flags is noise here.
ISA_FEATURES = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",  # x86
    "neon", "asimd", "asimddp", "asimdhp", "fphp", "i8mm", "bf16", "sve", "sve2", "sme",  # ARM
)
ARM_IMPLEMENTERS = {"0x41": "ARM", "0x42": "Broadcom", "0x43": "Cavium", "0x48": "HiSilicon", "0x4e": "NVIDIA",
                    "0x51": "Qualcomm", "0x61": "Apple", "0xc0": "Ampere"}


def _read(path: str | Path) -> str | None:
    """A small text file's content, stripped, or None when absent or unreadable."""
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return None


def cpuinfo_fields() -> dict[str, str]:
    """/proc/cpuinfo's `key: value` lines, lower-case keys, the first processor's value of each ({} if none).

    The whole file is read: ARM kernels put board-wide lines ("Hardware", "Model") after the last processor.
    """
    text = _read("/proc/cpuinfo")
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip().lower(), value.strip())
    return out


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, platform otherwise)."""
    info = cpuinfo_fields()
    for key in ("model name", "model", "hardware"):  # x86 / ARMv7; a board's name (Raspberry Pi); its SoC
        if info.get(key) and not info[key].isdigit():
            return info[key]
    return _sysctl("machdep.cpu.brand_string") or platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _sysctl(name: str) -> str | None:
    """`sysctl -n name` on macOS/BSD, else None."""
    if platform.system() not in ("Darwin", "FreeBSD"):
        return None
    try:
        done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def cpu_identity(info: dict[str, str]) -> dict[str, Any]:
    """Vendor, family, model number and stepping: what tells two CPUs with a generic name ("AMD EPYC") apart."""
    out: dict[str, Any] = {}
    if "vendor_id" in info:  # x86 Linux
        out["cpu_vendor"] = info["vendor_id"]
        for key, name in (("cpu family", "cpu_family"), ("model", "cpu_model_id"), ("stepping", "cpu_stepping")):
            if info.get(key, "").isdigit():
                out[name] = int(info[key])
    elif "cpu implementer" in info:  # ARM Linux: implementer / part / variant / revision
        impl = info["cpu implementer"].lower()
        out["cpu_vendor"] = ARM_IMPLEMENTERS.get(impl, impl)
        out["cpu_family"] = info.get("cpu architecture")
        out["cpu_model_id"] = info.get("cpu part")
        out["cpu_stepping"] = f"{info.get('cpu variant', '?')}r{info.get('cpu revision', '?')}"
    else:  # Windows: "AMD64 Family 23 Model 1 Stepping 2, AuthenticAMD"
        m = re.search(r"Family (\d+) Model (\d+) Stepping (\d+), (\w+)", platform.processor() or "")
        if m:
            out.update(cpu_family=int(m[1]), cpu_model_id=int(m[2]), cpu_stepping=int(m[3]), cpu_vendor=m[4])
    return {k: v for k, v in out.items() if v is not None}


def isa_features(info: dict[str, str]) -> list[str] | None:
    """The latency-relevant ISA extensions this CPU reports (x86 `flags`, ARM `Features`), sorted."""
    flags = info.get("flags") or info.get("features")
    if flags is None:
        if platform.system() == "Darwin" and platform.machine() == "arm64":
            return ["asimd", "neon"]  # every Apple silicon core has them
        return None
    have = set(flags.split())
    return sorted(f for f in ISA_FEATURES if f in have)


def nominal_mhz(info: dict[str, str]) -> int | None:
    """The CPU's nominal (base) clock in MHz, from a source that does not move with load; None if unknown.

    cpufreq's base/max frequency, else the "@ 2.00GHz" of the model name, else, in a virtual machine, the
    fixed clock the hypervisor reports as "cpu MHz" (on bare metal that field is the current, moving clock).
    """
    freq = "/sys/devices/system/cpu/cpu0/cpufreq/"
    for name in ("base_frequency", "cpuinfo_max_freq"):
        khz = _read(freq + name)
        if khz and khz.isdigit():
            return int(round(int(khz) / 1000, -1))
    m = re.search(r"@\s*([\d.]+)\s*GHz", info.get("model name", ""))
    if m:
        return int(round(float(m[1]) * 1000, -1))
    if "hypervisor" in info.get("flags", "").split():
        try:
            return int(round(float(info["cpu mhz"]), -1))
        except (KeyError, ValueError):
            return None
    hz = _sysctl("hw.cpufrequency")
    return int(round(int(hz) / 1e6, -1)) if hz and hz.isdigit() else None


def cache_sizes(cpu: int = 0) -> dict[str, str] | None:
    """lscpu-style cache sizes of one CPU: {"L1d": "32K", "L1i": "32K", "L2": "1024K", "L3": "32768K"}."""
    root = Path(f"/sys/devices/system/cpu/cpu{cpu}/cache")
    out: dict[str, str] = {}
    for index in sorted(root.glob("index*")) if root.is_dir() else []:
        level, kind, size = (_read(index / f) for f in ("level", "type", "size"))
        if level and size:
            suffix = {"Data": "d", "Instruction": "i"}.get(kind or "", "")
            out[f"L{level}{suffix}"] = size
    if not out:  # macOS
        for name, key in (("hw.l1dcachesize", "L1d"), ("hw.l2cachesize", "L2"), ("hw.l3cachesize", "L3")):
            size = _sysctl(name)
            if size and size.isdigit() and int(size) > 0:
                out[key] = f"{int(size) // 1024}K"
    return out or None


def hypervisor(info: dict[str, str]) -> tuple[bool | None, str | None]:
    """(runs under a hypervisor, its vendor): the cpuinfo flag, and Xen's sysfs, DMI or lscpu for the vendor."""
    if "flags" not in info:
        return None, None
    if "hypervisor" not in info["flags"].split():
        return False, None
    vendor = _read("/sys/hypervisor/type") or _read("/sys/class/dmi/id/sys_vendor")
    if vendor is None:
        try:
            done = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5, check=False,
                                  env={**os.environ, "LC_ALL": "C"})
            m = re.search(r"^Hypervisor vendor:\s*(.+)$", done.stdout, re.M)
            vendor = m[1].strip() if m else None
        except (OSError, subprocess.SubprocessError):
            vendor = None
    return True, vendor


def os_release() -> str:
    """The OS name and version ("Debian GNU/Linux 12 (bookworm)", "macOS 14.5", "Windows 11")."""
    if platform.system() == "Linux":
        return _linux_pretty_name()
    if platform.system() == "Darwin":
        return f"macOS {platform.mac_ver()[0]}"
    return f"{platform.system()} {platform.release()}".strip()


def _linux_pretty_name() -> str:
    """PRETTY_NAME of os-release; read by hand where platform.freedesktop_os_release is missing (Python 3.9)."""
    read = getattr(platform, "freedesktop_os_release", None)
    if read is not None:
        try:
            return read().get("PRETTY_NAME", "Linux")
        except OSError:
            return "Linux"
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition("=")
            if key.strip() == "PRETTY_NAME":
                return value.strip().strip("\"'") or "Linux"
        return "Linux"
    return "Linux"


def device_fingerprint() -> dict[str, Any]:
    """Facts that change latency and are known before any measurement (absent keys: could not be read)."""
    return copy.deepcopy(_fingerprint())


@functools.lru_cache(maxsize=1)
def _fingerprint() -> dict[str, Any]:
    """device_fingerprint, read once per process (it runs a subprocess and parses /proc)."""
    import onnxruntime as ort

    info = cpuinfo_fields()
    is_vm, vm_vendor = hypervisor(info)
    found: dict[str, Any] = {
        "cpu_model": cpu_model(),
        **cpu_identity(info),
        "cores": usable_cores(),
        "machine": platform.machine(),
        "system": platform.system(),
        "isa": isa_features(info),
        "nominal_mhz": nominal_mhz(info),
        "cache": cache_sizes(),
        "hypervisor": is_vm,
        "hypervisor_vendor": vm_vendor,
        "os": os_release(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime_version": ort.__version__,
        "providers": ort.get_available_providers(),
    }
    return {k: v for k, v in found.items() if v is not None}


@dataclass(frozen=True)
class FingerprintMatch:
    """How a stored fingerprint relates to this machine's: "same", "other" (a key differs) or "unknown"."""

    verdict: str
    differing: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (stored, here)
    unknown: tuple[str, ...] = ()  # latency keys the stored fingerprint lacks (written by an older hwnas)

    @property
    def same(self) -> bool:
        """All latency-relevant keys equal."""
        return self.verdict == "same"

    @property
    def other(self) -> bool:
        """Another device: at least one latency-relevant key differs."""
        return self.verdict == "other"

    def describe(self) -> str:
        """One line for messages."""
        if self.other:
            return "another device: " + "; ".join(f"{k} {a!r} here {b!r}" for k, a, b in
                                                  ((k, *v) for k, v in self.differing.items()))
        if self.unknown:
            return f"cannot tell (the profile does not record {', '.join(self.unknown)}): verify with the sentinel"
        return "this machine"


def _normal(value: Any) -> Any:
    """JSON round trips turn tuples into lists; compare the values, not their container types."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def compare_fingerprints(stored: dict[str, Any], here: dict[str, Any] | None = None,
                         keys: tuple[str, ...] = LATENCY_KEYS) -> FingerprintMatch:
    """Whether `stored` (a profile's device block) is this machine's, another device's, or cannot be told.

    Per key: absent on both sides agrees (e.g. no cache sizes on macOS); present only here means the stored
    fingerprint predates the key ("unknown"); present there but not here, or unequal, is a difference.
    """
    here = device_fingerprint() if here is None else here
    differing, unknown = {}, []
    for key in keys:
        if key not in stored:
            if key in here:
                unknown.append(key)
            continue
        a, b = _normal(stored[key]), _normal(here.get(key))
        if a != b:
            differing[key] = (stored[key], here.get(key))
    verdict = "other" if differing else "unknown" if unknown else "same"
    return FingerprintMatch(verdict, differing, tuple(unknown))


def device_slug(threads: int = 1) -> str:
    """A file-name-safe profile name for this machine: CPU model, usable cores, onnxruntime threads."""
    model = re.sub(r"\((?:R|TM|tm|r)\)|\bCPU\b|\bProcessor\b|@.*$", " ", cpu_model())
    words = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or platform.machine().lower()
    return f"{words}-{usable_cores()}c-{threads}t"
