"""How well the supernet's shared-weight estimate ranks architectures; prints JSON.

Ground truth: stand-alone training of each cell from scratch, test accuracy (and loss) averaged over seeds,
at a macro small enough that the cells really differ (C=4, 3 layers, 8x8 digits). Its own ceiling is the
mean Kendall tau between single seeds. The estimate is tracked after the DARTS bilevel phase and after
single-path fine-tuning, with and without BatchNorm recalibration.
`--guards` also compares the DARTS collapse guards, `--demo` measures the default macro (supernet
training time, best stand-alone test accuracy).

    python benchmarks/ranking.py --quick        # a few minutes
    python benchmarks/ranking.py                # the figures quoted in the README
    python benchmarks/ranking.py --guards --demo --skip-ranking
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

from hwnas.config import DEFAULT_MACRO, MacroConfig, SupernetConfig
from hwnas.data import load_dataset
from hwnas.space.genotype import STEPS, Genotype
from hwnas.space.network import build_network, count_params
from hwnas.space.ops import GENOTYPE_OPS
from hwnas.train import AccuracyEstimator, evaluate, load_supernet, train_network, train_supernet
from hwnas.train.supernet import param_free_count

SMALL = MacroConfig(C=4, layers=3, in_channels=1, resolution=8, classes=10)
CONV_OPS = [op for op in GENOTYPE_OPS if "conv" in op and op != "skip_connect"]
FREE_OPS = [op for op in GENOTYPE_OPS if op not in CONV_OPS]


def spanning_cells(n: int, macro: MacroConfig, seed: int = 1234) -> list[Genotype]:
    """n genotypes whose share of conv ops rises from 0 (all pools/skips) to 1 (all convs)."""
    rng = np.random.default_rng(seed)
    cells = []
    for p_conv in np.linspace(0.0, 1.0, n):
        halves = []
        for _ in range(2):
            pairs = []
            for node in range(STEPS):
                for j in rng.choice(node + 2, size=2, replace=False):
                    pool = CONV_OPS if rng.random() < p_conv else FREE_OPS
                    pairs.append((pool[int(rng.integers(len(pool)))], int(j)))
            halves.append(tuple(pairs))
        cells.append(Genotype(normal=halves[0], reduce=halves[1], macro=macro))
    return cells


def rank_stats(estimate: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Kendall tau and Spearman rho between two score vectors (higher = better for both)."""
    return {"kendall": float(kendalltau(estimate, truth)[0]), "spearman": float(spearmanr(estimate, truth)[0])}


