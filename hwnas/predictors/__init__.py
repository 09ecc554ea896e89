"""Latency predictors by name; `create_predictor(profile)` gives the one a profile validated best."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from hwnas.predictors.base import LatencyPredictor, encode_all
from hwnas.predictors.by_macro import ByMacroPredictor
from hwnas.predictors.linear import BlockSumPredictor, CalibratedPredictor, ScaledBlockSumPredictor

if TYPE_CHECKING:
    from hwnas.profiling.device_profile import DeviceProfile

PREDICTORS: dict[str, type[LatencyPredictor]] = {p.name: p for p in (BlockSumPredictor, ScaledBlockSumPredictor, CalibratedPredictor)}


def profile_tables(profile: "DeviceProfile", depth: Sequence[int] = ()) -> tuple[np.ndarray, float]:
    """The summed block table and the fixed latency a profile's block measurements give at `depth` (() = full)."""
    return _depth_table(profile, depth)[:2]


def _depth_table(profile: "DeviceProfile", depth: Sequence[int] = ()):  # -> hwnas.profiling.blocks.DepthTable
    from hwnas.profiling.blocks import depth_tables

    depth = tuple(depth)
    try:
        return depth_tables(profile.macro, profile.blocks, [depth])[depth]
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as err:
        raise ValueError(f"profile {profile.name!r}: blocks section is incomplete ({err!r})") from None


def create_predictor(profile: "DeviceProfile", name: str | None = None, depth: Sequence[int] = ()) -> LatencyPredictor:
    """The fitted predictor `name` (None: the profile's default) for genotypes of `depth` (() = full depth)."""
    name = name or profile.default_predictor
    if name not in PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; known: {', '.join(PREDICTORS)}")
    if name not in profile.predictors:
        raise ValueError(f"profile {profile.name!r} has no fitted {name!r} predictor; it has {sorted(profile.predictors)}")
    table, fixed, counts = _depth_table(profile)
    pred = PREDICTORS[name].from_dict(profile.predictors[name], table, fixed, counts)
    from hwnas.space.genotype import normalize_depth

    depth = normalize_depth(depth, profile.macro)
    if not depth:
        return pred
    table, fixed, counts = _depth_table(profile, depth)
    return pred.with_blocks(table, fixed, depth, counts)


__all__ = ["PREDICTORS", "BlockSumPredictor", "ByMacroPredictor", "CalibratedPredictor", "ScaledBlockSumPredictor", "LatencyPredictor", "create_predictor", "encode_all"]
