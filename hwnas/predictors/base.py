"""LatencyPredictor: every predictor is a bias plus one table entry per (pair, op, input), so predict is a lookup."""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import numpy as np

from hwnas.profiling.blocks import N_INPUTS, N_OPS, N_PAIRS, ShapeKey, shape_groups
from hwnas.space.genotype import Genotype
from hwnas.space.ops import GENOTYPE_OPS

_OP_INDEX = {op: i for i, op in enumerate(GENOTYPE_OPS)}
# Offset of pair p's (op, input) block in the flattened table.
_PAIR_BASE = np.arange(N_PAIRS) * (N_OPS * N_INPUTS)
# Rows of a fit whose networks have another depth or width: (row indices, that shape's block table, its fixed ms,
# its pair counts: kept cells running each pair).
Groups = Sequence[tuple[np.ndarray, np.ndarray, float, np.ndarray]]
Tables = Mapping[ShapeKey, tuple[np.ndarray, float, np.ndarray]]  # as hwnas.profiling.blocks.shape_tables gives them
PER_INSTANCE = "per_instance"  # to_dict's count_term: a per-op cost counted once per kept cell running the pair


def encode_all(genotypes: Sequence[Genotype]) -> np.ndarray:
    """(N, 2 * N_PAIRS) integer encodings, the layout of SearchSpace.encode (op, input per pair)."""
    out = np.empty((len(genotypes), 2 * N_PAIRS), dtype=np.int64)
    for row, g in enumerate(genotypes):
        out[row] = [v for op, inp in g.normal + g.reduce for v in (_OP_INDEX[op], inp)]
    return out


_SKIP = GENOTYPE_OPS.index("skip_connect")
REDUCE_CELLS = 2  # never dropped by the elastic depth


def shared_factorized_reduce(x: np.ndarray) -> np.ndarray:
    """(N,) per encoding: stride-2 skip edges (FactorizedReduce) of the reduce cell beyond the first per input.

    Several FactorizedReduce edges reading one cell input run much cheaper together than their isolated
    blocks add up to (onnxruntime shares work between them), an interaction a per-block sum cannot see.
    """
    x = np.asarray(x)
    ops, inputs = x[:, N_PAIRS:][:, 0::2], x[:, N_PAIRS:][:, 1::2]  # reduce cell pairs
    per_input = [((ops == _SKIP) & (inputs == j)).sum(axis=1) for j in (0, 1)]
    return REDUCE_CELLS * sum(np.maximum(n - 1, 0) for n in per_input).astype(float)


def describe_shape(key: ShapeKey) -> str:
    """"depth full, width [0.5, 1.0, 1.0]": a shape key for messages."""
    depth, width = key
    return f"depth {list(depth) or 'full'}, width {list(width) or 'full'}"


