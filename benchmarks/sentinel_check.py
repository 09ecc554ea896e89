"""This machine's sentinel vs the profiles': the sentinel check's timing next to the earlier `sentinel_scale`; prints JSON.

For each profile (default: every shipped one): its fingerprint verdict here, the check's tolerance, and the
sentinel timed here `--reps` times by each method, alternating in one process so both see the same device:
- `check` (hwnas.profiling.sentinel_check.measure_sentinel, what `sentinel_scale` now uses): the stored
  sentinel interleaved with calibration networks, the profile's statistic (median of a moving minimum);
- `alone` (the earlier `sentinel_scale`): the sentinel alone in 15 fresh sessions, moving minimum.
Ratios are measured here / profiled; a machine 4x slower than the profiled one shows ~4.

    python benchmarks/sentinel_check.py --reps 3
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from hwnas.profiling import PROFILES_DIR, timer
from hwnas.profiling import sentinel_check as sc
from hwnas.profiling.device_profile import DeviceProfile
from hwnas.profiling.fingerprint import cpu_model, device_fingerprint
from hwnas.profiling.profiler import network_candidate


def alone(profile: DeviceProfile, sessions: int = 15) -> float:
    """The earlier sentinel_scale: the sentinel alone in fresh sessions, moving minimum of session medians."""
    tcfg = sc.profile_timing(profile)
    cand = network_candidate("sentinel", sc.sentinel_arch(profile), batch=tcfg.batch)
    records = [("sentinel", i, float("nan"), float(np.median(timer.time_model(cand.model, cand.input_shape, tcfg))))
               for i in range(sessions)]
    return timer.sentinel_median(records, tcfg.drift_window)


def main() -> None:
    """Parse arguments, time, print one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profiles", nargs="*", help="profile files (default: the shipped ones)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    paths = args.profiles or sorted(map(str, PROFILES_DIR.glob("*.json")))
    here = device_fingerprint()
    rows = []
    for path in paths:
        p = DeviceProfile.load(path)
        ref = float(p.sentinel["latency_ms"])
        check, old, secs = [], [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            check.append(sc.measure_sentinel(p))
            secs.append(time.perf_counter() - t0)
            old.append(alone(p))
        rows.append({"profile": path, "verdict": p.fingerprint_match(here).verdict, "threads": p.device.get("threads"),
                     "profiled_ms": ref, "tolerance": sc.tolerance(p), "check_ms": check,
                     "check_ratio_median": float(np.median(check)) / ref, "alone_ms": old,
                     "alone_ratio_median": float(np.median(old)) / ref, "check_seconds_median": float(np.median(secs))})
    print(json.dumps({"cpu": cpu_model(), "cpu_family": here.get("cpu_family"), "cpu_model_id": here.get("cpu_model_id"),
                      "profiles": rows}, indent=1))


if __name__ == "__main__":
    main()