def cpu_seconds() -> float:
    """CPU time of this process (user + system), robust to other jobs sharing the cores."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def ground_truth(cells: list[Genotype], data, epochs: int, seeds: int, cache: Path | None = None) -> dict:
    """Stand-alone test accuracy/loss per cell and seed, their means and the seed-to-seed ceiling.

    `cache` (JSON) keeps finished trainings keyed by arch_id, seed and epochs, so a rerun of the benchmark
    only trains what it has not trained before (the results are deterministic for a given key).
    """
    store = json.loads(cache.read_text()) if cache is not None and cache.exists() else {"schema_version": 1, "runs": {}}
    acc = np.zeros((len(cells), seeds))
    loss = np.zeros((len(cells), seeds))
    for i, g in enumerate(cells):
        for s in range(seeds):
            key = f"{g.arch_id}:seed{s}:epochs{epochs}:test{len(data.test)}"
            if key not in store["runs"]:
                net, test_acc = train_network(g, data, epochs, seed=s)
                store["runs"][key] = {"acc": test_acc, "loss": evaluate(net, data.test)[1]}
                if cache is not None:
                    cache.write_text(json.dumps(store, indent=1) + "\n")
            acc[i, s], loss[i, s] = store["runs"][key]["acc"], store["runs"][key]["loss"]
        logging.info("ground truth %d/%d: acc %s", i + 1, len(cells), np.round(acc[i], 4).tolist())
    pairs = list(itertools.combinations(range(seeds), 2))
    ceiling = {
        "accuracy": float(np.mean([kendalltau(acc[:, a], acc[:, b])[0] for a, b in pairs])),
        "neg_loss": float(np.mean([kendalltau(-loss[:, a], -loss[:, b])[0] for a, b in pairs])),
    }
    # How reproducible an averaged ground truth is: tau between the means over two disjoint halves of the seeds.
    half = seeds // 2
    split_half = {
        "accuracy": float(kendalltau(acc[:, :half].mean(1), acc[:, half:2 * half].mean(1))[0]) if half else None,
        "neg_loss": float(kendalltau(-loss[:, :half].mean(1), -loss[:, half:2 * half].mean(1))[0]) if half else None,
    }
    return {"acc": acc, "loss": loss, "ceiling_kendall": ceiling, "split_half_kendall": split_half}


def ranking(args: argparse.Namespace) -> dict:
    """Estimate-vs-ground-truth ranking at the small macro, per training phase and BN treatment."""
    data = load_dataset("digits", SMALL.resolution, seed=0)
    cells = spanning_cells(args.cells, SMALL)
    cfg = SupernetConfig(macro=SMALL, epochs=args.bilevel_epochs, sample_epochs=args.sample_epochs,
                         sampling=args.sampling, seed=0)
    snapshots: dict[int, dict] = {}
    track = {cfg.epochs, cfg.epochs + cfg.sample_epochs} | set(range(cfg.epochs, cfg.epochs + cfg.sample_epochs + 1, args.track_every))

    def on_epoch(epoch: int, supernet) -> None:
        if epoch in track:
            g = supernet.derive()
            genos = cells + [g]
            snapshots[epoch] = {"derived": g}
            for bn in ("recal", "no_recal"):
                est = AccuracyEstimator(supernet, data, recalibrate_bn=bn == "recal")
                # Negated so that, like the ground truth, higher is better.
                snapshots[epoch][f"error_{bn}"] = -est.error(genos)
                snapshots[epoch][f"loss_{bn}"] = -est.loss(genos)

    t0, c0 = time.perf_counter(), cpu_seconds()
    with tempfile.TemporaryDirectory() as tmp:
        train_supernet(cfg, Path(tmp) / "sn", epoch_callback=on_epoch)
    supernet_wall, supernet_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    derived = snapshots[cfg.epochs + cfg.sample_epochs]["derived"]
    darts_derived = snapshots[cfg.epochs]["derived"]
    all_cells = cells + [derived]
    t0 = time.perf_counter()
    gt = ground_truth(all_cells, data, args.gt_epochs, args.seeds, args.gt_cache)
    gt_wall = time.perf_counter() - t0
    truth_acc, truth_loss = gt["acc"].mean(1), -gt["loss"].mean(1)

    def stats_at(epoch: int) -> dict:
        snap = snapshots[epoch]
        out = {}
        for bn in ("recal", "no_recal"):
            est_err, est_loss = snap[f"error_{bn}"].copy(), snap[f"loss_{bn}"].copy()
            if snap["derived"].arch_id != derived.arch_id:  # the derived cell is the final one in the truth
                est_err, est_loss = est_err[:-1], est_loss[:-1]
                ta, tl = truth_acc[:-1], truth_loss[:-1]
            else:
                ta, tl = truth_acc, truth_loss
            out[bn] = {
                "acc_vs_acc": rank_stats(est_err, ta),
                "loss_vs_loss": rank_stats(est_loss, tl),
                "loss_vs_acc": rank_stats(est_loss, ta),
            }
        return out

    phases = {f"epoch_{e}": stats_at(e) for e in sorted(snapshots)}
    final = phases[f"epoch_{cfg.epochs + cfg.sample_epochs}"]["recal"]["acc_vs_acc"]
    darts_only = phases[f"epoch_{cfg.epochs}"]
    ceiling = gt["ceiling_kendall"]["accuracy"]
    return {
        "macro": SMALL.to_dict(),
        "cells": len(all_cells),
        "seeds": args.seeds,
        "gt_epochs": args.gt_epochs,
        "supernet_config": {k: v for k, v in cfg.to_dict().items() if k != "macro"},
        "ground_truth": {
            "test_images": len(data.test),
            "mean_test_acc_per_cell": np.round(truth_acc, 4).tolist(),
            "acc_range": [float(truth_acc.min()), float(truth_acc.max())],
            "ceiling_kendall_between_seeds": gt["ceiling_kendall"],
            "split_half_kendall": gt["split_half_kendall"],
            # more parameters = higher score: the simplest rival to the supernet estimate
            "params_proxy": rank_stats(np.array([count_params(build_network(g)) for g in all_cells], float), truth_acc),
            "derived_genotype_rank": int((truth_acc > truth_acc[-1]).sum()) + 1,
        },
        "estimate_final": final,
        "target": {"kendall_min": max(0.35, 0.7 * ceiling), "met": final["kendall"] >= max(0.35, 0.7 * ceiling)},
        "ablation": {
            "darts_only_no_recal": darts_only["no_recal"]["acc_vs_acc"],
            "darts_only_recal": darts_only["recal"]["acc_vs_acc"],
            "finetuned_no_recal": phases[f"epoch_{cfg.epochs + cfg.sample_epochs}"]["no_recal"]["acc_vs_acc"],
            "finetuned_recal": final,
        },
        "per_epoch": phases,
        "derived": {"after_bilevel": darts_derived.to_dict(), "param_free_normal": param_free_count(darts_derived)},
        "estimated_acc_final": np.round(snapshots[cfg.epochs + cfg.sample_epochs]["error_recal"] + 1, 4).tolist(),
        "time_s": {"supernet_wall": supernet_wall, "supernet_cpu": supernet_cpu, "ground_truth_wall": gt_wall},
    }


def guards(args: argparse.Namespace) -> dict:
    """Derived genotype of a DARTS bilevel run per collapse guard: parameter-free ops and stand-alone accuracy."""
    data = load_dataset("digits", SMALL.resolution, seed=0)
    out = {}
    for guard in ("none", "skip_dropout", "early_stop"):
        cfg = SupernetConfig(macro=SMALL, epochs=args.guard_epochs, sample_epochs=0, guard=guard, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            train_supernet(cfg, Path(tmp) / "sn")
            supernet, _ = load_supernet(Path(tmp) / "sn")
            meta = json.loads((Path(tmp) / "sn" / "supernet.json").read_text())
        g = supernet.derive()
        accs = [train_network(g, data, args.gt_epochs, seed=s)[1] for s in range(args.seeds)]
        out[guard] = {
            "param_free_normal": param_free_count(g, "normal"),
            "param_free_reduce": param_free_count(g, "reduce"),
            "param_free_normal_per_epoch": [h["param_free_normal"] for h in meta["history"]],
            "alphas_frozen_at_epoch": next((h["epoch"] for h in meta["history"] if h["alphas_frozen"]), None),
            "standalone_test_acc_mean": float(np.mean(accs)),
            "genotype": g.to_dict(),
        }
        logging.info("guard %s: %s", guard, {k: v for k, v in out[guard].items() if k != "genotype"})
    return {"bilevel_epochs": args.guard_epochs, "macro": SMALL.to_dict(), "guards": out}


def demo(args: argparse.Namespace) -> dict:
    """Default macro: supernet training time with the default config, best stand-alone test accuracy."""
    cfg = SupernetConfig()
    t0, c0 = time.perf_counter(), cpu_seconds()
    with tempfile.TemporaryDirectory() as tmp:
        train_supernet(cfg, Path(tmp) / "sn")
        derived = Genotype.load(Path(tmp) / "sn" / "genotype.json")
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    data = load_dataset("digits", DEFAULT_MACRO.resolution, seed=0)
    candidates = {"derived": derived}
    candidates.update({f"conv_heavy_{i}": g for i, g in enumerate(spanning_cells(8, DEFAULT_MACRO)[-2:])})
    results = {}
    for name, g in candidates.items():
        t1 = time.perf_counter()
        results[name] = {"test_acc": train_network(g, data, args.demo_epochs, seed=0)[1],
                         "train_wall_s": time.perf_counter() - t1, "arch_id": g.arch_id}
        logging.info("demo %s: %s", name, results[name])
    best = max(results.values(), key=lambda r: r["test_acc"])
    return {
        "macro": DEFAULT_MACRO.to_dict(),
        "supernet_config": {k: v for k, v in cfg.to_dict().items() if k != "macro"},
        "supernet_train_wall_s": wall,
        "supernet_train_cpu_s": cpu,
        "supernet_target_s": 300,
        "standalone_epochs": args.demo_epochs,
        "standalone": results,
        "best_test_acc": best["test_acc"],
        "target_acc": 0.985,
        "test_images": len(data.test),
    }


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the selected parts, print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budgets: a few minutes")
    p.add_argument("--cells", type=int, default=16)
    p.add_argument("--seeds", type=int, default=8, help="stand-alone seeds per cell (3 seeds overstate the ceiling)")
    p.add_argument("--gt-epochs", type=int, default=10)
    p.add_argument("--bilevel-epochs", type=int, default=4)
    p.add_argument("--sample-epochs", type=int, default=60)
    p.add_argument("--sampling", default="uniform")
    p.add_argument("--track-every", type=int, default=10)
    p.add_argument("--guard-epochs", type=int, default=8)
    p.add_argument("--demo-epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the cores are shared)")
    p.add_argument("--skip-ranking", action="store_true")
    p.add_argument("--guards", action="store_true", help="compare the DARTS collapse guards")
    p.add_argument("--demo", action="store_true", help="default macro: supernet time and best stand-alone accuracy")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--gt-cache", type=Path, help="JSON file reusing stand-alone results across runs")
    args = p.parse_args(argv)
    if args.quick:
        args.cells, args.seeds, args.gt_epochs = 8, 2, 4
        args.bilevel_epochs, args.sample_epochs, args.track_every = 2, 6, 3
        args.guard_epochs, args.demo_epochs = 2, 3
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    report: dict = {"threads": args.threads, "quick": args.quick}
    if not args.skip_ranking:
        report["ranking"] = ranking(args)
    if args.guards:
        report["collapse_guards"] = guards(args)
    if args.demo:
        report["demo_macro"] = demo(args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
