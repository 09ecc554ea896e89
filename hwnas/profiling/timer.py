"""The latency methodology shared by `profile`, `measure` and `export`: onnxruntime, interleaved, drift-corrected.

One *round* times every candidate once, in a fresh session each, in a shuffled order; before each
candidate a fixed sentinel model is timed in the same way. A session's latency is the median of its runs.
It is scaled by (reference level / the sentinel's level at that moment), a moving minimum that follows slow
drift; a candidate's latency is the minimum over rounds, because other tenants only ever add time and the
least disturbed round is the one closest to the device's own speed (measured better than the median of
rounds here on a shared, loaded 2-core machine).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class TimingConfig:
    """How one model is timed; everything here changes latency, so the profile records all of it."""

    threads: int = 1  # intra_op_num_threads; 1 is the sane deployment default on a small shared CPU
    optimization_level: str = "all"  # onnxruntime's default, what users deploy with
    batch: int = 1
    warmup: int = 10  # runs after the discarded first one, not timed
    runs: int = 100  # timed runs per session; their median is the session's latency
    rounds: int = 4  # fresh sessions per candidate, interleaved across candidates
    sentinel: bool = True  # time a fixed sentinel model before each candidate to correct drift
    combine: str = "min"  # over rounds: "min" (least disturbed round) or "median"
    drift_window: int = 10  # sentinel timings either side in the moving-minimum drift level

    def __post_init__(self) -> None:
        if self.optimization_level not in OPT_LEVELS:
            raise ValueError(f"optimization_level must be one of {OPT_LEVELS}, got {self.optimization_level!r}")
        for name in ("threads", "batch", "runs", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.drift_window < 0:
            raise ValueError(f"warmup and drift_window must be >= 0, got {self.warmup}, {self.drift_window}")
        if self.combine not in ("min", "median"):
            raise ValueError(f"combine must be 'min' or 'median', got {self.combine!r}")

    def to_dict(self) -> dict:
        """Plain dict for the profile's device block."""
        return asdict(self)


def session_options(cfg: TimingConfig):  # -> ort.SessionOptions
    """Explicit threads, sequential execution, the configured graph optimization level, no spinning."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.intra_op_num_threads = cfg.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = levels[cfg.optimization_level]
    # Spinning workers steal the cores other tenants (and our own sentinel) need on a small shared CPU.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def time_model(model: bytes, input_shape: Sequence[int], cfg: TimingConfig) -> np.ndarray:
    """Run times (ms) of `model` in one fresh session: input bound once, first run discarded, warm-up."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, sess_options=session_options(cfg), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(tuple(input_shape)).astype(np.float32)
    binding = session.io_binding()
    binding.bind_cpu_input(session.get_inputs()[0].name, x)
    for out in session.get_outputs():
        binding.bind_output(out.name, "cpu")
    run = session.run_with_iobinding
    run(binding)  # first run: allocations, kernel selection — never representative
    for _ in range(cfg.warmup):
        run(binding)
    times = np.empty(cfg.runs)
    clock = time.perf_counter_ns
    for i in range(cfg.runs):
        t0 = clock()
        run(binding)
        times[i] = clock() - t0
    return times * 1e-6


@dataclass
class Candidate:
    """A model to time: a key for bookkeeping, the ONNX bytes and its input shape (batch first)."""

    key: str
    model: bytes
    input_shape: tuple[int, ...]


# One timing record: (key, round, candidate median ms, sentinel median ms or nan)
Record = tuple[str, int, float, float]


