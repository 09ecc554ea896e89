"""LatencyPredictor: every predictor is a bias plus one table entry per (pair, op, input), so predict is a lookup."""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import numpy as np

from hwnas.profiling.blocks import N_INPUTS, N_OPS, N_PAIRS, depth_groups
from hwnas.space.genotype import Genotype
from hwnas.space.ops import GENOTYPE_OPS

_OP_INDEX = {op: i for i, op in enumerate(GENOTYPE_OPS)}
# Offset of pair p's (op, input) block in the flattened table.
_PAIR_BASE = np.arange(N_PAIRS) * (N_OPS * N_INPUTS)
# Rows of a fit whose networks have another depth: (row indices, that depth's block table, its fixed ms,
# its pair counts: kept cells running each pair).
Groups = Sequence[tuple[np.ndarray, np.ndarray, float, np.ndarray]]
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

    def __init__(self, block_table: np.ndarray, fixed_ms: float, counts: np.ndarray | None = None) -> None:
        self.block_table = np.asarray(block_table, dtype=float)  # (N_PAIRS, N_OPS, N_INPUTS) summed block ms
        self.fixed_ms = float(fixed_ms)  # genotype-independent parts: stem, preprocessing, head, run overhead
        # Kept cells that run each pair (blocks.pair_counts): a per-op cost is paid once per op instance, so a
        # normal-cell pair counts 3 times at 3 kept normal cells and once at 1. None: once per pair, the rule of
        # profiles fitted before hwnas counted instances (their coefficients mean that).
        self.per_instance = counts is not None
        self.counts = np.ones(N_PAIRS) if counts is None else np.asarray(counts, dtype=float).reshape(N_PAIRS)

    def fit(self, genotypes: Sequence[Genotype], latency_ms: np.ndarray,
            depth_tables: Mapping[tuple[int, ...], tuple[np.ndarray, float, np.ndarray]] | None = None) -> "LatencyPredictor":
        """Fit on measured whole networks; those of another depth need depth_tables[depth] = (block_table, fixed_ms,
        pair counts), as hwnas.profiling.blocks.depth_tables gives them."""
        tables = {**(depth_tables or {}), self.depth: (self.block_table, self.fixed_ms, self.counts)}
        depths = [g.depth for g in genotypes]
        missing = next((d for d in depths if d not in tables), None)
        if missing is not None:
            raise ValueError(f"architectures of depth {list(missing)} need their block table in depth_tables")
        return self.fit_encoded(encode_all(genotypes), np.asarray(latency_ms, dtype=float), depth_groups(depths, tables))

    def fit_encoded(self, x: np.ndarray, latency_ms: np.ndarray, groups: Groups | None = None) -> "LatencyPredictor":
        """Fit on integer encodings (N, 32); `groups` = (rows, block_table, fixed_ms) for rows of other depths."""
        raise NotImplementedError

    def _groups(self, n: int, groups: Groups | None) -> Groups:
        """Every row's block table, fixed latency and pair counts: `groups`, or this predictor's own for all n rows.

        A predictor built without counts (the per-pair rule) uses one per pair for every group too.
        """
        if not groups:
            return [(np.arange(n), self.block_table, self.fixed_ms, self.counts)]
        return [(rows, table, fixed, counts if self.per_instance else self.counts) for rows, table, fixed, counts in groups]

    def predict(self, genotypes: Sequence[Genotype]) -> np.ndarray:
        """Predicted latency (ms) of each genotype (all of this predictor's depth)."""
        other = next((g for g in genotypes if g.depth != self.depth), None)
        if other is not None:
            raise ValueError(f"predictor {self.name!r} covers depth {list(self.depth) or 'full'}, architecture "
                             f"{other.arch_id} has depth {list(other.depth) or 'full'}; use create_predictor(profile, depth=...) "
                             "or ByMacroPredictor")
        return self.predict_encoded(encode_all(genotypes))

    def table_from_coef(self) -> np.ndarray:
        """The lookup table the fitted coefficients give for this predictor's block_table."""
        raise NotImplementedError

    def with_blocks(self, block_table: np.ndarray, fixed_ms: float, depth: tuple[int, ...],
                    counts: np.ndarray | None = None) -> "LatencyPredictor":
        """This fitted predictor applied to the block table (and pair counts) of another depth: coefficients kept.

        The fit is per op kind (a scale on block latency and a cost per op instance), so it carries over to any
        set of kept cells; only the tables that it multiplies change. `counts` None: this predictor's own.
        """
        if not hasattr(self, "table_"):
            raise ValueError(f"predictor {self.name!r} is not fitted")
        new = copy.copy(self)
        new.block_table, new.fixed_ms, new.depth = np.asarray(block_table, dtype=float), float(fixed_ms), tuple(depth)
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
