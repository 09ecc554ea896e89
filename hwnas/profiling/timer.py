"""The latency methodology shared by `profile`, `measure` and `export`: onnxruntime, interleaved, drift-corrected.

One *round* times every candidate once, in a fresh session each, in a shuffled order, together with a
fixed sentinel model: both sessions are open at once and their runs alternate in blocks of
`interleave` runs. A session's latency is the median of its runs. The candidate is scaled by
(reference level / its own sentinel's median): the sentinel ran in the same moments, so a burst of
interference slows both alike and cancels (on this project's 2-vCPU host, a training job on the other
vCPU slows tiny models 1.6-2x, in phases from 0.1 s to minutes). The reference level is the median over
the run of a moving minimum of the sentinel timings, i.e. the device's undisturbed speed during the run.
A candidate's latency is the median over rounds of these ratios (the noise of a ratio is symmetric, so the
minimum would be biased low).

`interleave=0` is the earlier methodology (profiles written before it): the sentinel timed before the
candidate, the candidate scaled by the moving-minimum level, the minimum over rounds.
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
    combine: str = "median"  # over rounds: "median" (of paired ratios) or "min" (least disturbed round, interleave=0)
    drift_window: int = 10  # sentinel timings either side in the moving-minimum drift level
    # > 0: sentinel and candidate alternate in blocks of this many runs inside their live sessions, and each
    # candidate is corrected by its own sentinel; 0: the sentinel is timed before the candidate (profiles
    # written before this field existed) and the correction is the moving-minimum level.
    interleave: int = 10
    provider: str = "CPUExecutionProvider"  # onnxruntime execution provider the sessions run on
    # Provider options as sorted (key, value) pairs (hashable; a dict is accepted and converted).
    provider_options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        opts = self.provider_options.items() if isinstance(self.provider_options, dict) else self.provider_options
        object.__setattr__(self, "provider_options", tuple(sorted((str(k), str(v)) for k, v in opts)))
        if self.optimization_level not in OPT_LEVELS:
            raise ValueError(f"optimization_level must be one of {OPT_LEVELS}, got {self.optimization_level!r}")
        for name in ("threads", "batch", "runs", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.drift_window < 0 or self.interleave < 0:
            raise ValueError(f"warmup, drift_window and interleave must be >= 0, got "
                             f"{self.warmup}, {self.drift_window}, {self.interleave}")
        if self.combine not in ("min", "median"):
            raise ValueError(f"combine must be 'min' or 'median', got {self.combine!r}")

    @property
    def paired(self) -> bool:
        """Whether records of this config are corrected by their own, interleaved sentinel timing."""
        return self.sentinel and self.interleave > 0

    def reduction(self) -> dict:
        """How records of this config are combined: the keyword arguments of `combine` and `split_halves`."""
        return {"how": self.combine, "window": self.drift_window, "paired": self.paired}

    def to_dict(self) -> dict:
        """Plain dict for the profile's device block."""
        return {**asdict(self), "provider_options": dict(self.provider_options)}

    def providers(self) -> list:
        """The `providers` argument of an InferenceSession: the configured one with its options."""
        return [(self.provider, dict(self.provider_options))]


