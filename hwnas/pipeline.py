"""`hwnas run`: the whole pipeline on the embedded default (digits + this CPU) or MNIST-format data, every stage
resumable."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hwnas.config import MacroConfig, ProfileConfig, SearchConfig, SupernetConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """What `hwnas run` does at each stage."""

    supernet: SupernetConfig
    search: SearchConfig
    train_epochs: int  # stand-alone training of exported members
    train_members: int  # how many members (spread along the latency axis) are trained; the rest are exported untrained
    train_seeds: int  # stand-alone runs per trained member; their mean test accuracy is reported
    profile_quick: bool  # used only when no shipped profile matches this machine
    profile_sizes: dict[str, int] = field(default_factory=dict)  # ProfileConfig overrides (tests: tiny profiles)


# Single-path (uniform) supernet epochs only: on a CPU a bilevel DARTS epoch costs several single-path ones,
# and the search samples sub-networks uniformly anyway. Sized on the 2-core CI machine with the compiled
# kernel: a single-path epoch of digits takes ~3 s there at 16 px, one shared-weight estimate ~0.6 s.
# Elastic input resolution: digits are natively 8x8, so low resolutions lose little accuracy and run 2-3x
# faster; the quick plan keeps two resolutions so that a machine without shipped profiles measures only two.
# Elastic depth: the 5-cell macro may drop the normal cell after either reduction. That reaches latencies no
# choice of cells or resolution does, and needs no extra profiling (the kept cells' blocks are the same).
# Three training seeds per trained member: on digits' 359 test images one run's accuracy moves by a median
# 0.32 points between seeds (24 front members x 3 seeds, 2026-12-03), as much as the gaps between members.
PLANS = {
    "quick": RunPlan(SupernetConfig(epochs=0, sample_epochs=30, resolutions=(8,), elastic_depth=True),
                     SearchConfig(pop=12, gens=10), train_epochs=10, train_members=2, train_seeds=3,
                     profile_quick=True),
    "full": RunPlan(SupernetConfig(epochs=0, sample_epochs=120, resolutions=(6, 8, 12), elastic_depth=True),
                    SearchConfig(pop=24, gens=20), train_epochs=20, train_members=4, train_seeds=3,
                    profile_quick=False),
}

# MNIST-format data (Fashion-MNIST, MNIST, KMNIST: 60 000 28x28 grey training images): C=12 keeps most
# 5-cell networks under the 100 K-parameter budget (median 94 K over random cells at 28 px). A 2-core CPU
# trains the supernet at about 600 images/s at 16 px and 150-250 at 28 px, so the quick plan searches at
# 16 px only, on a 10 000-image subset. The full plan searches at 28 px only, the resolution of the published
# small-CNN results (16 px members stop near 88 % on Fashion-MNIST; a 93 K member reaches 92 % at 28 px with
# 15 epochs on 30 000 images), and is sized for two hours on 2 cores: stand-alone training of the two chosen
# members x 3 seeds is half of it. Validation (the estimate's split) is 5 % of the training set:
# enough to rank, cheap to classify once per evaluated architecture.
# Elastic width (0.5/0.75/1.0 of each stage's channels) reaches the small, fast end of the front that cells
# and depth alone do not; the run measures its own profile for this macro, which then covers every width.
_MNIST_MACRO = MacroConfig(C=12, layers=5, in_channels=1, resolution=16, classes=10)
MNIST_PLANS = {
    "quick": RunPlan(SupernetConfig(data="fashion-mnist", macro=_MNIST_MACRO, epochs=0, sample_epochs=20,
                                    elastic_depth=True, elastic_width=True, train_subset=10000, valid_fraction=0.05),
                     SearchConfig(pop=12, gens=10, max_params_m=0.1), train_epochs=8, train_members=2,
                     train_seeds=3, profile_quick=True),
    "full": RunPlan(SupernetConfig(data="fashion-mnist", macro=_MNIST_MACRO.at_resolution(28), epochs=0,
                                   sample_epochs=8, elastic_depth=True, elastic_width=True, train_subset=30000,
                                   valid_fraction=0.05),
                    SearchConfig(pop=12, gens=10, max_params_m=0.1), train_epochs=10, train_members=2,
                    train_seeds=3, profile_quick=True),
}
RUN_DATA = "digits | fashion-mnist | idx:DIR (MNIST-format files)"


def plan_for(data: str = "digits", quick: bool = False) -> RunPlan:
    """The built-in plan of `hwnas run` for data set `data` (digits, fashion-mnist or idx:DIR)."""
    kind = "quick" if quick else "full"
    if data == "digits":
        return PLANS[kind]
    if data == "fashion-mnist" or (data.startswith("idx:") and len(data) > 4):
        plan = MNIST_PLANS[kind]
        return replace(plan, supernet=replace(plan.supernet, data=data))
    raise ValueError(f"hwnas run has plans for {RUN_DATA}, not {data!r}; "
                     "for other data run the steps (train-supernet, profile, search, export) with your own settings")


def pick_members(errors: list[float], latencies: list[float], k: int) -> list[int]:
    """k member indices to train: the most accurate (estimate), the fastest, then others spread along latency."""
    n = len(latencies)
    if k >= n:
        return list(range(n))
    order = np.argsort(latencies, kind="stable")
    spread = [int(order[r]) for r in np.rint(np.linspace(0, n - 1, k)).astype(int)]
    candidates = [int(np.argmin(errors)), int(np.argmin(latencies)), *spread, *map(int, order)]
    return sorted(list(dict.fromkeys(candidates))[:k])


def _profile_for(macro: MacroConfig, out_dir: Path, plan: RunPlan,
                 progress: Callable[[str, Any], Callable | None] | None) -> Path:
    """A quick profile this run measured before, else the shipped profile of `macro` for this CPU if its sentinel
    runs here as profiled (and, for an elastic-width plan, it covers every width), else a quick one measured now
    into out_dir (kept for reruns)."""
    from hwnas.jsonio import atomic_write_json, load_json
    from hwnas.profiling import default_profile_path
    from hwnas.profiling.device_profile import DeviceProfile
    from hwnas.profiling.profiler import profile_device
    from hwnas.profiling.sentinel_check import check_sentinel

    path = out_dir / f"profile-{macro.resolution}px.json"
    chosen = out_dir / f"profile-{macro.resolution}px.shipped.json"  # a resumed run keeps the profile it chose
    if path.exists():
        return path
    if chosen.exists():
        return Path(load_json(chosen, "profile choice")["profile"])
    shipped = default_profile_path(macro, elastic_width=plan.supernet.elastic_width)
    if shipped is not None:
        check = check_sentinel(DeviceProfile.load(shipped, expected_macro=macro))
        if check.ok:
            atomic_write_json(chosen, {"schema_version": 1, "profile": str(shipped), "sentinel_check": check.to_dict()})
            return shipped
        log.warning("%s: not this machine's speed; measuring a quick profile for this machine into %s", check.message(), path)
    else:
        log.info("no shipped profile matches this machine and macro %s; measuring a quick one into %s", macro.to_dict(), path)
    profile_device(ProfileConfig(device="this-device", quick=plan.profile_quick, out=str(path), resume=True, macro=macro,
                                 elastic_width=plan.supernet.elastic_width, **plan.profile_sizes),
                   progress=progress("profile", plan) if progress else None)
    return path


def _stage(lines: list[str], name: str, t0: float) -> None:
    msg = f"[{time.perf_counter() - t0:6.0f} s] {name}"
    log.info(msg)
    lines.append(msg)


def run_pipeline(out_dir: Path, quick: bool = False,
                 progress: Callable[[str, Any], Callable | None] | None = None,
                 plan: RunPlan | None = None, data: str = "digits",
                 workers: int = 0, scheduler: str | None = None) -> dict[str, Any]:
    """Train supernet -> profile (shipped or quick) -> NSGA-II + random baseline -> export + verify -> plot.

    `plan` replaces the built-in plan_for(data, quick) (tests run a tiny one). `workers` > 1 (a Dask
    LocalCluster) or a Dask `scheduler` address spreads the search's evaluations and the stand-alone training
    runs of the export over that cluster (one-thread workers: the results of an in-process run at one torch thread).
    `progress(stage, plan)` returns the callback for stage "supernet", "profile", "search" or
    "export" in that stage's own signature (see hwnas.train, hwnas.profiling.profiler, hwnas.search), or None.
    """
    from hwnas.export import export_front, format_table
    from hwnas.export.parallel import check_cluster
    from hwnas.profiling.device_profile import DeviceProfile
    from hwnas.search.session import PLOT, build_problem, run_search, summary_lines
    from hwnas.train import load_elastic_data, load_supernet, train_supernet

    plan = plan or plan_for(data, quick)
    check_cluster(workers, scheduler)  # an unreachable scheduler fails now, not after the supernet's training
    t0 = time.perf_counter()
    lines: list[str] = []
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create output directory {out_dir}: {err.strerror or err}") from None

    # 1. supernet (resumes an interrupted training; a finished one is reused)
    sn_dir = out_dir / "supernet"
    bar = progress("supernet", plan) if progress else None
    train_supernet(plan.supernet, sn_dir, resume=True, progress=bar)  # returns at once when already complete
    _, sn_cfg = load_supernet(sn_dir)
    _stage(lines, f"supernet ready: {sn_dir}", t0)

    # 2. device profiles, one per input resolution: the shipped one for this CPU, else a quick one measured now
    profile_paths = [_profile_for(sn_cfg.macro.at_resolution(r), out_dir, plan, progress)
                     for r in sn_cfg.all_resolutions]
    profiles = [DeviceProfile.load(p, expected_macro=sn_cfg.macro.at_resolution(r))
                for p, r in zip(profile_paths, sn_cfg.all_resolutions)]
    _stage(lines, "profiles: " + ", ".join(map(str, profile_paths)), t0)

    # 3. search (NSGA-II, then random search at the same number of evaluations for the plot)
    search_dir = out_dir / "search"
    cfg = replace(plan.search, workers=workers, scheduler=scheduler) if workers or scheduler else plan.search
    problem = build_problem(sn_dir, profile_paths, cfg)
    front, baseline = run_search(problem, cfg, search_dir, resume=True, compare_random=True,
                                 progress=progress("search", plan) if progress else None,
                                 provenance={"supernet": str(sn_dir.resolve()),
                                             "profile": [str(Path(p).resolve()) for p in profile_paths]})
    lines += summary_lines(front, baseline, search_dir)
    _stage(lines, "search done", t0)

    # 4. export every member; train a spread of them stand-alone
    trained = pick_members([m.error for m in front.members], [m.latency_ms for m in front.members], plan.train_members)
    train_ids = {front.members[i].arch_id for i in trained}
    report = export_front(front, out_dir / "export", profile=profiles, train_epochs=plan.train_epochs,
                          data=load_elastic_data(sn_cfg), train_ids=train_ids, train_seeds=plan.train_seeds,
                          progress=progress("export", plan) if progress else None, workers=workers, scheduler=scheduler)
    lines.append(format_table(report))
    _stage(lines, f"export done: {out_dir / 'export'}", t0)
    lines.append(f"plot: {search_dir / PLOT}")
    ok = report["summary"]["n_passed"] == report["summary"]["n"]
    return {"ok": ok, "lines": lines, "report": report, "front": front, "baseline": baseline,
            "elapsed_s": time.perf_counter() - t0}


__all__ = ["MNIST_PLANS", "PLANS", "RunPlan", "pick_members", "plan_for", "run_pipeline"]
