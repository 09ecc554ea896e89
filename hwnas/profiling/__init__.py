"""Device latency profiling: ONNX export, the timing methodology, profiles and where the shipped ones live."""
from __future__ import annotations

import json
from pathlib import Path

from hwnas.config import DEFAULT_MACRO, MacroConfig

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"


def default_profile_path(macro: MacroConfig = DEFAULT_MACRO, directory: Path | None = None) -> Path | None:
    """The shipped profiles/<name>.json for `macro` measured on a device like this one, else None."""
    from hwnas.profiling.device_profile import FINGERPRINT_KEYS
    from hwnas.profiling.fingerprint import device_fingerprint

    directory = PROFILES_DIR if directory is None else Path(directory)
    if not directory.is_dir():
        return None
    here = device_fingerprint()
    for path in sorted(directory.glob("*.json")):
        try:  # a light read: a broken file here must not stop the pipeline from finding a good one
            data = json.loads(path.read_text())
            same_macro = data["space"]["macro"] == macro.to_dict()
            same_device = all(data["device"].get(k) == here.get(k) for k in FINGERPRINT_KEYS)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if same_macro and same_device:
            return path
    return None


__all__ = ["PROFILES_DIR", "default_profile_path"]
