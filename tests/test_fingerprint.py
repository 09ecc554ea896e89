import json
import warnings

import pytest

from hwnas.profiling import fingerprint as fp
from hwnas.profiling.device_profile import DeviceProfile
from hwnas.profiling.fingerprint import LEGACY_KEYS, compare_fingerprints, device_fingerprint

ZEN1_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 2
cpu MHz\t\t: 1996.249
flags\t\t: fpu sse4_2 avx fma avx2 f16c hypervisor

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC
"""

PI4_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Hardware\t: BCM2835
Revision\t: c03114
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""


def fake_files(monkeypatch, files: dict[str, str]) -> None:
    """Serve /proc and /sys reads from `files`; everything else is absent, no subprocess runs."""
    monkeypatch.setattr(fp, "_read", lambda path: files.get(str(path)))
    monkeypatch.setattr(fp, "_sysctl", lambda name: None)
    monkeypatch.setattr(fp.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no lscpu")))
    fp._fingerprint.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_cache():
    fp._fingerprint.cache_clear()
    yield
    fp._fingerprint.cache_clear()


def test_generic_x86_name_is_told_apart_by_family_model_stepping(monkeypatch):
    fake_files(monkeypatch, {"/proc/cpuinfo": ZEN1_CPUINFO})
    f = device_fingerprint()
    assert (f["cpu_model"], f["cpu_vendor"], f["cpu_family"], f["cpu_model_id"], f["cpu_stepping"]) == \
        ("AMD EPYC", "AuthenticAMD", 23, 1, 2)
    assert f["isa"] == ["avx", "avx2", "f16c", "fma", "sse4_2"]  # sorted; no AVX-512
    assert f["hypervisor"] is True and "hypervisor_vendor" not in f
    assert f["nominal_mhz"] == 2000  # a VM reports the host's fixed clock; rounded to 10 MHz
    assert "cache" not in f  # no /sys cache files: absent, not a crash


def test_arm_board_reads_implementer_part_and_features(monkeypatch):
    fake_files(monkeypatch, {"/proc/cpuinfo": PI4_CPUINFO})
    f = device_fingerprint()
    assert f["cpu_model"] == "Raspberry Pi 4 Model B Rev 1.4"
    assert (f["cpu_vendor"], f["cpu_model_id"], f["isa"]) == ("ARM", "0xd08", ["asimd"])
    assert "hypervisor" not in f and "nominal_mhz" not in f


def test_no_proc_or_sys_at_all_still_fingerprints(monkeypatch):
    """macOS/Windows-like: every file missing leaves keys out and never raises."""
    fake_files(monkeypatch, {})
    monkeypatch.setattr(fp.platform, "processor", lambda: "AMD64 Family 23 Model 1 Stepping 2, AuthenticAMD")
    monkeypatch.setattr(fp.platform, "system", lambda: "Windows")
    f = device_fingerprint()
    assert (f["cpu_family"], f["cpu_model_id"], f["cpu_stepping"], f["cpu_vendor"]) == (23, 1, 2, "AuthenticAMD")
    assert {"isa", "cache", "hypervisor"}.isdisjoint(f) and f["system"] == "Windows"
    json.dumps(f)  # it goes into a profile


def test_cache_sizes_lscpu_style(monkeypatch):
    root = "/sys/devices/system/cpu/cpu0/cache"
    levels = {"index0": ("1", "Data", "32K"), "index1": ("1", "Instruction", "32K"), "index2": ("2", "Unified", "1024K")}
    files = {f"{root}/{i}/{n}": v for i, vals in levels.items() for n, v in zip(("level", "type", "size"), vals)}
    monkeypatch.setattr(fp, "_read", lambda path: files.get(str(path)))
    monkeypatch.setattr(fp.Path, "is_dir", lambda self: str(self) == root)
    monkeypatch.setattr(fp.Path, "glob", lambda self, pat: [fp.Path(root) / i for i in levels])
    assert fp.cache_sizes() == {"L1d": "32K", "L1i": "32K", "L2": "1024K"}


def test_compare_names_the_differing_keys():
    here = device_fingerprint()
    assert compare_fingerprints(dict(here), here).same
    zen1 = {**here, "cpu_family": 23, "cpu_model_id": 1, "isa": ["avx2"]}
    match = compare_fingerprints(zen1, {**here, "cpu_family": 25, "cpu_model_id": 17, "isa": ["avx2", "avx512f"]})
    assert match.other and set(match.differing) == {"cpu_family", "cpu_model_id", "isa"}
    assert "cpu_family 23 here 25" in match.describe()


def test_compare_old_fingerprint_cannot_tell_but_a_differing_old_key_is_another_device():
    here = {**device_fingerprint(), "cpu_family": 25}
    old = {k: here[k] for k in LEGACY_KEYS}
    match = compare_fingerprints(old, here)
    assert match.verdict == "unknown" and "cpu_family" in match.unknown and "verify with the sentinel" in match.describe()
    assert compare_fingerprints({**old, "cores": here["cores"] + 1}, here).other


def test_compare_is_symmetric_about_absent_keys_and_list_types():
    here = {"cpu_model": "X", "isa": ("avx2", "fma"), "cores": 2}
    assert compare_fingerprints({"cpu_model": "X", "isa": ["avx2", "fma"], "cores": 2}, here).same  # JSON lists
    assert compare_fingerprints({"cpu_model": "X", "isa": ["avx2"], "cores": 2, "cache": {"L2": "1M"}}, here).other


def synthetic_profile(macro, fingerprint=None) -> DeviceProfile:
    """A profile from made-up timing records (no timing), with `fingerprint` (default: this machine's)."""
    import numpy as np

    from hwnas.config import ProfileConfig
    from hwnas.profiling import profiler

    plan = profiler.make_plan(ProfileConfig(device="synthetic", macro=macro, n_calibration=10, n_validation=5, rounds=2))
    rng = np.random.default_rng(0)
    records = [(key, r, float(rng.uniform(0.01, 0.05)), 1.0) for r in range(2) for key, _ in plan.jobs()]
    return profiler.profile_from_records(plan, records, fingerprint or device_fingerprint())


def test_old_profile_loads_quietly_and_cannot_tell(tmp_path, tiny_macro):
    here = device_fingerprint()
    old = synthetic_profile(tiny_macro, {k: here[k] for k in LEGACY_KEYS})
    path = tmp_path / "old.json"
    old.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "another device" warning
        loaded = DeviceProfile.load(path)
    assert loaded.fingerprint_match().verdict == "unknown" and loaded.matches_this_device()
    full = synthetic_profile(tiny_macro)
    assert full.fingerprint_match().same
    for key in ("cpu_model", "cores", "isa", "cache", "hypervisor", "os", "kernel", "python", "onnxruntime_version"):
        if key in here:
            assert full.device[key] == here[key], key
    assert full.device["provider"] == "CPUExecutionProvider" and full.device["provider_options"] == {}


def test_os_release_without_freedesktop_os_release(monkeypatch):
    """Python 3.9 (the runner's minimum) has no platform.freedesktop_os_release: read /etc/os-release by hand."""
    monkeypatch.setattr(fp.platform, "system", lambda: "Linux")
    monkeypatch.delattr(fp.platform, "freedesktop_os_release", raising=False)
    files = {"/etc/os-release": 'NAME="Debian"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'}

    def read_text(self, *args, **kwargs):
        if str(self) not in files:
            raise FileNotFoundError(str(self))
        return files[str(self)]

    monkeypatch.setattr(fp.Path, "read_text", read_text)
    assert fp.os_release() == "Debian GNU/Linux 12 (bookworm)"
    files.clear()
    assert fp.os_release() == "Linux"
