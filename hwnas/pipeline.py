"""`hwnas run`: the whole pipeline on the embedded default (digits + this CPU), every stage resumable."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hwnas.config import ProfileConfig, SearchConfig, SupernetConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """What `hwnas run` does at each stage."""

    supernet: SupernetConfig
    search: SearchConfig
    train_epochs: int  # stand-alone training of exported members
    train_members: int  # how many members (spread along the latency axis) are trained; the rest are exported untrained
    profile_quick: bool  # used only when no shipped profile matches this machine


# Single-path (uniform) supernet epochs only: on a CPU a bilevel DARTS epoch costs several single-path ones,
# and the search samples sub-networks uniformly anyway. Sized on the 2-core CI machine with the compiled
# kernel: a single-path epoch of digits takes ~3 s there, one shared-weight estimate ~0.6 s.
PLANS = {
    "quick": RunPlan(SupernetConfig(epochs=0, sample_epochs=30), SearchConfig(pop=12, gens=10), train_epochs=10,
                     train_members=2, profile_quick=True),
    "full": RunPlan(SupernetConfig(epochs=0, sample_epochs=120), SearchConfig(pop=24, gens=20), train_epochs=20,
                    train_members=4, profile_quick=False),
}


def pick_members(errors: list[float], latencies: list[float], k: int) -> list[int]:
    """k member indices to train: the most accurate (estimate), the fastest, then others spread along latency."""
    n = len(latencies)
    if k >= n:
        return list(range(n))
    order = np.argsort(latencies, kind="stable")
    spread = [int(order[r]) for r in np.rint(np.linspace(0, n - 1, k)).astype(int)]
    candidates = [int(np.argmin(errors)), int(np.argmin(latencies)), *spread, *map(int, order)]
    return sorted(list(dict.fromkeys(candidates))[:k])


def _stage(lines: list[str], name: str, t0: float) -> None:
    msg = f"[{time.perf_counter() - t0:6.0f} s] {name}"
    log.info(msg)
    lines.append(msg)


def run_pipeline(out_dir: Path, quick: bool = False,
                 progress: Callable[[str, Any], Callable | None] | None = None) -> dict[str, Any]:
    """Train supernet -> profile (shipped or quick) -> NSGA-II + random baseline -> export + verify -> plot.

    `progress(stage, plan)` returns the callback for stage "supernet", "profile", "search" or
    "export" in that stage's own signature (see hwnas.train, hwnas.profiling.profiler, hwnas.search), or None.
    """
    from hwnas.export import export_front, format_table
    from hwnas.profiling import default_profile_path
    from hwnas.profiling.device_profile import DeviceProfile
    from hwnas.search.session import PLOT, build_problem, run_search, summary_lines
    from hwnas.train import load_data, load_supernet, train_supernet

    plan = PLANS["quick" if quick else "full"]
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

    # 2. device profile: the shipped one for this CPU, else a quick one measured now (kept for reruns)
    profile_path = default_profile_path(sn_cfg.macro)
    if profile_path is None:
        profile_path = out_dir / "profile.json"
        if not profile_path.exists():
            from hwnas.profiling.profiler import profile_device

            log.info("no shipped profile matches this machine; measuring a quick one into %s", profile_path)
            profile_device(ProfileConfig(device="this-device", quick=plan.profile_quick, out=str(profile_path),
                                         resume=True, macro=sn_cfg.macro),
                           progress=progress("profile", plan) if progress else None)
    profile = DeviceProfile.load(profile_path, expected_macro=sn_cfg.macro)
    _stage(lines, f"profile: {profile_path}", t0)

    # 3. search (NSGA-II, then random search at the same number of evaluations for the plot)
    search_dir = out_dir / "search"
    cfg = plan.search
    problem = build_problem(sn_dir, profile_path, cfg)
    front, baseline = run_search(problem, cfg, search_dir, resume=True, compare_random=True,
                                 progress=progress("search", plan) if progress else None,
                                 provenance={"supernet": str(sn_dir.resolve()), "profile": str(Path(profile_path).resolve())})
    lines += summary_lines(front, baseline, search_dir)
    _stage(lines, "search done", t0)

    # 4. export every member; train a spread of them stand-alone
    trained = pick_members([m.error for m in front.members], [m.latency_ms for m in front.members], plan.train_members)
    train_ids = {front.members[i].arch_id for i in trained}
    report = export_front(front, out_dir / "export", profile=profile, train_epochs=plan.train_epochs,
                          data=load_data(sn_cfg), train_ids=train_ids,
                          progress=progress("export", plan) if progress else None)
    lines.append(format_table(report))
    _stage(lines, f"export done: {out_dir / 'export'}", t0)
    lines.append(f"plot: {search_dir / PLOT}")
    ok = report["summary"]["n_passed"] == report["summary"]["n"]
    return {"ok": ok, "lines": lines, "report": report, "front": front, "baseline": baseline,
            "elapsed_s": time.perf_counter() - t0}


__all__ = ["PLANS", "RunPlan", "pick_members", "run_pipeline"]