def flat_index(x: np.ndarray) -> np.ndarray:
    """(N, N_PAIRS) positions in the flattened (pair, op, input) table of encodings `x`."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != 2 * N_PAIRS:
        raise ValueError(f"encodings must have shape (N, {2 * N_PAIRS}), got {x.shape}")
    return _PAIR_BASE + x[:, 0::2] * N_INPUTS + x[:, 1::2]


class LatencyPredictor:
    """scikit-learn style: `fit(genotypes, latency_ms)` sets `intercept_` and `table_`; `predict` is pure."""

    name = "base"
    depth: tuple[int, ...] = ()  # the elastic depth whose cells block_table sums (() = every cell)
    width: tuple[float, ...] = ()  # the elastic width whose channel counts block_table's blocks have (() = full)

    def __init__(self, block_table: np.ndarray, fixed_ms: float, counts: np.ndarray | None = None) -> None:
        self.block_table = np.asarray(block_table, dtype=float)  # (N_PAIRS, N_OPS, N_INPUTS) summed block ms
        self.fixed_ms = float(fixed_ms)  # genotype-independent parts: stem, preprocessing, head, run overhead
        # Kept cells that run each pair (blocks.pair_counts): a per-op cost is paid once per op instance, so a
        # normal-cell pair counts 3 times at 3 kept normal cells and once at 1. None: once per pair, the rule of
        # profiles fitted before hwnas counted instances (their coefficients mean that).
        self.per_instance = counts is not None
        self.counts = np.ones(N_PAIRS) if counts is None else np.asarray(counts, dtype=float).reshape(N_PAIRS)

    @property
    def shape_key(self) -> ShapeKey:
        """(depth, width) of the networks this predictor's tables are for (Genotype.shape_key)."""
        return self.depth, self.width

    def fit(self, genotypes: Sequence[Genotype], latency_ms: np.ndarray, tables: Tables | None = None,
            depth_tables: Mapping[tuple[int, ...], tuple[np.ndarray, float, np.ndarray]] | None = None) -> "LatencyPredictor":
        """Fit on measured whole networks; those of another depth or width need tables[g.shape_key] = (block_table,
        fixed_ms, pair counts), as hwnas.profiling.blocks.shape_tables gives them (`depth_tables`: keyed by depth
        alone, for full-width networks, as hwnas.profiling.blocks.depth_tables gives them)."""
        known = {**{(tuple(d), ()): t for d, t in (depth_tables or {}).items()}, **(tables or {}),
                 self.shape_key: (self.block_table, self.fixed_ms, self.counts)}
        keys = [g.shape_key for g in genotypes]
        missing = next((k for k in keys if k not in known), None)
        if missing is not None:
            raise ValueError(f"architectures of {describe_shape(missing)} need their block table in tables")
        return self.fit_encoded(encode_all(genotypes), np.asarray(latency_ms, dtype=float), shape_groups(keys, known))

    def fit_encoded(self, x: np.ndarray, latency_ms: np.ndarray, groups: Groups | None = None) -> "LatencyPredictor":
        """Fit on integer encodings (N, 32); `groups` = (rows, block_table, fixed_ms, counts) for rows of other shapes."""
        raise NotImplementedError

    def _groups(self, n: int, groups: Groups | None) -> Groups:
        """Every row's block table, fixed latency and pair counts: `groups`, or this predictor's own for all n rows.

        A predictor built without counts (the per-pair rule) uses one per pair for every group too.
        """
        if not groups:
            return [(np.arange(n), self.block_table, self.fixed_ms, self.counts)]
        return [(rows, table, fixed, counts if self.per_instance else self.counts) for rows, table, fixed, counts in groups]

    def predict(self, genotypes: Sequence[Genotype]) -> np.ndarray:
        """Predicted latency (ms) of each genotype (all of this predictor's depth and width)."""
        other = next((g for g in genotypes if g.shape_key != self.shape_key), None)
        if other is not None:
            raise ValueError(f"predictor {self.name!r} covers {describe_shape(self.shape_key)}, architecture "
                             f"{other.arch_id} has {describe_shape(other.shape_key)}; use create_predictor(profile, "
                             "depth=..., width=...) or ByMacroPredictor")
        return self.predict_encoded(encode_all(genotypes))

    def table_from_coef(self) -> np.ndarray:
        """The lookup table the fitted coefficients give for this predictor's block_table."""
        raise NotImplementedError

    def with_blocks(self, block_table: np.ndarray, fixed_ms: float, depth: tuple[int, ...],
                    counts: np.ndarray | None = None, width: tuple[float, ...] = ()) -> "LatencyPredictor":
        """This fitted predictor applied to the block table (and pair counts) of another depth and width: coefficients kept.

        The fit is per op kind (a scale on block latency and a cost per op instance), so it carries over to any
        set of kept cells at any channel counts; only the tables that it multiplies change. `counts` None: this
        predictor's own.
        """
        if not hasattr(self, "table_"):
            raise ValueError(f"predictor {self.name!r} is not fitted")
        new = copy.copy(self)
        new.block_table, new.fixed_ms = np.asarray(block_table, dtype=float), float(fixed_ms)
        new.depth, new.width = tuple(depth), tuple(width)
        if counts is not None and self.per_instance:
            new.counts = np.asarray(counts, dtype=float).reshape(N_PAIRS)
        new.table_ = new.table_from_coef()
        new.intercept_ = new.fixed_ms + (self.intercept_ - self.fixed_ms)
        return new

    def predict_encoded(self, x: np.ndarray) -> np.ndarray:
        """Predicted latency (ms) from integer encodings (N, 32): a table lookup and a row sum."""
        if not hasattr(self, "table_"):
            raise ValueError(f"predictor {self.name!r} is not fitted; call fit() or load it from a profile")
        out = self.intercept_ + self.table_.ravel()[flat_index(x)].sum(axis=1)
        shared = float(getattr(self, "shared_fr_ms_", 0.0))
        return out + shared * shared_factorized_reduce(x) if shared else out

    def to_dict(self) -> dict[str, Any]:
        """The fitted parameters for the profile file (the table is what `predict` uses)."""
        return {
            "name": self.name,
            "intercept_ms": float(self.intercept_),
            "table_ms": np.round(self.table_, 7).tolist(),
            "coef": [float(c) for c in getattr(self, "coef_", [])],
            "shared_factorized_reduce_ms": float(getattr(self, "shared_fr_ms_", 0.0)),
            "count_term": PER_INSTANCE if self.per_instance else "per_pair",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], block_table: np.ndarray, fixed_ms: float,
                  counts: np.ndarray | None = None) -> "LatencyPredictor":
        """Rebuild a fitted predictor from `to_dict` output; errors name the bad field.

        `counts` (the pair counts of block_table's depth) are used when the parameters were fitted per op
        instance; parameters without count_term (older profiles) keep their per-pair meaning.
        """
        per_instance = isinstance(data, dict) and data.get("count_term") == PER_INSTANCE
        if per_instance and counts is None:
            raise ValueError(f"predictor {cls.name!r} counts op instances: give the pair counts of its block table")
        pred = cls(block_table, fixed_ms, counts if per_instance else None)
        try:
            table = np.asarray(data["table_ms"], dtype=float)
            intercept = float(data["intercept_ms"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"predictor {cls.name!r}: bad or missing parameters ({err})") from None
        if table.shape != (N_PAIRS, N_OPS, N_INPUTS):
            raise ValueError(f"predictor {cls.name!r}: table_ms has shape {table.shape}, expected {(N_PAIRS, N_OPS, N_INPUTS)}")
        pred.table_, pred.intercept_ = table, intercept
        pred.coef_ = np.asarray(data.get("coef", []), dtype=float)
        pred.shared_fr_ms_ = float(data.get("shared_factorized_reduce_ms", 0.0))  # absent in older profiles
        return pred
