"""Latency of architectures with different macros, depths and widths (the elastic macro): one profile per resolution."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from hwnas.config import MacroConfig
from hwnas.predictors.base import LatencyPredictor, describe_shape
from hwnas.profiling.blocks import ShapeKey
from hwnas.space.genotype import Genotype

if TYPE_CHECKING:
    from hwnas.profiling.device_profile import DeviceProfile

Key = tuple[MacroConfig, ShapeKey]


class ByMacroPredictor:
    """Routes each genotype to the fitted predictor of its macro, depth and width; a macro without one is a clear error.

    Built from profiles, it derives the predictor of a reduced depth or width from its macro's profile on first use
    (a profile measured without elastic width cannot give a reduced width: a ValueError naming it).
    """

    def __init__(self, predictors: Mapping[MacroConfig, LatencyPredictor],
                 profiles: Mapping[MacroConfig, "DeviceProfile"] | None = None, name: str | None = None) -> None:
        if not predictors:
            raise ValueError("need at least one predictor")
        self.predictors: dict[Key, LatencyPredictor] = {(m, p.shape_key): p for m, p in predictors.items()}
        self.profiles = dict(profiles or {})
        self.name = name  # the predictor kind derived for other depths and widths (None: each profile's default)

    @classmethod
    def from_profiles(cls, profiles: Sequence["DeviceProfile"], name: str | None = None) -> "ByMacroPredictor":
        """Each profile's predictor `name` (None: its default), keyed by the macro it was measured for."""
        from hwnas.predictors import create_predictor

        by_macro: dict[MacroConfig, "DeviceProfile"] = {}
        for profile in profiles:
            if profile.macro in by_macro:
                raise ValueError(f"two profiles cover the same macro {profile.macro.to_dict()}; pass one per resolution")
            by_macro[profile.macro] = profile
        return cls({m: create_predictor(p, name) for m, p in by_macro.items()}, by_macro, name)

    def _predictor(self, key: Key) -> LatencyPredictor:
        from hwnas.predictors import create_predictor

        macro, (depth, width) = key
        if key not in self.predictors:
            if macro in self.profiles:
                self.predictors[key] = create_predictor(self.profiles[macro], self.name, depth=depth, width=width)
            elif any(m == macro for m, _ in self.predictors):
                raise ValueError(f"no predictor for {describe_shape((depth, width))} at macro {macro.to_dict()}; build "
                                 "this ByMacroPredictor from_profiles to predict reduced depths and widths")
            else:
                have = sorted({m.resolution for m, _ in self.predictors})
                raise ValueError(f"no latency profile for macro {macro.to_dict()}; profiles cover resolutions {have}")
        return self.predictors[key]

    def predict(self, genotypes: Sequence[Genotype]) -> np.ndarray:
        """Predicted latency (ms) of each genotype, from the predictor of its macro, depth and width."""
        out = np.empty(len(genotypes))
        groups: dict[Key, list[int]] = {}
        for i, g in enumerate(genotypes):
            groups.setdefault((g.macro, g.shape_key), []).append(i)
        for key, rows in groups.items():
            out[rows] = self._predictor(key).predict([genotypes[i] for i in rows])
        return out
