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


def profile_tables(profile: "DeviceProfile", depth: Sequence[int] = (), width: Sequence[float] = ()) -> tuple[np.ndarray, float]:
    """The summed block table and the fixed latency a profile's block measurements give at `depth` and `width` (() = full)."""
    return _shape_table(profile, depth, width)[:2]


def profile_covers_width(profile: "DeviceProfile", width: Sequence[float] | None = None) -> bool:
    """Whether `profile` can predict networks of `width` (a fraction per stage), or with None of every elastic width."""
    return profile.covers_width(width)


def _shape_table(profile: "DeviceProfile", depth: Sequence[int] = (),
                 width: Sequence[float] = ()):  # -> hwnas.profiling.blocks.ShapeTable
    from hwnas.profiling.blocks import shape_table

    if not profile.covers_width(width):  # before the lookups: a clear message, never a KeyError on a block name
        how = "without elastic width" if profile.widths == (1.0,) else f"at stage widths {list(profile.widths)} only"
        raise ValueError(f"profile {profile.name!r} was measured {how}: it has no blocks for width {list(width)}; "
                         "re-profile with elastic width (`hwnas profile`, ProfileConfig.elastic_width)")
    try:
        return shape_table(profile.macro, profile.blocks, tuple(depth), tuple(width))
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as err:
        raise ValueError(f"profile {profile.name!r}: blocks section is incomplete ({err!r})") from None


def create_predictor(profile: "DeviceProfile", name: str | None = None, depth: Sequence[int] = (),
                     width: Sequence[float] = ()) -> LatencyPredictor:
    """The fitted predictor `name` (None: the profile's default) for genotypes of `depth` and `width` (() = full)."""
    from hwnas.space.genotype import normalize_depth, normalize_width

    name = name or profile.default_predictor
    if name not in PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; known: {', '.join(PREDICTORS)}")
    if name not in profile.predictors:
        raise ValueError(f"profile {profile.name!r} has no fitted {name!r} predictor; it has {sorted(profile.predictors)}")
    depth, width = normalize_depth(depth, profile.macro), normalize_width(width)
    table, fixed, counts = _shape_table(profile)
    pred = PREDICTORS[name].from_dict(profile.predictors[name], table, fixed, counts)
    if not depth and not width:
        return pred
    table, fixed, counts = _shape_table(profile, depth, width)
    return pred.with_blocks(table, fixed, depth, counts, width=width)


__all__ = ["PREDICTORS", "BlockSumPredictor", "ByMacroPredictor", "CalibratedPredictor", "ScaledBlockSumPredictor", "LatencyPredictor", "create_predictor", "encode_all",
           "profile_covers_width", "profile_tables"]
