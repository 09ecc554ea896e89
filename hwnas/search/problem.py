"""The search problem: pymoo Problem over the integer genotype encoding, objectives cached by arch_id."""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair

from hwnas.config import MacroConfig
from hwnas.search.front import OBJECTIVES
from hwnas.space.genotype import STEPS, Genotype, SearchSpace, cell_channels, reduction_layers
from hwnas.space.network import STEM_MULTIPLIER, Network, count_params
from hwnas.space.ops import FactorizedReduce, ReLUConvBN, create_op

log = logging.getLogger(__name__)

ObjectiveFn = Callable[[list[Genotype]], np.ndarray]
REFERENCE_SAMPLE = 256  # genotypes drawn (fixed seed) to place the default hypervolume reference point
REFERENCE_SEED = 20240601
REFERENCE_MARGIN = 1.1


class ParamsCounter:
    """Exact parameter count of Network(genotype) without building it: per-layer counts cached by shape."""

    def __init__(self, macro: MacroConfig) -> None:
        self.macro = macro
        self._table: dict[tuple, int] = {}
        self._reductions = reduction_layers(macro.layers)
        probe = Network(SearchSpace(macro).sample(np.random.default_rng(0)))
        self._stem = count_params(probe.stem)

    def _count(self, key: tuple, build: Callable[[], Any]) -> int:
        if key not in self._table:
            self._table[key] = count_params(build())
        return self._table[key]

    def _cell(self, g: Genotype, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool) -> int:
        pre0 = (self._count(("fr", c_pp, c), lambda: FactorizedReduce(c_pp, c)) if reduction_prev
                else self._count(("rcb", c_pp, c), lambda: ReLUConvBN(c_pp, c, 1, 1, 0)))
        total = pre0 + self._count(("rcb", c_p, c), lambda: ReLUConvBN(c_p, c, 1, 1, 0))
        for op, inp in g.reduce if reduction else g.normal:
            stride = 2 if reduction and inp < 2 else 1
            total += self._count((op, c, stride), lambda: create_op(op, c, stride, affine=True))
        return total

    def count(self, g: Genotype) -> int:
        """Parameters of Network(g): stem, kept cells at their widths (as Network lays them out), classifier."""
        c_pp = c_p = STEM_MULTIPLIER * self.macro.C
        total, reduction_prev = self._stem, False
        for i, (c, keep) in enumerate(zip(cell_channels(self.macro, g.width), g.active_cells)):
            reduction = i in self._reductions
            if keep:  # a dropped cell takes its preprocessing and ops away; shapes around it do not change
                total += self._cell(g, c_pp, c_p, c, reduction, reduction_prev)
            reduction_prev = reduction
            c_pp, c_p = c_p, STEPS * c
        return total + c_p * self.macro.classes + self.macro.classes

    def __call__(self, genotypes: Sequence[Genotype]) -> np.ndarray:
        """Parameters in millions, one per genotype."""
        return np.array([self.count(g) / 1e6 for g in genotypes], dtype=float)


def _check_values(name: str, values: Any, n: int, low: float, high: float) -> np.ndarray:
    """An objective function's output as a float vector; ValueError naming the function when it is unusable."""
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.shape != (n,):
        raise ValueError(f"{name} returned {arr.size} values for {n} architectures")
    if not np.all(np.isfinite(arr)) or np.any(arr < low) or np.any(arr > high):
        raise ValueError(f"{name} returned values outside [{low}, {high}]: {arr[~((arr >= low) & (arr <= high))][:3]}")
    return arr


class _BatchObjectives:
    """Picklable callable evaluating one batch of genotypes (what a Dask worker runs)."""

    def __init__(self, error_fn: ObjectiveFn, latency_fn: ObjectiveFn, params_fn: ObjectiveFn) -> None:
        self.error_fn, self.latency_fn, self.params_fn = error_fn, latency_fn, params_fn

    def __call__(self, genotypes: list[Genotype]) -> np.ndarray:
        n = len(genotypes)
        error = _check_values("error_fn", self.error_fn(genotypes), n, 0.0, 1.0)
        latency = _check_values("latency_fn", self.latency_fn(genotypes), n, 0.0, np.inf)
        params = _check_values("params_fn", self.params_fn(genotypes), n, 0.0, np.inf)
        return np.stack([error, latency, params], axis=1)  # (n, 3)


