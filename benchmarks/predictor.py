"""Latency predictor vs fresh measurements on held-out architectures; prints JSON.

Measures N random architectures that the profile never saw, twice (two independent interleaved passes, the
profiling methodology), and reports: predictor agreement with a measurement next to the noise ceiling of
this run, Spearman of predictor / FLOPs / parameter count against measured latency, whether scaling the
prediction by the sentinel measured now helps, and predictions per second.

    python benchmarks/predictor.py [--profile P] [--n 40] [--rounds 3] [--runs 100] [--depth]

`--plain` times the held-out architectures instead as a user would, without hwnas: one fresh Python process
per architecture and pass, onnxruntime with the profile's settings (threads, graph optimisation level, no
spinning), `--sessions` fresh sessions of 10 warm-up and `--runs` timed runs each; the figure is the best
session's median. No sentinel, no drift correction. Two passes give that harness's own noise ceiling.

`--depth` draws the held-out architectures from the elastic-depth space (every depth equally likely) and adds
the figures per depth: the profile measured full-depth networks only, so this checks what it predicts for
networks that drop cells.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from hwnas.predictors import PREDICTORS, ByMacroPredictor, create_predictor, encode_all, profile_tables
from hwnas.predictors.metrics import agreement, noise_ceiling
from hwnas.profiling import default_profile_path
from hwnas.profiling.device_profile import DeviceProfile
from hwnas.profiling import timer
from hwnas.profiling.profiler import network_candidate, sentinel_genotype
from hwnas.space import Network, SearchSpace, count_params


def flops(genotype) -> float:
    """Forward FLOPs of one batch-1 inference (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = genotype.macro
    net = Network(genotype).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, m.in_channels, m.resolution, m.resolution))
    return float(counter.get_total_flops())


def throughput(pred, genotypes, x) -> dict[str, float]:
    """Predictions per second from Genotype objects and from integer encodings (best of 3)."""
    best_g = min(_timed(lambda: pred.predict(genotypes)) for _ in range(3))
    best_x = min(_timed(lambda: pred.predict_encoded(x)) for _ in range(3))
    return {"genotypes_per_s": len(genotypes) / best_g, "encodings_per_s": len(x) / best_x}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


PLAIN_HARNESS = """
import sys, time, numpy as np, onnxruntime as ort
path, threads, level, runs, sessions = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
medians = []
for _ in range(sessions):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = levels[level] if level in levels else getattr(ort.GraphOptimizationLevel, level)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]  # a named (batch) dimension: batch 1
    x = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for _ in range(11):
        sess.run(None, x)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, x)
        t.append(time.perf_counter() - t0)
    medians.append(float(np.median(t)) * 1e3)
print(min(medians))
"""


