"""Device latency profiling: ONNX export, the timing methodology, profiles and where the shipped ones live."""
from __future__ import annotations

import json
from pathlib import Path

from hwnas.config import DEFAULT_MACRO, MacroConfig

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"


def default_profile_path(macro: MacroConfig = DEFAULT_MACRO, directory: Path | None = None, threads: int = 1,
                         provider: str = "CPUExecutionProvider", elastic_width: bool = False) -> Path | None:
    """The shipped profiles/<name>.json for `macro`, `threads` and `provider` not measured on another device, else None.

    A profile whose fingerprint equals this machine's is preferred to one too old to tell; either must still
    pass the sentinel check (hwnas.profiling.sentinel_check) before it is trusted. `elastic_width`: only a profile
    whose blocks cover every elastic width (one measured before elastic width cannot predict narrowed networks).
    """
    from hwnas.profiling.device_profile import block_widths
    from hwnas.profiling.fingerprint import compare_fingerprints, device_fingerprint
    from hwnas.space.genotype import WIDTH_CHOICES

    directory = PROFILES_DIR if directory is None else Path(directory)
    if not directory.is_dir():
        return None
    here = device_fingerprint()
    found: dict[str, Path] = {}
    for path in sorted(directory.glob("*.json")):
        try:  # a light read: a broken file here must not stop the pipeline from finding a good one
            data = json.loads(path.read_text())
            device = data["device"]
            wanted = (data["space"]["macro"] == macro.to_dict() and device.get("threads", 1) == threads
                      and device.get("provider", "CPUExecutionProvider") == provider
                      and (not elastic_width or set(WIDTH_CHOICES) <= set(block_widths(data["blocks"]))))
            verdict = compare_fingerprints(device, here).verdict if wanted else "other"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        found.setdefault(verdict, path)
    return found.get("same") or found.get("unknown")


__all__ = ["PROFILES_DIR", "default_profile_path"]
