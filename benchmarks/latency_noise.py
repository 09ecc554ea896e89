"""Sentinel timed before vs interleaved with each candidate, side by side, with bursts of interference; prints JSON.

Times N held-out architectures of a profile's space with both methodologies of `hwnas/profiling/timer.py`,
alternating the method from round to round in one process so both see the same device:
- `before` (interleave=0, the earlier one): sentinel session timed before the candidate's, correction by
  the sentinel's moving-minimum level, minimum over rounds;
- `interleaved` (interleave=10, what hwnas uses): both sessions open, runs alternating in blocks of 10,
  correction by the candidate's own sentinel, median over rounds.
Each measurement is compared with the profile's prediction after scaling by the profile's sentinel (what
`export` reports as rescaled), and split into even/odd rounds to see whether it repeats (the noise now).
`--interference steady|bursts` trains a small network on one thread in a second process, almost steadily or
in short bursts, like another tenant on the other vCPU of a shared host; `none` measures the machine as it is.

    python benchmarks/latency_noise.py --profile profiles/amd-epyc-2c-1t-8px.json --interference steady
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

from hwnas.predictors import create_predictor
from hwnas.profiling import default_profile_path, timer
from hwnas.profiling.device_profile import DeviceProfile
from hwnas.profiling.profiler import network_candidate, sentinel_genotype
from hwnas.space import SearchSpace

METHODS = {"before": 0, "interleaved": 10}
# The neighbour is a 1-thread training loop of a small hwnas network on digits (8x8, batch 64), the kind of
# job that, on the other vCPU of this project's host, slows tiny onnxruntime models 1.6-2x; a big
# convolution or a plain busy loop there disturbs far less.
NEIGHBOUR = """
import random, sys, time
import numpy as np, torch
import torch.nn.functional as F
from hwnas.config import MacroConfig
from hwnas.data import load_dataset
from hwnas.space import SearchSpace
from hwnas.space.network import build_network
torch.set_num_threads(1)
ON, OFF = {"bursts": ((0.1, 2.0), (0.1, 2.0)), "steady": ((5.0, 10.0), (0.0, 0.5))}[sys.argv[1]]
macro = MacroConfig(C=4, layers=3, in_channels=1, resolution=8, classes=10)
net = build_network(SearchSpace(macro).sample(np.random.default_rng(0)))
x, y = load_dataset("digits", 8, seed=0).train.tensors
opt, rng, gen = torch.optim.SGD(net.parameters(), lr=0.01), random.Random(0), torch.Generator().manual_seed(0)
while True:
    end = time.perf_counter() + rng.uniform(*ON)
    while time.perf_counter() < end:
        idx = torch.randint(len(x), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    time.sleep(rng.uniform(*OFF))
"""


def held_out(profile: DeviceProfile, n: int, seed: int) -> list:
    """n architectures of the profile's space it never timed."""
    seen = {e["arch_id"] for e in profile.calibration + profile.validation_set} | {profile.sentinel.get("arch_id")}
    return SearchSpace(profile.macro).sample_distinct(np.random.default_rng(seed), n, exclude=seen)


def figures(records: list, cfg: timer.TimingConfig, keys: list[str], predicted: np.ndarray, sentinel_ref: float) -> dict:
    """Agreement with the rescaled prediction, and between the even and odd rounds, of one method's records."""
    kw = cfg.reduction()
    lat = timer.combine(records, sentinel_ref, **kw)
    half_a, half_b = timer.split_halves(records, sentinel_ref, cfg.rounds, **kw)
    ratio = np.array([lat[k] for k in keys]) / predicted
    halves = np.array([half_a[k] / half_b[k] for k in keys])
    sentinel = np.array([r[3] for r in records])
    return {
        "within_10pct_of_prediction": float(np.mean(np.abs(ratio - 1) <= 0.10)),
        "median_ratio": float(np.median(ratio)),
        "worst_ratio": float(ratio[np.argmax(np.abs(ratio - 1))]),
        "halves_agree_within_10pct": float(np.mean(np.abs(halves - 1) <= 0.10)),
        # how disturbed the device was: share of sentinel timings 20 % above the run's fastest
        "slow_sentinel_share": float(np.mean(sentinel > 1.2 * sentinel.min())),
    }


def one_repetition(profile: DeviceProfile, genotypes: list, args: argparse.Namespace, rep: int) -> dict:
    """Both methods on the same candidates, alternating which goes first from round to round."""
    cands = [network_candidate(f"{i}:{g.arch_id}", g) for i, g in enumerate(genotypes)]
    keys = [c.key for c in cands]
    sentinel = network_candidate("sentinel", sentinel_genotype(profile.macro))
    cfgs = {name: timer.TimingConfig(threads=profile.device["threads"], runs=args.runs, rounds=args.rounds,
                                     interleave=il, combine="median" if il else "min")
            for name, il in METHODS.items()}
    records: dict[str, list] = {name: [] for name in METHODS}
    for r in range(args.rounds):
        for name in (list(METHODS) if (r + rep) % 2 == 0 else list(METHODS)[::-1]):
            records[name] += timer.run_round(cands, r, cfgs[name], sentinel, seed=args.seed + rep)
    predicted = create_predictor(profile).predict(genotypes)
    ref = float(profile.sentinel["latency_ms"])
    out = {name: figures(records[name], cfgs[name], keys, predicted, ref) for name in METHODS}
    for name in METHODS:
        out[name]["sentinel_now_over_profile"] = timer.sentinel_median(records[name], cfgs[name].drift_window) / ref
    return out


def main() -> None:
    """Parse flags, run the repetitions (with or without a bursty neighbour), print one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=None, help="profile JSON (default: the shipped one for this device)")
    ap.add_argument("--n", type=int, default=20, help="held-out architectures")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3, help="independent repetitions (fresh candidates' rounds)")
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--interference", choices=("bursts", "steady", "none"), default="steady",
                    help="a neighbour training in bursts (0.1-2 s on and off), almost steadily (5-10 s on, "
                         "< 0.5 s off), or none")
    args = ap.parse_args()
    torch.set_num_threads(1)

    path = args.profile or default_profile_path()
    if path is None:
        raise SystemExit("no profile for this device; pass --profile or run `hwnas profile`")
    profile = DeviceProfile.load(path)
    genotypes = held_out(profile, args.n, args.seed)
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, args.interference]) if args.interference != "none" else None
    t0 = time.perf_counter()
    try:
        reps = []
        for rep in range(args.reps):
            reps.append(one_repetition(profile, genotypes, args, rep))
            print(f"repetition {rep + 1}/{args.reps}: " + json.dumps(
                {m: round(reps[-1][m]["within_10pct_of_prediction"], 3) for m in METHODS}), file=sys.stderr, flush=True)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    summary = {m: {k: float(np.median([r[m][k] for r in reps])) for k in reps[0][m]} for m in METHODS}
    print(json.dumps({
        "profile": profile.name, "n": args.n, "rounds": args.rounds, "runs": args.runs,
        "interference": args.interference, "wall_s": round(time.perf_counter() - t0, 1),
        "median_over_repetitions": summary, "repetitions": reps,
    }, indent=1))


if __name__ == "__main__":
    main()
