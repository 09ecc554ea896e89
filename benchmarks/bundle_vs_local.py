"""A profile measured through a bundle and the local runner vs a local `hwnas profile`, same plan, side by side.

Runs, one after the other on this machine (alternate the order with --bundle-first to see order effects):
  hwnas profile ARGS --device local-cmp --out OUT/local.json
  hwnas profile ARGS --device bundle-cmp --bundle OUT/bundle --run-here --out OUT/bundle.json
and prints JSON: each profile's validation figures, rounds and wall time, and how the two measured the same
held-out networks (median ratio bundle/local, share within +-10 %, Spearman).

    PYTHONPATH=$PWD python3 benchmarks/bundle_vs_local.py [--quick | -- --n-calibration 40 --rounds 4 ...]
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

KEYS = ("predictor", "n", "mape", "within_10pct", "spearman", "noise_ceiling_within_10pct")


def _profile(args: list[str], out: Path) -> dict:
    """Run `hwnas profile ARGS`; the profile's figures and the command's wall time."""
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-m", "hwnas.cli", "profile", *args, "--out", str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    p = json.loads(out.read_text())
    return {"command": "hwnas profile " + " ".join(args), "wall_s": round(time.monotonic() - t0, 1),
            "rounds_completed": p["meta"].get("rounds_completed"), "sentinel_ms": p["sentinel"]["latency_ms"],
            **{k: p["validation"][k] for k in KEYS}, "_val": {e["arch_id"]: (e["latency_ms_a"] + e["latency_ms_b"]) / 2
                                                              for e in p["validation_set"]}}


def main() -> None:
    """Measure both, print the comparison."""
    from scipy.stats import spearmanr

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for the profiles and the bundle (default: a temp folder)")
    p.add_argument("--bundle-first", action="store_true", help="measure the bundle before the local profile")
    p.add_argument("profile_args", nargs="*", help="arguments for both `hwnas profile` runs (default: --quick)")
    args = p.parse_args()
    common = args.profile_args or ["--quick"]
    out = Path(args.out or tempfile.mkdtemp(prefix="hwnas-cmp-"))
    runs = {"local": [*common, "--device", "local-cmp"],
            "bundle": [*common, "--device", "bundle-cmp", "--bundle", str(out / "bundle"), "--run-here"]}
    order = ["bundle", "local"] if args.bundle_first else ["local", "bundle"]
    res = {name: _profile(runs[name], out / f"{name}.json") for name in order}
    a, b = res["local"].pop("_val"), res["bundle"].pop("_val")
    ids = sorted(set(a) & set(b))
    ratio = np.array([b[i] / a[i] for i in ids])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    print(json.dumps({"cpu": cpu, "order": order, **res, "validation_networks": len(ids), "bundle_over_local": {
        "median": float(np.median(ratio)), "within_10pct": float(np.mean(np.abs(ratio - 1) <= 0.1)),
        "spearman": float(spearmanr([a[i] for i in ids], [b[i] for i in ids])[0])}}, indent=1))


if __name__ == "__main__":
    main()