def run_round(
    candidates: Sequence[Candidate],
    round_index: int,
    cfg: TimingConfig,
    sentinel: Candidate | None,
    seed: int = 0,
    done: Callable[[str, int], bool] | None = None,
    on_record: Callable[[Record], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[Record]:
    """Time every candidate once in a shuffled order, each after a sentinel timing; skip `done` ones."""
    order = np.random.default_rng([seed, round_index]).permutation(len(candidates))
    records: list[Record] = []
    for i in order:
        cand = candidates[int(i)]
        if done is not None and done(cand.key, round_index):
            continue
        if should_stop is not None and should_stop():
            break
        s = float(np.median(time_model(sentinel.model, sentinel.input_shape, cfg))) if sentinel else float("nan")
        t = float(np.median(time_model(cand.model, cand.input_shape, cfg)))
        rec = (cand.key, round_index, t, s)
        records.append(rec)
        if on_record is not None:
            on_record(rec)
    return records


def sentinel_levels(records: Sequence[Record], window: int = 10) -> np.ndarray:
    """Per record, the machine's speed level then: the min sentinel time among its 2*window+1 neighbours in time.

    Other tenants only ever add time, so a windowed minimum follows slow drift (frequency, thermal) without
    importing the noise of any single sentinel timing into the candidate's figure.
    """
    s = np.array([r[3] for r in records], dtype=float)
    if s.size == 0 or np.isnan(s).any():
        return np.full(s.size, np.nan)
    return np.array([s[max(0, i - window) : i + window + 1].min() for i in range(s.size)])


def combine(
    records: Sequence[Record], sentinel_ref: float | None = None, rounds: Sequence[int] | None = None,
    how: str = "min", window: int = 10,
) -> dict[str, float]:
    """Per key: drift-corrected session medians combined over rounds (`min`: the least disturbed round).

    `records` must be in the order they were taken (the drift estimate is a moving window over time).
    Without sentinel timings (nan) the raw session medians are combined.
    """
    if how not in ("min", "median"):
        raise ValueError(f"how must be 'min' or 'median', got {how!r}")
    levels = sentinel_levels(records, window)
    corrected = not np.isnan(levels).any() and len(levels) > 0
    if corrected and sentinel_ref is None:
        sentinel_ref = float(np.median(levels))
    by_key: dict[str, list[float]] = {}
    for (key, rnd, t, _), level in zip(records, levels):
        if rounds is None or rnd in rounds:
            by_key.setdefault(key, []).append(t * sentinel_ref / level if corrected else t)
    reduce = np.min if how == "min" else np.median
    return {k: float(reduce(v)) for k, v in by_key.items()}


def split_halves(
    records: Sequence[Record], sentinel_ref: float | None, rounds: int, how: str = "min", window: int = 10,
) -> tuple[dict[str, float], dict[str, float]]:
    """`combine` over the even rounds and over the odd rounds: two independent measurements of every key."""
    return tuple(combine(records, sentinel_ref, rounds=range(start, rounds, 2), how=how, window=window)
                 for start in (0, 1))


def sentinel_median(records: Sequence[Record], window: int = 10) -> float:
    """The run's reference sentinel latency: median of its drift levels (nan without a sentinel)."""
    levels = sentinel_levels(records, window)
    return float(np.median(levels)) if levels.size and not np.isnan(levels).any() else float("nan")


def measure_models(
    candidates: Sequence[Candidate],
    cfg: TimingConfig,
    sentinel: Candidate | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], list[Record]]:
    """The full methodology on a list of candidates; returns latency (ms) per key and the raw records."""
    if cfg.sentinel and sentinel is None:
        raise ValueError("cfg.sentinel is set but no sentinel model was given")
    records: list[Record] = []
    for r in range(cfg.rounds):
        records += run_round(
            candidates, r, cfg, sentinel if cfg.sentinel else None, seed=seed,
            on_record=(lambda rec: progress(1)) if progress else None,
        )
    return combine(records, how=cfg.combine, window=cfg.drift_window), records


def node_times(model: bytes, input_shape: Sequence[int], cfg: TimingConfig, runs: int = 30) -> dict[str, float]:
    """onnxruntime's per-node profile of `model`: median time (ms) of each node of the optimized graph.

    Sees the graph after ORT's fusions and layout changes; node names keep the exporter's module scopes
    (e.g. "/cells.2/ops.5/op/op.1/Conv..."), so times can be attributed to cells and edges.
    """
    import json
    import os
    import tempfile

    import onnxruntime as ort

    so = session_options(cfg)
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.zeros(tuple(input_shape), dtype=np.float32)}
        skip = 1 + cfg.warmup  # the first run and the warm-up are profiled too; drop them
        for _ in range(skip + runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    durations: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node":
            durations.setdefault(e["name"], []).append(e["dur"] / 1000.0)
    return {name: float(np.median(d[skip:] if len(d) > skip else d)) for name, d in durations.items()}
