"""Two predictors: the plain sum of per-block latencies, and a regression that calibrates it on whole networks."""
from __future__ import annotations

import numpy as np

from hwnas.predictors.base import Groups, LatencyPredictor, flat_index, shared_factorized_reduce
from hwnas.profiling.blocks import N_OPS


class BlockSumPredictor(LatencyPredictor):
    """Latency = fixed parts + sum of the isolated latencies of the blocks a genotype runs; nothing fitted."""

    name = "blocksum"

    def fit_encoded(self, x: np.ndarray, latency_ms: np.ndarray, groups: Groups | None = None) -> "BlockSumPredictor":
        """Nothing to learn: the tables come from the block measurements."""
        self.intercept_ = self.fixed_ms
        self.table_ = self.table_from_coef()
        return self

    def table_from_coef(self) -> np.ndarray:
        """The block table itself."""
        return self.block_table.copy()


class CalibratedPredictor(LatencyPredictor):
    """Ridge regression on per-op-kind block-latency sums and op counts, folded back into one table.

    Isolated blocks miss what the whole graph does (fusions, cache reuse, per-node overhead); a scale per
    op kind and a cost per op instance correct both, and stay linear, so prediction remains a lookup.
    """

    name = "calibrated"

    def __init__(self, block_table: np.ndarray, fixed_ms: float, counts: np.ndarray | None = None,
                 alphas: tuple[float, ...] = tuple(np.logspace(-4, 3, 15))) -> None:
        super().__init__(block_table, fixed_ms, counts)
        self.alphas = alphas

    def prior(self) -> np.ndarray:
        """Coefficients meaning "the blocks simply add up": what the ridge penalty shrinks towards."""
        return np.concatenate([np.ones(N_OPS), np.zeros(N_OPS)])

    def basis(self, block_table: np.ndarray | None = None, counts: np.ndarray | None = None) -> np.ndarray:
        """(N_PAIRS, N_OPS, N_INPUTS, 2 * N_OPS) features of each table entry, per op kind: its block ms and its
        op instances (the kept cells that run the pair, `counts`)."""
        table = self.block_table if block_table is None else block_table
        counts = self.counts if counts is None else counts
        pairs, ops, inputs = table.shape
        phi = np.zeros((pairs, ops, inputs, 2 * N_OPS))
        for o in range(ops):
            phi[:, o, :, o] = table[:, o, :]
            phi[:, o, :, N_OPS + o] = np.asarray(counts, dtype=float)[:, None]
        return phi

    def fit_encoded(self, x: np.ndarray, latency_ms: np.ndarray, groups: Groups | None = None) -> "CalibratedPredictor":
        """Fit the ridge model (alpha by leave-one-out CV) on encodings and measured latencies."""
        from sklearn.linear_model import RidgeCV

        y = np.asarray(latency_ms, dtype=float)
        if len(y) != len(x) or len(y) < 3:
            raise ValueError(f"need >= 3 measured networks with one latency each, got {len(x)} and {len(y)}")
        # Each network's features come from the blocks of the cells it keeps (its depth's table).
        n_feat = len(self.prior())
        feats, fixed = np.zeros((len(y), n_feat + 1)), np.zeros(len(y))
        for rows, table, fixed_ms, counts in self._groups(len(y), groups):
            flat_phi = self.basis(np.asarray(table, dtype=float), counts).reshape(-1, n_feat)
            feats[rows, :n_feat] = flat_phi[flat_index(x[rows])].sum(axis=1)  # (n, F)
            fixed[rows] = fixed_ms
        feats[:, n_feat] = shared_factorized_reduce(x)  # the one interaction between blocks that matters
        # Regress the residual of the plain block sum, so the ridge penalty pulls towards "blocks add up"
        # (scale 1, no per-op cost, no sharing) instead of towards zero latency when calibration networks are few.
        prior = np.append(self.prior(), 0.0)
        resid = y - fixed - feats @ prior
        scale = feats.std(axis=0)
        scale[scale == 0] = 1.0  # constant columns (e.g. counts fixed by the space) carry no information
        # Weights 1/y^2 make the squared error a relative one: the figures that matter are percentages.
        model = RidgeCV(alphas=self.alphas).fit(feats / scale, resid, sample_weight=1.0 / y**2)
        coef = prior + model.coef_ / scale
        self.coef_, self.shared_fr_ms_ = coef[:-1], float(coef[-1])
        self.alpha_ = float(model.alpha_)
        self.intercept_ = self.fixed_ms + float(model.intercept_)
        self.table_ = self.table_from_coef()
        return self

    def table_from_coef(self) -> np.ndarray:
        """Each table entry's features times the fitted coefficients."""
        return self.basis() @ self.coef_


class ScaledBlockSumPredictor(CalibratedPredictor):
    """Latency = a + b * (sum of block latencies): two numbers fitted, robust when calibration networks are few."""

    name = "scaled"

    def prior(self) -> np.ndarray:
        """Scale 1: the blocks add up."""
        return np.ones(1)

    def basis(self, block_table: np.ndarray | None = None, counts: np.ndarray | None = None) -> np.ndarray:
        """One feature per table entry: its block latency (no count term)."""
        return (self.block_table if block_table is None else block_table)[..., None]
