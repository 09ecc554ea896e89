"""Search quality and pipeline figures, printed as JSON.

1. NSGA-II vs random search at the same number of evaluations, several seeds, pymoo hypervolume at one
   fixed reference point (the same box for every run), on the real objectives: the supernet's shared-weight
   accuracy estimate and the profile's latency predictor (plus exact parameter counts).
2. With --run-dir (a finished `hwnas run` folder): the export checks, measured vs predicted latency next to
   the profile's noise ceiling, and the stand-alone accuracy figures of the front.
3. With --time-run quick|full: wall time of `hwnas run [--quick]` in a fresh folder (a subprocess).

    python benchmarks/search.py --supernet hwnas-run-quick/supernet
    python benchmarks/search.py --run-dir hwnas-run-quick --skip-search
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def search_figures(args: argparse.Namespace) -> dict:
    """Hypervolume of NSGA-II and random search per seed; the objectives are shared (one cache) across runs."""
    from hwnas.config import SearchConfig
    from hwnas.search import search
    from hwnas.search.session import build_problem

    base = SearchConfig(pop=args.pop, gens=args.gens)
    problem = build_problem(args.supernet, args.profile, base, valid_subset=args.valid_subset,
                            estimator_kwargs={"calib_batches": args.calib_batches, "batch_size": args.batch_size})
    ref = problem.reference_point()
    rows = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        # interleaved: both algorithms of a seed run back to back on the same problem and reference point
        out = {"seed": seed}
        for algorithm in ("nsga2", "random"):
            cfg = SearchConfig(pop=args.pop, gens=args.gens, seed=seed, algorithm=algorithm)
            front = search(problem, cfg, reference_point=ref)
            out[f"hv_{algorithm}"] = front.hypervolume
            out[f"evaluations_{algorithm}"] = front.n_evaluations
            out[f"front_size_{algorithm}"] = len(front.members)
            out[f"best_error_{algorithm}"] = min(m.error for m in front.members)
        out["hv_ratio"] = out["hv_nsga2"] / out["hv_random"] if out["hv_random"] > 0 else None
        rows.append(out)
        print(json.dumps(out), file=sys.stderr, flush=True)
    return {
        "objectives": "error: supernet shared-weight estimate (hwnas.train.AccuracyEstimator) on "
                      f"{args.valid_subset or 'all'} validation images, BN recalibrated on {args.calib_batches} batch(es) "
                      f"of {args.batch_size}; latency_ms: the profile's default predictor; params_m: exact count",
        "supernet": str(args.supernet), "profile": [str(p) for p in args.profile],
        "pop": args.pop, "gens": args.gens, "evaluation_budget": args.pop * args.gens,
        "reference_point": [float(r) for r in ref],
        "seeds": rows,
        "nsga2_higher_every_seed": all(r["hv_nsga2"] > r["hv_random"] for r in rows),
        "median_hv_ratio": float(np.median([r["hv_ratio"] for r in rows if r["hv_ratio"] is not None])),
        "architectures_computed": problem.n_computed,
        "elapsed_s": time.perf_counter() - t0,
    }


def synthetic_figures(args: argparse.Namespace) -> dict:
    """The same comparison with a synthetic error (a noisy decreasing function of the exact parameter count)
    and the real latency predictor: cheap enough for a realistic budget; it tests the optimizer, not the estimator."""
    from hwnas.config import SearchConfig
    from hwnas.predictors import ByMacroPredictor
    from hwnas.profiling.device_profile import DeviceProfile
    from hwnas.search import HWNASProblem, ParamsCounter, search
    from hwnas.space import SearchSpace

    profiles = [DeviceProfile.load(p) for p in args.profile]
    space = SearchSpace(profiles[0].macro, resolutions=[p.macro.resolution for p in profiles])
    latency = ByMacroPredictor.from_profiles(profiles).predict
    params = ParamsCounter(profiles[0].macro)

    def error(genotypes):  # more parameters -> lower error, plus a fixed per-architecture wobble of +-2 points
        wobble = np.array([int(g.arch_id[:4], 16) / 0xFFFF - 0.5 for g in genotypes])
        return np.clip(0.5 - 1.5 * params(genotypes) + 0.04 * wobble, 0.0, 1.0)

    rows = []
    for seed in args.seeds:
        problem = HWNASProblem(space, error, latency)
        ref = problem.reference_point()
        out = {"seed": seed}
        for algorithm in ("nsga2", "random"):
            front = search(problem, SearchConfig(pop=args.synthetic_pop, gens=args.synthetic_gens, seed=seed,
                                                 algorithm=algorithm), reference_point=ref)
            out[f"hv_{algorithm}"], out[f"evaluations_{algorithm}"] = front.hypervolume, front.n_evaluations
        rows.append(out)
    return {"objectives": "SYNTHETIC error = 0.5 - 1.5 * params_m + wobble; latency_ms: the profile's predictor; params_m: exact",
            "pop": args.synthetic_pop, "gens": args.synthetic_gens, "seeds": rows,
            "nsga2_higher_every_seed": all(r["hv_nsga2"] > r["hv_random"] for r in rows)}


def run_dir_figures(run_dir: Path) -> dict:
    """Export checks and accuracy/latency figures of a finished `hwnas run` folder."""
    from hwnas.export import load_report

    report = load_report(run_dir / "export" / "export_report.json")
    rows = report["members"]
    trained = [r for r in rows if r["test_accuracy"] is not None]
    # Ties go to the fastest of the most accurate members: the one a user would pick, and the harder 2x bar.
    best = max(trained, key=lambda r: (r["test_accuracy"], -(r["measured_latency_ms"] or 0.0)), default=None)
    fast = None
    if best is not None:
        # the fastest trained member at least 2x faster than the most accurate one, and its accuracy loss
        cands = [r for r in trained if r["measured_latency_ms"] and best["measured_latency_ms"]
                 and r["measured_latency_ms"] * 2 <= best["measured_latency_ms"]]
        if cands:
            f = max(cands, key=lambda r: r["test_accuracy"])
            fast = {"arch_id": f["arch_id"], "speedup_measured": best["measured_latency_ms"] / f["measured_latency_ms"],
                    "accuracy_loss_points": 100 * (best["test_accuracy"] - f["test_accuracy"]),
                    "test_accuracy_seeds": f.get("test_accuracy_seeds")}
    s = report["summary"]
    return {
        "members": s["n"], "passed_all_checks": s["n_passed"], "max_abs_diff": s["max_abs_diff"],
        "opsets": sorted({r["opset"] for r in rows if r["opset"] is not None}),
        "latency_within_10pct": s["latency_within_10pct"], "noise_ceiling_within_10pct": s["noise_ceiling_within_10pct"],
        "latency_within_10pct_rescaled": s.get("latency_within_10pct_rescaled"), "sentinel": s.get("sentinel"),
        "noise_now_within_10pct": s.get("noise_now_within_10pct"),
        "latency_ratio_median": float(np.median([r["latency_ratio"] for r in rows if r["latency_ratio"]])) if rows else None,
        "trained_members": len(trained), "train_epochs": report["train_epochs"],
        "train_seeds": report.get("train_seeds", 1),
        "best_test_accuracy": best["test_accuracy"] if best else None,
        "best_test_accuracy_seeds": best.get("test_accuracy_seeds") if best else None,
        "best_member": best["arch_id"] if best else None,
        "fast_member_2x": fast,
        "trained_latency_span": (max(r["measured_latency_ms"] for r in trained) / min(r["measured_latency_ms"] for r in trained))
        if trained and all(r["measured_latency_ms"] for r in trained) else None,
    }


def time_run(kind: str) -> dict:
    """Wall time of `hwnas run [--quick]` into a fresh temporary folder."""
    out = Path(tempfile.mkdtemp(prefix=f"hwnas-run-{kind}-"))
    cmd = [sys.executable, "-m", "hwnas.cli", "run", "--out", str(out)] + (["--quick"] if kind == "quick" else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_s": time.perf_counter() - t0,
            "out": str(out), "tail": proc.stdout[-2000:] + proc.stderr[-1000:]}


def default_profiles(supernet: Path) -> list[Path]:
    """Per resolution of the supernet (or the default macro without one): the shipped profile, else the run's own."""
    from hwnas.config import DEFAULT_MACRO
    from hwnas.profiling import default_profile_path

    if not (supernet / "supernet.json").exists():
        return [default_profile_path(DEFAULT_MACRO) or supernet.parent / f"profile-{DEFAULT_MACRO.resolution}px.json"]
    from hwnas.train import load_supernet

    _, cfg = load_supernet(supernet)
    return [default_profile_path(cfg.macro.at_resolution(r)) or supernet.parent / f"profile-{r}px.json"
            for r in cfg.all_resolutions]