class HWNASProblem(Problem):
    """Minimise [error, latency_ms, params_m] over SearchSpace encodings; G = budget violations (<= 0 ok)."""

    def __init__(
        self,
        space: SearchSpace,
        error_fn: ObjectiveFn,
        latency_fn: ObjectiveFn,
        params_fn: ObjectiveFn | None = None,
        max_latency_ms: float | None = None,
        max_params_m: float | None = None,
        runner: Callable[[Callable, list], list] | None = None,
        n_workers: int = 1,
    ) -> None:
        self.space = space
        self.budgets = {k: v for k, v in (("latency_ms", max_latency_ms), ("params_m", max_params_m)) if v is not None}
        xl, xu = space.bounds()
        super().__init__(n_var=space.n_var, n_obj=len(OBJECTIVES), n_ieq_constr=len(self.budgets),
                         xl=xl, xu=xu, vtype=int)
        self.batch = _BatchObjectives(error_fn, latency_fn, params_fn or ParamsCounter(space.macro))
        self.runner = runner  # pymoo elementwise runner (e.g. DaskParallelization); None = in process
        self.n_workers = n_workers  # batches per evaluation call when a runner is set
        self.cache: dict[str, np.ndarray] = {}
        self.n_computed = 0  # cache misses: architectures whose objectives were really computed

    # -- objectives -------------------------------------------------------------------------------
    def objectives(self, genotypes: Sequence[Genotype]) -> np.ndarray:
        """[error, latency_ms, params_m] per genotype (n, 3); cached by arch_id."""
        ids = [g.arch_id for g in genotypes]
        todo: dict[str, Genotype] = {}
        for aid, g in zip(ids, genotypes):
            if aid not in self.cache:
                todo.setdefault(aid, g)
        if todo:
            missing = list(todo.values())
            if self.runner is None:
                values = self.batch(missing)
            else:
                chunks = [c for c in np.array_split(np.arange(len(missing)), max(1, self.n_workers)) if len(c)]
                parts = self.runner(self.batch, [[missing[i] for i in c] for c in chunks])
                values = np.concatenate(parts, axis=0)
            for aid, row in zip(todo, values):
                self.cache[aid] = row
            self.n_computed += len(missing)
        return np.stack([self.cache[a] for a in ids]) if ids else np.zeros((0, len(OBJECTIVES)))

    def violations(self, F: np.ndarray) -> np.ndarray:
        """Budget violations (n, n_budgets): objective - budget, <= 0 when the budget is met."""
        cols = [F[:, OBJECTIVES.index(k)] - v for k, v in self.budgets.items()]
        return np.stack(cols, axis=1) if cols else np.zeros((len(F), 0))

    def decode_all(self, X: np.ndarray) -> list[Genotype]:
        """Decode every row; a row that does not decode is a bug in the operators, so say which."""
        out = []
        for i, x in enumerate(np.asarray(X)):
            try:
                out.append(self.space.decode(x))
            except ValueError as err:
                raise ValueError(f"offspring {i} does not decode ({err}); the repair operator must prevent this") from None
        return out

    def _evaluate(self, X: np.ndarray, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        F = self.objectives(self.decode_all(X))
        out["F"] = F
        if self.budgets:
            out["G"] = self.violations(F)

    # -- reference point ---------------------------------------------------------------------------
    def reference_point(self) -> np.ndarray:
        """A fixed hypervolume reference: error 1, and 1.1x the largest latency/params of a seeded sample."""
        rng = np.random.default_rng(REFERENCE_SEED)
        sample = [self.space.sample(rng) for _ in range(REFERENCE_SAMPLE)]
        F = self.batch.__class__(lambda gs: np.zeros(len(gs)), self.batch.latency_fn, self.batch.params_fn)(sample)
        return np.array([1.0, REFERENCE_MARGIN * F[:, 1].max(), REFERENCE_MARGIN * F[:, 2].max()])


class SpaceRepair(Repair):
    """pymoo Repair: SearchSpace.repair per row (round, clip, distinct inputs), then canonical pair order.

    The two pairs of a node are unordered (arch_id sorts them), so sorting makes equal architectures
    equal vectors and pymoo's duplicate elimination sees architecture identity.
    """

    def __init__(self, space: SearchSpace) -> None:
        super().__init__()
        self.space = space

    def _do(self, problem: Any, X: np.ndarray, **kwargs: Any) -> np.ndarray:
        X = np.asarray(X)
        return np.stack([canonical(self.space.repair(x)) for x in X]) if len(X) else X


def canonical(x: np.ndarray) -> np.ndarray:
    """Sort the two (op, input) pairs of each node of a valid encoding."""
    x = np.array(x, dtype=int)
    for node in range(2 * STEPS):
        a, b = x[4 * node : 4 * node + 2].tolist(), x[4 * node + 2 : 4 * node + 4].tolist()
        if b < a:
            x[4 * node : 4 * node + 4] = b + a
    return x