def check_provider(name: str) -> None:
    """ValueError naming the available providers unless this onnxruntime build has `name`."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if name not in available:
        raise ValueError(f"execution provider {name!r} is not available in this onnxruntime {ort.__version__}; "
                         f"available: {', '.join(available)}")


def _session(model: bytes, cfg: TimingConfig, so=None):  # -> ort.InferenceSession
    """An InferenceSession on the configured provider; an error, not a silent CPU fallback, when it is missing."""
    import onnxruntime as ort

    check_provider(cfg.provider)
    session = ort.InferenceSession(model, sess_options=so or session_options(cfg), providers=cfg.providers())
    if session.get_providers()[0] != cfg.provider:
        raise ValueError(f"onnxruntime did not start execution provider {cfg.provider!r} "
                         f"(session uses {session.get_providers()})")
    return session


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


def _ready_session(model: bytes, input_shape: Sequence[int], cfg: TimingConfig) -> Callable[[], None]:
    """A fresh session with its input bound once, the first run and the warm-up done: one call = one run."""
    session = _session(model, cfg)
    x = np.random.default_rng(0).standard_normal(tuple(input_shape)).astype(np.float32)
    binding = session.io_binding()
    binding.bind_cpu_input(session.get_inputs()[0].name, x)
    for out in session.get_outputs():
        binding.bind_output(out.name, "cpu")

    def run() -> None:
        session.run_with_iobinding(binding)

    run()  # first run: allocations, kernel selection — never representative
    for _ in range(cfg.warmup):
        run()
    return run


def _timed(run: Callable[[], None], n: int) -> np.ndarray:
    """Wall time (ms) of each of `n` calls."""
    times = np.empty(n)
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        run()
        times[i] = clock() - t0
    return times * 1e-6


def time_model(model: bytes, input_shape: Sequence[int], cfg: TimingConfig) -> np.ndarray:
    """Run times (ms) of `model` in one fresh session: input bound once, first run discarded, warm-up."""
    return _timed(_ready_session(model, input_shape, cfg), cfg.runs)


def time_pair(first: "Candidate", second: "Candidate", cfg: TimingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Run times (ms) of two models, each in a fresh session, timed in alternating blocks of `cfg.interleave` runs.

    Both models see the same moments of the device: a burst of interference (a job on a sibling core, a
    frequency dip) slows both alike, so their ratio is unaffected even when the burst is shorter than a round.
    """
    block = max(cfg.interleave, 1)
    runs = [_ready_session(c.model, c.input_shape, cfg) for c in (first, second)]
    times: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for start in range(0, cfg.runs, block):
        n = min(block, cfg.runs - start)
        for run, out in zip(runs, times):
            out.append(_timed(run, n))
    return np.concatenate(times[0]), np.concatenate(times[1])


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
    """Time every candidate once in a shuffled order, each with a sentinel timing (`cfg.interleave`); skip `done` ones."""
    order = np.random.default_rng([seed, round_index]).permutation(len(candidates))
    records: list[Record] = []
    for i in order:
        cand = candidates[int(i)]
        if done is not None and done(cand.key, round_index):
            continue
        if should_stop is not None and should_stop():
            break
        if sentinel is not None and cfg.interleave > 0:
            s_times, t_times = time_pair(sentinel, cand, cfg)
            s, t = float(np.median(s_times)), float(np.median(t_times))
        else:
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
    how: str = "min", window: int = 10, paired: bool = False,
) -> dict[str, float]:
    """Per key: drift-corrected session medians combined over rounds (`min`: the least disturbed round).

    `records` must be in the order they were taken (the drift estimate is a moving window over time).
    `paired` (records of interleaved timing): each candidate is scaled by its own sentinel, timed in the same
    moments, instead of by the moving-minimum level. Without sentinel timings (nan) the raw medians are combined.
    """
    if how not in ("min", "median"):
        raise ValueError(f"how must be 'min' or 'median', got {how!r}")
    levels = sentinel_levels(records, window)
    corrected = not np.isnan(levels).any() and len(levels) > 0
    if corrected and sentinel_ref is None:
        sentinel_ref = float(np.median(levels))
    if corrected and paired:
        levels = np.array([r[3] for r in records], dtype=float)
    by_key: dict[str, list[float]] = {}
    for (key, rnd, t, _), level in zip(records, levels):
        if rounds is None or rnd in rounds:
            by_key.setdefault(key, []).append(t * sentinel_ref / level if corrected else t)
    reduce = np.min if how == "min" else np.median
    return {k: float(reduce(v)) for k, v in by_key.items()}


def split_halves(
    records: Sequence[Record], sentinel_ref: float | None, rounds: int, how: str = "min", window: int = 10,
    paired: bool = False,
) -> tuple[dict[str, float], dict[str, float]]:
    """`combine` over the even rounds and over the odd rounds: two independent measurements of every key."""
    return tuple(combine(records, sentinel_ref, rounds=range(start, rounds, 2), how=how, window=window, paired=paired)
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
    return combine(records, **cfg.reduction()), records


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
        session = _session(model, cfg, so)
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
