"""Latency of architectures with different macros (the elastic resolution): one profile's predictor per macro."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from hwnas.config import MacroConfig
from hwnas.predictors.base import LatencyPredictor
from hwnas.space.genotype import Genotype

if TYPE_CHECKING:
    from hwnas.profiling.device_profile import DeviceProfile


class ByMacroPredictor:
    """Routes each genotype to the fitted predictor of its macro; a macro without one is a clear error."""

    def __init__(self, predictors: Mapping[MacroConfig, LatencyPredictor]) -> None:
        if not predictors:
            raise ValueError("need at least one predictor")
        self.predictors = dict(predictors)

    @classmethod
    def from_profiles(cls, profiles: Sequence["DeviceProfile"]) -> "ByMacroPredictor":
        """Each profile's default predictor, keyed by the macro it was measured for (one profile per macro)."""
        from hwnas.predictors import create_predictor

        by_macro: dict[MacroConfig, LatencyPredictor] = {}
        for profile in profiles:
            if profile.macro in by_macro:
                raise ValueError(f"two profiles cover the same macro {profile.macro.to_dict()}; pass one per resolution")
            by_macro[profile.macro] = create_predictor(profile)
        return cls(by_macro)

    def predict(self, genotypes: Sequence[Genotype]) -> np.ndarray:
        """Predicted latency (ms) of each genotype, from the predictor of its macro."""
        out = np.empty(len(genotypes))
        groups: dict[MacroConfig, list[int]] = {}
        for i, g in enumerate(genotypes):
            groups.setdefault(g.macro, []).append(i)
        for macro, rows in groups.items():
            if macro not in self.predictors:
                have = sorted(m.resolution for m in self.predictors)
                raise ValueError(f"no latency profile for macro {macro.to_dict()}; profiles cover resolutions {have}")
            out[rows] = self.predictors[macro].predict([genotypes[i] for i in rows])
        return out
