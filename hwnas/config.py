"""Frozen configuration dataclasses; CLI flags map onto their fields one to one."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class MacroConfig:
    """The network skeleton a cell genotype is placed in."""

    C: int = 16  # channels of the first cell
    layers: int = 5  # cells; reductions sit at layers//3 and 2*layers//3
    in_channels: int = 1
    resolution: int = 16
    classes: int = 10

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"macro.{f.name} must be a positive integer, got {value!r}")
        if self.layers < 3:
            raise ValueError(f"macro.layers must be >= 3 so both reduction cells exist, got {self.layers}")

    def to_dict(self) -> dict[str, int]:
        """Plain dict for JSON files."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "MacroConfig":
        """Parse a dict, naming unknown or missing keys."""
        if not isinstance(data, dict):
            raise ValueError(f"macro must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"macro has unknown keys {sorted(unknown)}; expected {sorted(known)}")
        missing = known - set(data)
        if missing:
            raise ValueError(f"macro is missing keys {sorted(missing)}")
        return cls(**data)


DEFAULT_MACRO = MacroConfig()