def main() -> None:
    from hwnas.pipeline import PLANS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernet", type=Path, default=Path("hwnas-run-quick/supernet"))
    parser.add_argument("--profile", type=Path, action="append", default=None,
                        help="repeat per input resolution; default: for each resolution the supernet was trained at, "
                             "the shipped profile, else RUN/profile-<R>px.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    full = PLANS["full"].search  # default budget: the one `hwnas run` searches with
    parser.add_argument("--pop", type=int, default=full.pop)
    parser.add_argument("--gens", type=int, default=full.gens)
    parser.add_argument("--calib-batches", type=int, default=1, help="BN recalibration batches (cheap estimate)")
    parser.add_argument("--batch-size", type=int, default=64, help="estimator batch size")
    parser.add_argument("--valid-subset", type=int, default=None, help="estimate on the first N validation images")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--synthetic", action="store_true", help="also the synthetic-error comparison (seconds)")
    parser.add_argument("--synthetic-pop", type=int, default=full.pop)
    parser.add_argument("--synthetic-gens", type=int, default=full.gens)
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--time-run", choices=["quick", "full"], default=None)
    args = parser.parse_args()

    # Timings on a shared 2-core machine depend on what else runs: record the load next to them.
    result: dict = {"load_average_at_start": list(os.getloadavg())}
    if args.profile is None:
        args.profile = default_profiles(args.supernet)
    if not args.skip_search:
        result["search"] = search_figures(args)
    if args.synthetic:
        result["synthetic"] = synthetic_figures(args)
    if args.run_dir is not None:
        result["run"] = run_dir_figures(args.run_dir)
    if args.time_run:
        result[f"time_run_{args.time_run}"] = time_run(args.time_run)
    result["load_average_at_end"] = list(os.getloadavg())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
