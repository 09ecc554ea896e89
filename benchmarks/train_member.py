"""Stand-alone test accuracy of one architecture file, trained from scratch at a chosen input resolution.

What `hwnas run`'s export does for its chosen members, for one architecture and any budget: for example the
quick Fashion-MNIST run's most accurate member (searched at 16 px) on the full plan's budget at 28 px:

    python benchmarks/train_member.py ARCH.json --data fashion-mnist --resolution 28 --train-subset 30000 \
        --epochs 15 --seeds 0 1 2 --out benchmarks/results/fashion_28px_member.json

Prints one JSON object (per-seed and mean test accuracy on the data set's test split, parameters, wall time).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from hwnas.data import load_dataset
from hwnas.space.genotype import Genotype
from hwnas.space.network import count_params
from hwnas.train import train_network


def main(argv: list[str] | None = None) -> int:
    """Parse flags, train the architecture once per seed, print the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("arch", type=Path, help="architecture JSON file")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--resolution", type=int, default=None, help="input resolution (default: the architecture's)")
    p.add_argument("--train-subset", type=int, default=0, help="> 0: stratified subset of the training images")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    genotype = Genotype.load(args.arch)
    if args.resolution:
        genotype = replace(genotype, macro=replace(genotype.macro, resolution=args.resolution))
    data = load_dataset(args.data, genotype.macro.resolution, seed=0, valid_fraction=0.05,
                        train_subset=args.train_subset)
    runs = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        net, acc = train_network(genotype, data, args.epochs, seed=seed)
        runs.append({"seed": seed, "test_accuracy": acc, "wall_s": round(time.perf_counter() - t0)})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    report = {"schema_version": 1, "argv": ["python", "benchmarks/train_member.py", *(argv or sys.argv[1:])],
              "arch_id": genotype.arch_id, "resolution": genotype.macro.resolution, "params": count_params(net),
              "data": args.data, "train_images": len(data.train), "test_images": len(data.test), "epochs": args.epochs,
              "threads": args.threads, "runs": runs,
              "test_accuracy_mean": statistics.mean(r["test_accuracy"] for r in runs)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
