"""The device profile file: what was measured where, the fitted predictors and their honest validation."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwnas.config import MacroConfig
from hwnas.space.genotype import SPACE_NAME, WIDTH_CHOICES, normalize_width
from hwnas import jsonio
from hwnas.jsonio import atomic_write_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KIND = "hwnas-device-profile"
# Fingerprint fields every profile records (older ones only these); hwnas.profiling.fingerprint.LATENCY_KEYS
# are the ones compared.
FINGERPRINT_KEYS = ("cpu_model", "cores", "machine", "onnxruntime_version")
VALIDATION_KEYS = ("n", "mape", "within_5pct", "within_10pct", "spearman", "kendall", "noise_ceiling_within_10pct")


# The strict reader every hwnas file goes through (kept importable from here for older callers).
read_json = jsonio.read_json


def block_widths(blocks: Any) -> tuple[float, ...]:
    """The channel fractions per stage whose blocks a profile's blocks section holds, at every combination of stages
    (`width_choices`); a profile measured before elastic width holds full width's only: (1.0,)."""
    choices = blocks.get("width_choices") if isinstance(blocks, dict) else None
    return tuple(sorted(float(w) for w in choices)) if isinstance(choices, list) and choices else (1.0,)


def _check_width_choices(blocks: dict[str, Any]) -> None:
    """ValueError naming the field unless blocks.width_choices (when present) lists stage fractions, full width among them."""
    if "width_choices" not in blocks:
        return
    choices = blocks["width_choices"]
    ok = isinstance(choices, list) and 1.0 in choices and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and w in WIDTH_CHOICES for w in choices)
    if not ok:
        raise ValueError(f"blocks.width_choices must list stage width fractions among {list(WIDTH_CHOICES)}, 1.0 "
                         f"included; got {choices!r}")


@dataclass
class DeviceProfile:
    """A measured latency profile of one device for one space + macro config (see DESIGN.md)."""

    name: str
    device: dict[str, Any]  # fingerprint + threads + graph optimization level + timing config
    macro: MacroConfig
    validation: dict[str, Any]
    space: str = SPACE_NAME
    sentinel: dict[str, Any] = field(default_factory=dict)  # {"arch": ..., "latency_ms": ...}
    # {"overhead_ms", "fixed_ms", "ops_ms", "width_fixed_ms", "width_choices"} (the last two since elastic width)
    blocks: dict[str, Any] = field(default_factory=dict)
    calibration: list[dict[str, Any]] = field(default_factory=list)  # {"arch_id", "x", "depth", "width", "latency_ms"}
    validation_set: list[dict[str, Any]] = field(default_factory=list)  # + "latency_ms_b"
    predictors: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> fitted parameters
    default_predictor: str = "calibrated"
    meta: dict[str, Any] = field(default_factory=dict)  # created, elapsed, config, notes

    @property
    def widths(self) -> tuple[float, ...]:
        """Stage width fractions this profile's blocks cover (every combination of them); (1.0,): full width only."""
        return block_widths(self.blocks)

    def covers_width(self, width: Any = None) -> bool:
        """Whether the blocks cover `width` (a fraction per stage; () = full), or with None every elastic width."""
        wanted = WIDTH_CHOICES if width is None else normalize_width(width)
        return set(wanted) <= set(self.widths)

    def to_dict(self) -> dict[str, Any]:
        """The profile JSON object."""
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": KIND,
            "name": self.name,
            "device": self.device,
            "space": {"name": self.space, "macro": self.macro.to_dict()},
            "sentinel": self.sentinel,
            "blocks": self.blocks,
            "calibration": self.calibration,
            "validation_set": self.validation_set,
            "predictors": self.predictors,
            "default_predictor": self.default_predictor,
            "validation": self.validation,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "DeviceProfile":
        """Parse a profile object; errors name the bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"not a device profile: expected a JSON object, got {type(data).__name__}")
        if data.get("kind") != KIND:
            raise ValueError(f"not a device profile: 'kind' is {data.get('kind')!r}, expected {KIND!r}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {version!r}; this hwnas reads version {SCHEMA_VERSION}")
        for key in ("name", "device", "space", "validation", "blocks", "predictors", "default_predictor"):
            if key not in data:
                raise ValueError(f"missing field {key!r}")
        space = data["space"]
        if not isinstance(space, dict) or "name" not in space or "macro" not in space:
            raise ValueError("field 'space' must be an object with 'name' and 'macro'")
        if space["name"] != SPACE_NAME:
            raise ValueError(f"profile is for space {space['name']!r}, this hwnas searches {SPACE_NAME!r}")
        try:
            macro = MacroConfig.from_dict(space["macro"])
        except ValueError as err:
            raise ValueError(f"space.{err}") from None
        for key in ("device", "validation", "blocks", "predictors", "sentinel", "meta"):
            if not isinstance(data.get(key, {}), dict):
                raise ValueError(f"field {key!r} must be an object")
        for key in ("calibration", "validation_set"):
            rows = data.get(key, [])
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ValueError(f"field {key!r} must be a list of objects")
        bad = [k for k, v in data["predictors"].items() if not isinstance(v, dict)]
        if bad:
            raise ValueError(f"predictors.{bad[0]} must be an object")
        if not isinstance(data["default_predictor"], str):
            raise ValueError("field 'default_predictor' must be a predictor name")
        _check_width_choices(data["blocks"])
        missing = [k for k in VALIDATION_KEYS if k not in data["validation"]]
        if missing:
            raise ValueError(f"validation block is missing {missing}")
        if data["default_predictor"] not in data["predictors"]:
            raise ValueError(f"default_predictor {data['default_predictor']!r} is not among predictors {sorted(data['predictors'])}")
        return cls(
            name=str(data["name"]), device=data["device"], macro=macro, validation=data["validation"],
            space=space["name"], sentinel=data.get("sentinel", {}), blocks=data["blocks"],
            calibration=list(data.get("calibration", [])), validation_set=list(data.get("validation_set", [])),
            predictors=data["predictors"], default_predictor=data["default_predictor"], meta=data.get("meta", {}),
        )

    def save(self, path: str | Path) -> None:
        """Write the profile atomically (temp file + os.replace)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, expected_macro: MacroConfig | None = None) -> "DeviceProfile":
        """Read and validate a profile; ValueError names the file and problem; warns on another device."""
        path = Path(path)
        data = read_json(path, "device profile")
        try:
            profile = cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        if expected_macro is not None and profile.macro != expected_macro:
            raise ValueError(
                f"{path}: profile was measured for macro {profile.macro.to_dict()}, "
                f"but the networks use macro {expected_macro.to_dict()}; run `hwnas profile` for that macro"
            )
        match = profile.fingerprint_match()
        if match.other:
            msg = (
                f"{path}: profile was measured on another device ({match.describe()}); "
                "its latency predictions are for that device, not this machine"
            )
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
        return profile

    def fingerprint_summary(self) -> str:
        """The identifying fingerprint fields, for messages."""
        return ", ".join(f"{k}={self.device.get(k)!r}" for k in FINGERPRINT_KEYS)

    def fingerprint_match(self, here: dict[str, Any] | None = None):  # -> fingerprint.FingerprintMatch
        """This machine's profile ("same"), another device's ("other"), or too old to tell ("unknown")."""
        from hwnas.profiling.fingerprint import compare_fingerprints

        return compare_fingerprints(self.device, here)

    def matches_this_device(self) -> bool:
        """True unless a latency-relevant fingerprint key differs from this machine's (old profiles: True)."""
        return not self.fingerprint_match().other