def plain_timings(genotypes, threads: int, level: str, runs: int, sessions: int, seed: int) -> np.ndarray:
    """Latency (ms) of each genotype by PLAIN_HARNESS: a fresh process each, in a shuffled order."""
    import subprocess
    import sys
    import tempfile
    import warnings
    from pathlib import Path

    from hwnas.profiling.onnx_io import export_onnx

    warnings.filterwarnings("ignore", message="Constant folding")  # torch's exporter, once per network
    out = np.empty(len(genotypes))
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, g in enumerate(genotypes):
            m = g.macro
            paths.append(export_onnx(Network(g).eval(), Path(tmp) / f"{i}.onnx",
                                     (1, m.in_channels, m.resolution, m.resolution)))
        for i in np.random.default_rng(seed).permutation(len(genotypes)):
            proc = subprocess.run([sys.executable, "-c", PLAIN_HARNESS, str(paths[i]), str(threads), level, str(runs),
                                   str(sessions)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"plain harness failed on architecture {i}:\n{proc.stderr}")
            out[i] = float(proc.stdout.split()[-1])
    return out


def plain_report(profile, genotypes, threads: int, runs: int, sessions: int, seed: int) -> dict:
    """The default predictor against two passes of the plain harness, next to that harness's noise ceiling."""
    level = profile.device.get("graph_optimization_level") or "all"
    t0 = time.perf_counter()
    a = plain_timings(genotypes, threads, level, runs, sessions, seed)
    b = plain_timings(genotypes, threads, level, runs, sessions, seed + 1)
    pred = ByMacroPredictor.from_profiles([profile]).predict(genotypes)
    figs = [agreement(pred, m) for m in (a, b)]
    ratio = np.concatenate([a / pred, b / pred])
    return {
        "harness": f"fresh process per architecture, best of {sessions} fresh sessions, median of {runs} runs "
                   f"after 10 warm-up, {threads} thread(s), optimisation level {level!r}, no spinning",
        "seconds": round(time.perf_counter() - t0, 1),
        "noise_ceiling": noise_ceiling(a, b),
        "default_predictor": {k: (figs[0][k] + figs[1][k]) / 2
                              for k in ("mape", "within_5pct", "within_10pct", "spearman", "kendall")},
        "median_ratio_measured_over_predicted": float(np.median(ratio)),
        "latency_range_ms": [float(min(a.min(), b.min())), float(max(a.max(), b.max()))],
    }


def node_profiling_comparison(profile, runs: int = 30) -> dict:
    """Per-block latencies taken in situ (ORT per-node profiling of the calibration networks) vs isolated blocks.

    Both tables feed the same calibrated predictor, fitted on the same calibration latencies and scored on
    the profile's held-out set; this is how the profiler's choice of isolated blocks was made.
    """
    import re

    from hwnas.predictors import CalibratedPredictor, ScaledBlockSumPredictor
    from hwnas.profiling.blocks import cell_shapes, pair_block, pair_counts, pair_tables

    from hwnas.space.genotype import stage_depths

    # Full-depth networks only: this comparison refits one table (profiles now also hold networks that drop cells).
    full = list(stage_depths(profile.macro))
    cal_e = [e for e in profile.calibration if e.get("depth", full) == full]
    val_e = [e for e in profile.validation_set if e.get("depth", full) == full]
    space = SearchSpace(profile.macro)
    cal = [space.decode(e["x"]) for e in cal_e]
    val = [space.decode(e["x"]) for e in val_e]
    y = np.array([e["latency_ms"] for e in cal_e])
    yv = np.array([(e["latency_ms_a"] + e["latency_ms_b"]) / 2 for e in val_e])
    edge_re = re.compile(r"^/cells\.(\d+)/ops\.(\d+)/")
    tcfg = timer.TimingConfig(threads=profile.device["threads"])
    t0 = time.perf_counter()
    in_situ: dict[str, list[float]] = {}
    rest = []
    for g in cal:
        cand = network_candidate("x", g)
        per_edge: dict[tuple[int, int], float] = {}
        other = 0.0
        for name, ms in timer.node_times(cand.model, cand.input_shape, tcfg, runs=runs).items():
            m = edge_re.match(name)
            if m:
                key = (int(m.group(1)), int(m.group(2)))
                per_edge[key] = per_edge.get(key, 0.0) + ms
            else:
                other += ms  # stem, preprocessing, adds, concats, head, layout reorders
        rest.append(other)
        for cell in cell_shapes(profile.macro):
            for k, (op, inp) in enumerate(g.reduce if cell.reduction else g.normal):
                in_situ.setdefault(pair_block(cell, op, inp).key, []).append(per_edge.get((cell.index, k), 0.0))
    seconds = time.perf_counter() - t0
    ops_ms = {k: float(np.median(in_situ.get(k, [v]))) for k, v in profile.blocks["ops_ms"].items()}
    iso_table, iso_fixed = profile_tables(profile)
    tables = {"isolated_blocks": (iso_table, iso_fixed), "node_profiling": (pair_tables(profile.macro, ops_ms), float(np.median(rest)))}
    xc, xv = encode_all(cal), encode_all(val)
    out: dict = {"extra_profiling_seconds": round(seconds, 1), "n_calibration": len(cal), "n_validation": len(val)}
    for source, (table, fixed) in tables.items():
        for cls in (ScaledBlockSumPredictor, CalibratedPredictor):
            pred = cls(table, fixed, pair_counts(profile.macro)).fit_encoded(xc, y).predict_encoded(xv)  # full depth
            out[f"{source}/{cls.name}"] = agreement(pred, yv)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=None, help="profile JSON (default: the shipped one for this device)")
    ap.add_argument("--n", type=int, default=40, help="held-out architectures to measure")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved fresh-session rounds per measurement pass")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--node-profiling", action="store_true",
                    help="also compare in-situ block times from ORT per-node profiling with isolated blocks")
    ap.add_argument("--plain", action="store_true",
                    help="time with a plain onnxruntime harness in fresh processes instead (see the module doc)")
    ap.add_argument("--sessions", type=int, default=3, help="--plain: fresh sessions per process (best is kept)")
    ap.add_argument("--depth", action="store_true", help="held-out networks of every elastic depth, figures per depth")
    ap.add_argument("--threads", type=int, default=None,
                    help="override the profile's thread count (to compare noise ceilings; predictions then do not apply)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # FLOP counting and export only; keeps the shared cores for the timing

    path = args.profile or default_profile_path()
    if path is None:
        raise SystemExit("no profile for this device; pass --profile or run `hwnas profile`")
    profile = DeviceProfile.load(path)
    seen = {e["arch_id"] for e in profile.calibration + profile.validation_set} | {profile.sentinel.get("arch_id")}
    space, rng = SearchSpace(profile.macro, depth=args.depth), np.random.default_rng(args.seed)
    genotypes = space.sample_distinct(rng, args.n, exclude=seen)

    threads = args.threads or profile.device["threads"]
    if args.plain:
        out = {"profile": str(path), "n": args.n, "sentinel_ms_profile": profile.sentinel.get("latency_ms"),
               **plain_report(profile, genotypes, threads, args.runs, args.sessions, args.seed)}
        print(json.dumps(out, indent=2))
        return
    t0 = time.perf_counter()
    cands = [network_candidate(f"{i}:{g.arch_id}", g) for i, g in enumerate(genotypes)]
    keys = [c.key for c in cands]
    sentinel = network_candidate("sentinel", sentinel_genotype(profile.macro))
    tcfg = timer.TimingConfig(threads=threads, runs=args.runs, rounds=2 * args.rounds)
    # Two independent passes of `rounds` rounds each; rounds of pass A come first, then pass B.
    records: list = []
    for r in range(2 * args.rounds):
        records += timer.run_round(cands, r, tcfg, sentinel, seed=args.seed)
    measure_s = time.perf_counter() - t0
    pass_a, pass_b = range(args.rounds), range(args.rounds, 2 * args.rounds)
    rec_a = [x for x in records if x[1] in pass_a]
    rec_b = [x for x in records if x[1] in pass_b]
    lat_a, lat_b = timer.combine(rec_a, **tcfg.reduction()), timer.combine(rec_b, **tcfg.reduction())
    meas_a, meas_b = np.array([lat_a[k] for k in keys]), np.array([lat_b[k] for k in keys])
    sent_a, sent_b = timer.sentinel_median(rec_a), timer.sentinel_median(rec_b)
    meas = (meas_a + meas_b) / 2

    def ceiling(a: dict, b: dict) -> dict:
        return noise_ceiling(np.array([a[k] for k in keys]), np.array([b[k] for k in keys]))

    # The same timings, reduced the ways the issue measured before this methodology existed.
    first_a = [x for x in records if x[1] == 0]
    first_b = [x for x in records if x[1] == args.rounds]
    raw = lambda recs: [(k, r, t, float("nan")) for k, r, t, _ in recs]  # noqa: E731
    ratio = lambda recs: {k: t / s for k, r, t, s in recs}  # noqa: E731
    methodology = {
        "one_fresh_session_median": ceiling(timer.combine(raw(first_a)), timer.combine(raw(first_b))),
        "one_session_sentinel_ratio": ceiling(ratio(first_a), ratio(first_b)),
        "rounds_median_no_sentinel": ceiling(timer.combine(raw(rec_a), how="median"), timer.combine(raw(rec_b), how="median")),
        "rounds_min_no_sentinel": ceiling(timer.combine(raw(rec_a)), timer.combine(raw(rec_b))),
        "rounds_min_sentinel_moving_min": ceiling(timer.combine(rec_a), timer.combine(rec_b)),
        "hwnas_rounds_median_paired_sentinel": ceiling(lat_a, lat_b),
    }

    sent_profile = profile.sentinel["latency_ms"]
    predictors = {}
    for name in PREDICTORS:
        if name not in profile.predictors:
            continue
        p = ByMacroPredictor.from_profiles([profile], name).predict(genotypes)
        raw = {k: (agreement(p, meas_a)[k] + agreement(p, meas_b)[k]) / 2 for k in ("mape", "within_5pct", "within_10pct", "spearman", "kendall")}
        scaled_a, scaled_b = p * sent_a / sent_profile, p * sent_b / sent_profile
        scaled = {k: (agreement(scaled_a, meas_a)[k] + agreement(scaled_b, meas_b)[k]) / 2 for k in ("mape", "within_5pct", "within_10pct")}
        predictors[name] = {"vs_one_measurement": raw, "sentinel_scaled": scaled}

    default_pred = ByMacroPredictor.from_profiles([profile]).predict(genotypes)  # every depth, the default predictor
    by_depth = {}
    if args.depth:
        for depth in sorted({g.stage_depth for g in genotypes}):
            rows = [i for i, g in enumerate(genotypes) if g.stage_depth == depth]
            figs = [agreement(default_pred[rows], m[rows]) for m in (meas_a, meas_b)]
            by_depth[str(list(depth))] = {"n": len(rows), "median_measured_ms": float(np.median(meas[rows])),
                                          **{k: (figs[0][k] + figs[1][k]) / 2 for k in ("mape", "within_10pct")}}
    fl = np.array([flops(g) for g in genotypes])
    params = np.array([count_params(Network(g)) for g in genotypes], dtype=float)
    default = create_predictor(profile)
    many = [SearchSpace(profile.macro).sample(rng) for _ in range(10_000)]  # full depth: one table
    out = {
        "profile": str(path),
        "device": {k: profile.device.get(k) for k in ("cpu_model", "cores", "threads", "graph_optimization_level")},
        "measured_with_threads": threads,
        "n": args.n,
        "rounds_per_pass": args.rounds,
        "measure_seconds": round(measure_s, 1),
        "latency_range_ms": [float(meas.min()), float(meas.max())],
        "noise_ceiling_this_run": noise_ceiling(meas_a, meas_b),
        "methodology_noise_ceilings": methodology,
        "default_predictor": profile.default_predictor,
        "predictors": predictors,
        "spearman_vs_measured": {
            "predictor": float(spearmanr(default_pred, meas).statistic),
            "flops": float(spearmanr(fl, meas).statistic),
            "params": float(spearmanr(params, meas).statistic),
        },
        "sentinel_ms": {"profile": sent_profile, "pass_a": sent_a, "pass_b": sent_b},
        "throughput": throughput(default, many, encode_all(many)),
        "node_profiling": node_profiling_comparison(profile) if args.node_profiling else None,
        "default_predictor_by_depth": by_depth or None,
        "note": "vs_one_measurement: mean of the figures against pass A and pass B; noise ceiling: pass A vs pass B",
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
