"""How well the supernet's shared-weight estimate ranks architectures; prints JSON.

Ground truth: stand-alone training of each cell from scratch, test accuracy (and loss) averaged over seeds,
at a macro small enough that the cells really differ (C=4, 3 layers, 8x8 digits). Its own ceiling is the
mean Kendall tau between single seeds. The estimate is tracked after the DARTS bilevel phase and after
single-path fine-tuning, with and without BatchNorm recalibration.
`--data`, `--train-subset` and the macro flags (`--C`, `--layers`, `--resolution`) run the same machinery on
another dataset at one fixed macro; `--cell-set random` then draws the cells from SearchSpace (plus `--weak`
low-conv cells like the all-pool/skip end of the default spanning set); `--cell-set elastic` draws cells,
resolutions (`--resolutions`), depths and widths from a supernet trained with all three elastic. With `--bilevel-epochs 0` the
supernet is trained single-path only and no derived cell joins the ground truth. The second target,
max(0.4, 0.7 x split-half ceiling), is the one of issue 15 for such a set.
`--guards` also compares the DARTS collapse guards, `--demo` measures the default macro (supernet
training time, best stand-alone test accuracy). `--workers N` / `--scheduler ADDR` train the ground truth
on a Dask cluster (the export's hwnas.export.parallel), seed by seed.

    python benchmarks/ranking.py --quick        # a few minutes
    python benchmarks/ranking.py                # the figures quoted in the README
    python benchmarks/ranking.py --guards --demo --skip-ranking
    # Fashion-MNIST at one fixed macro (benchmarks/results/ranking_fashion.json has the exact command)
    python benchmarks/ranking.py --data fashion-mnist --train-subset 5000 --C 8 --layers 5 --resolution 16 \
        --cell-set random --cells 16 --weak 3 --seeds 4 --gt-epochs 3 --bilevel-epochs 0 --sample-epochs 20 \
        --track-every 0 --gt-cache benchmarks/results/ranking_fashion_gt_cache.json
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

from hwnas.config import DEFAULT_MACRO, MacroConfig, SupernetConfig
from hwnas.data import load_dataset, splits_at
from hwnas.export.parallel import dask_client, train_runs, wants_dask
from hwnas.space.genotype import STEPS, Genotype, SearchSpace
from hwnas.space.network import Network, build_network, count_params
from hwnas.space.ops import GENOTYPE_OPS
from hwnas.train import AccuracyEstimator, evaluate, load_supernet, train_network, train_supernet
from hwnas.train import standalone
from hwnas.train.supernet import param_free_count

SMALL = MacroConfig(C=4, layers=3, in_channels=1, resolution=8, classes=10)
CONV_OPS = [op for op in GENOTYPE_OPS if "conv" in op and op != "skip_connect"]
FREE_OPS = [op for op in GENOTYPE_OPS if op not in CONV_OPS]


def _cells_with_conv_share(p_convs, macro: MacroConfig, seed: int) -> list[Genotype]:
    """One genotype per entry of `p_convs`, each op a conv with that probability (else a pool or skip)."""
    rng = np.random.default_rng(seed)
    cells = []
    for p_conv in p_convs:
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


def spanning_cells(n: int, macro: MacroConfig, seed: int = 1234) -> list[Genotype]:
    """n genotypes whose share of conv ops rises from 0 (all pools/skips) to 1 (all convs)."""
    return _cells_with_conv_share(np.linspace(0.0, 1.0, n), macro, seed)


def random_cells(n: int, weak: int, macro: MacroConfig, seed: int = 1234) -> tuple[list[Genotype], list[str]]:
    """n distinct genotypes: `weak` low-conv ones (conv share 0 .. 0.25, the first all pools/skips) and the rest
    uniform random draws of SearchSpace; returns them with their kind ("weak" or "random")."""
    if not 0 <= weak <= n:
        raise ValueError(f"weak must be in [0, cells], got {weak} of {n}")
    cells = _cells_with_conv_share(np.linspace(0.0, 0.25, weak), macro, seed) if weak else []
    cells = distinct_draws(SearchSpace(macro), np.random.default_rng(seed + 1), n, cells)
    return cells, ["weak"] * weak + ["random"] * (n - weak)


def distinct_draws(space: SearchSpace, rng: np.random.Generator, n: int, start: list[Genotype] = ()) -> list[Genotype]:
    """`start` followed by uniform draws of `space` with new arch_ids until there are n."""
    start = list(start)
    return start + space.sample_distinct(rng, n - len(start), exclude={g.arch_id for g in start})


def elastic_cells(n: int, macro: MacroConfig, resolutions: list[int], seed: int = 1234) -> list[Genotype]:
    """n distinct uniform draws of the elastic space: cells, input resolution, depth and width."""
    return distinct_draws(SearchSpace(macro, resolutions, depth=True, width=True), np.random.default_rng(seed + 2), n)


def flops(genotype: Genotype) -> float:
    """Forward FLOPs of one batch-1 inference (torch's FlopCounterMode, as in benchmarks/predictor.py)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = genotype.macro
    net = Network(genotype).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, m.in_channels, m.resolution, m.resolution))
    return float(counter.get_total_flops())


def macro_from_args(args: argparse.Namespace) -> MacroConfig:
    """The fixed macro of the ranking: SMALL with --C / --layers / --resolution where given."""
    return replace(SMALL, **{k: getattr(args, k) for k in ("C", "layers", "resolution") if getattr(args, k) is not None})


def train_and_score(g: Genotype, data, epochs: int, seed: int) -> tuple[float, float]:
    """Stand-alone test accuracy and loss of one training, reusing train_network's own test pass for the loss.

    train_network evaluates the test split once; listening to hwnas.train.standalone.evaluate for that call
    saves a second pass over it (seconds per run on 10 000 test images). Should train_network stop calling
    it, the loss is computed by a separate evaluate as before; the numbers are identical either way.
    """
    seen: list[tuple[float, float]] = []
    original = standalone.evaluate

    def listening(model, dataset, *a, **kw):
        result = original(model, dataset, *a, **kw)
        if dataset is data.test:
            seen.append(result)
        return result

    standalone.evaluate = listening
    try:
        net, test_acc = train_network(g, data, epochs, seed=seed)
    finally:
        standalone.evaluate = original
    loss = seen[-1][1] if seen and seen[-1][0] == test_acc else evaluate(net, data.test)[1]
    return test_acc, loss


def rank_stats(estimate: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Kendall tau and Spearman rho between two score vectors (higher = better for both)."""
    return {"kendall": float(kendalltau(estimate, truth)[0]), "spearman": float(spearmanr(estimate, truth)[0])}


def cpu_seconds() -> float:
    """CPU time of this process (user + system), robust to other jobs sharing the cores."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def seed_scores(cells: list[Genotype], data, epochs: int, seed: int,
                client=None) -> Iterator[tuple[Genotype, tuple[float, float]]]:
    """(cell, (test accuracy, test loss)) of one stand-alone training per cell, here or on a Dask `client`.

    In process each result comes as soon as it is trained. On Dask the seed's runs go out together (through
    the export's hwnas.export.parallel.train_runs) and the loss is the trained network's test pass here.
    """
    if client is None:
        for g in cells:
            yield g, train_and_score(g, splits_at(data, g.macro.resolution), epochs, seed)
        return
    results = train_runs([(g, seed) for g in cells], lambda g: splits_at(data, g.macro.resolution), epochs,
                         train_network, client)
    for g in cells:
        found = results[(g.arch_id, seed)]
        if isinstance(found, Exception):
            raise found
        net, test_acc = found
        yield g, (test_acc, evaluate(net, splits_at(data, g.macro.resolution).test)[1])


def ground_truth(cells: list[Genotype], data, epochs: int, seeds: int, cache: Path | None = None,
                 tag: str = "", workers: int = 0, scheduler: str | None = None) -> dict:
    """Stand-alone test accuracy/loss per cell and seed, their means and the seed-to-seed ceiling.

    `cache` (JSON) keeps finished trainings keyed by arch_id, seed and epochs, so a rerun of the benchmark
    only trains what it has not trained before (the results are deterministic for a given key).
    The trainings run seed by seed over all cells, so an interrupted run leaves whole seeds in the cache.
    `tag` is appended to the keys (the dataset and training-set size of a non-default run), so runs on
    different data or subsets do not collide; the default digits run keeps its historical keys.
    `workers` > 1 (a Dask LocalCluster) or a Dask `scheduler` address trains each seed's runs on that cluster.
    """
    store = json.loads(cache.read_text()) if cache is not None and cache.exists() else {"schema_version": 1, "runs": {}}
    acc = np.zeros((len(cells), seeds))
    loss = np.zeros((len(cells), seeds))

    def key(g: Genotype, s: int) -> str:
        return f"{g.arch_id}:seed{s}:epochs{epochs}:test{len(splits_at(data, g.macro.resolution).test)}{tag}"

    missing = any(key(g, s) not in store["runs"] for s in range(seeds) for g in cells)
    on_dask = missing and wants_dask(workers, scheduler)
    with dask_client(workers, scheduler) if on_dask else contextlib.nullcontext() as client:
        for s in range(seeds):
            t0 = time.perf_counter()
            todo = [g for g in cells if key(g, s) not in store["runs"]]
            for g, (test_acc, test_loss) in seed_scores(todo, data, epochs, s, client):
                store["runs"][key(g, s)] = {"acc": test_acc, "loss": test_loss}
                if cache is not None:
                    cache.write_text(json.dumps(store, indent=1) + "\n")
            for i, g in enumerate(cells):
                acc[i, s], loss[i, s] = store["runs"][key(g, s)]["acc"], store["runs"][key(g, s)]["loss"]
            logging.info("ground truth seed %d/%d (%.0f s): acc %s", s + 1, seeds, time.perf_counter() - t0,
                         np.round(acc[:, s], 4).tolist())
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
    """Estimate-vs-ground-truth ranking at one fixed macro, per training phase and BN treatment."""
    macro = macro_from_args(args)
    base = load_dataset(args.data, macro.resolution, seed=0, train_subset=args.train_subset)
    macro = replace(macro, in_channels=base.in_channels, classes=base.num_classes)
    elastic = args.cell_set == "elastic"
    extra = sorted(set(args.resolutions) - {macro.resolution}) if elastic else []
    # Same splits at every resolution (load_dataset resizes one deterministic split).
    data = {macro.resolution: base, **{r: load_dataset(args.data, r, seed=0, train_subset=args.train_subset)
                                       for r in extra}} if elastic else base
    if args.cell_set == "spanning":
        cells, kinds = spanning_cells(args.cells, macro), ["spanning"] * args.cells
    elif elastic:
        cells, kinds = elastic_cells(args.cells, macro, [macro.resolution, *extra]), ["elastic"] * args.cells
    else:
        cells, kinds = random_cells(args.cells, args.weak, macro)
    tag = "" if args.data == "digits" and not args.train_subset else f":{args.data}:train{len(base.train)}"
    cfg = SupernetConfig(data=args.data, macro=macro, epochs=args.bilevel_epochs, sample_epochs=args.sample_epochs,
                         sampling=args.sampling, seed=0, train_subset=args.train_subset, resolutions=tuple(extra),
                         elastic_depth=elastic, elastic_width=elastic, sandwich=args.sandwich, distill=args.distill)
    last = cfg.epochs + cfg.sample_epochs
    track = {last} | ({cfg.epochs} if cfg.epochs else set())
    if args.track_every > 0:
        track |= set(range(max(cfg.epochs, 1), last + 1, args.track_every))

    # Without a bilevel phase there is no derived cell to add, so the ground truth can come first (cached
    # seed by seed: an interrupted run keeps it).
    gt_wall = 0.0
    if cfg.epochs == 0:
        t0 = time.perf_counter()
        ground_truth(cells, data, args.gt_epochs, args.seeds, args.gt_cache, tag, args.workers, args.scheduler)
        gt_wall += time.perf_counter() - t0

    snapshots: dict[int, dict] = {}
    # Few-shot: one supernet per input resolution (each keeps elastic depth and width), every cell
    # estimated by the supernet of its own resolution.
    if args.few_shot:
        groups = [(replace(cfg, macro=replace(macro, resolution=r), resolutions=()),
                   [i for i, g in enumerate(cells) if g.macro.resolution == r]) for r in (macro.resolution, *extra)]
    else:
        groups = [(cfg, list(range(len(cells))))]

    def on_epoch_for(members: list[int]):
        def on_epoch(epoch: int, supernet) -> None:
            if epoch not in track:
                return
            t1 = time.perf_counter()
            g = supernet.derive()
            rows = members + ([len(cells)] if cfg.epochs else [])  # the derived cell, when there is one, comes last
            genos = [cells[i] for i in members] + ([g] if cfg.epochs else [])
            snap = snapshots.setdefault(epoch, {"derived": g, "estimate_wall_s": 0.0})
            splits = splits_at(data, supernet.macro.resolution) if args.few_shot else data
            for bn in ("recal", "no_recal"):
                est = AccuracyEstimator(supernet, splits, recalibrate_bn=bn == "recal")
                for name, values in (("error", est.error(genos)), ("loss", est.loss(genos))):
                    # Negated so that, like the ground truth, higher is better.
                    column = snap.setdefault(f"{name}_{bn}", np.zeros(len(cells) + bool(cfg.epochs)))
                    column[rows] = -values
            snap["estimate_wall_s"] += time.perf_counter() - t1
            logging.info("estimates after epoch %d (%.0f s): acc %s", epoch, time.perf_counter() - t1,
                         np.round(snap["error_recal"] + 1, 4).tolist())
        return on_epoch

    t0, c0 = time.perf_counter(), cpu_seconds()
    for group_cfg, members in groups:
        with tempfile.TemporaryDirectory() as tmp:
            train_supernet(group_cfg, Path(tmp) / "sn", epoch_callback=on_epoch_for(members))
    supernet_wall, supernet_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    estimate_wall = sum(snap["estimate_wall_s"] for snap in snapshots.values())
    derived = snapshots[last]["derived"] if cfg.epochs else None
    all_cells = cells + [derived] if derived is not None else list(cells)
    t0 = time.perf_counter()
    gt = ground_truth(all_cells, data, args.gt_epochs, args.seeds, args.gt_cache, tag, args.workers, args.scheduler)
    gt_wall += time.perf_counter() - t0
    truth_acc, truth_loss = gt["acc"].mean(1), -gt["loss"].mean(1)

    def stats_at(epoch: int) -> dict:
        snap = snapshots[epoch]
        out = {}
        for bn in ("recal", "no_recal"):
            est_err, est_loss = snap[f"error_{bn}"].copy(), snap[f"loss_{bn}"].copy()
            ta, tl = truth_acc, truth_loss
            if derived is not None and snap["derived"].arch_id != derived.arch_id:
                # the derived cell is the final one in the truth; this snapshot's own derived cell is not
                est_err, est_loss = est_err[:-1], est_loss[:-1]
                ta, tl = truth_acc[:-1], truth_loss[:-1]
            out[bn] = {
                "acc_vs_acc": rank_stats(est_err, ta),
                "loss_vs_loss": rank_stats(est_loss, tl),
                "loss_vs_acc": rank_stats(est_loss, ta),
            }
        return out

    phases = {f"epoch_{e}": stats_at(e) for e in sorted(snapshots)}
    final = phases[f"epoch_{last}"]["recal"]["acc_vs_acc"]
    ceiling = gt["ceiling_kendall"]["accuracy"]
    split_half = gt["split_half_kendall"]["accuracy"]
    params = np.array([count_params(build_network(g)) for g in all_cells], float)
    fl = np.array([flops(g) for g in all_cells])
    estimated_acc = snapshots[last]["error_recal"] + 1
    ablation = {
        "finetuned_no_recal": phases[f"epoch_{last}"]["no_recal"]["acc_vs_acc"],
        "finetuned_recal": final,
    }
    if cfg.epochs:
        darts_only = phases[f"epoch_{cfg.epochs}"]
        ablation = {"darts_only_no_recal": darts_only["no_recal"]["acc_vs_acc"],
                    "darts_only_recal": darts_only["recal"]["acc_vs_acc"], **ablation}
    split_target = max(0.4, 0.7 * split_half) if split_half is not None else None
    params_tau = rank_stats(params, truth_acc)["kendall"]
    elastic_target = max(0.6, params_tau + 0.15)
    return {
        "data": args.data,
        "train_subset": args.train_subset,
        "train_images": len(base.train),
        "macro": macro.to_dict(),
        "cell_set": args.cell_set,
        "few_shot": args.few_shot,
        "cells": len(all_cells),
        "seeds": args.seeds,
        "gt_epochs": args.gt_epochs,
        "supernet_config": {k: v for k, v in cfg.to_dict().items() if k != "macro"},
        "ground_truth": {
            "test_images": len(base.test),
            "mean_test_acc_per_cell": np.round(truth_acc, 4).tolist(),
            "acc_range": [float(truth_acc.min()), float(truth_acc.max())],
            "ceiling_kendall_between_seeds": gt["ceiling_kendall"],
            "split_half_kendall": gt["split_half_kendall"],
            # more parameters (FLOPs) = higher score: the simplest rivals to the supernet estimate
            "params_proxy": rank_stats(params, truth_acc),
            "flops_proxy": rank_stats(fl, truth_acc),
            "derived_genotype_rank": int((truth_acc > truth_acc[-1]).sum()) + 1 if derived is not None else None,
        },
        "estimate_final": final,
        "estimate_final_by_bn": {bn: phases[f"epoch_{last}"][bn]["acc_vs_acc"] for bn in ("recal", "no_recal")},
        "target": {"kendall_min": max(0.35, 0.7 * ceiling), "met": final["kendall"] >= max(0.35, 0.7 * ceiling),
                   "rule": "max(0.35, 0.7 x single-seed ceiling)"},
        # issue 15: tau >= max(0.4, 0.7 x split-half ceiling)
        "target_split_half": {"kendall_min": split_target, "met": final["kendall"] >= split_target if split_target else None,
                              "rule": "max(0.4, 0.7 x split-half ceiling)"},
        # issue 15, elastic set: tau >= 0.6 and >= the parameter count's tau + 0.15
        "target_elastic": ({"kendall_min": elastic_target, "met": final["kendall"] >= elastic_target,
                            "rule": "max(0.6, parameter-count tau + 0.15)"} if elastic else None),
        "ablation": ablation,
        "per_epoch": phases,
        "derived": ({"after_bilevel": snapshots[cfg.epochs]["derived"].to_dict(),
                     "param_free_normal": param_free_count(snapshots[cfg.epochs]["derived"])} if cfg.epochs else None),
        "estimated_acc_final": np.round(estimated_acc, 4).tolist(),
        "per_cell": [
            {"arch_id": g.arch_id, "kind": kind, "params": int(params[i]), "flops": fl[i],
             "param_free_normal": param_free_count(g), "param_free_reduce": param_free_count(g, "reduce"),
             "test_acc_per_seed": np.round(gt["acc"][i], 4).tolist(), "test_acc_mean": round(float(truth_acc[i]), 4),
             "estimated_acc": round(float(estimated_acc[i]), 4), "resolution": g.macro.resolution,
             "depth": list(g.stage_depth), "width": list(g.stage_width), "genotype": g.to_dict()}
            for i, (g, kind) in enumerate(zip(all_cells, kinds + ["derived"] * (derived is not None)))
        ],
        "time_s": {"supernet_wall": supernet_wall - estimate_wall, "supernet_cpu": supernet_cpu,
                   "estimate_wall": estimate_wall, "ground_truth_wall": gt_wall},
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
    p.add_argument("--data", default="digits", help="dataset spec hwnas.data accepts (digits, fashion-mnist, idx:DIR, ...)")
    p.add_argument("--train-subset", type=int, default=0, help="> 0: stratified subset of the training images")
    p.add_argument("--C", type=int, help=f"macro channels (default {SMALL.C})")
    p.add_argument("--layers", type=int, help=f"macro cells (default {SMALL.layers})")
    p.add_argument("--resolution", type=int, help=f"input resolution in px (default {SMALL.resolution})")
    p.add_argument("--cell-set", choices=("spanning", "random", "elastic"), default="spanning",
                   help="spanning: conv share 0..1; random: SearchSpace draws plus --weak low-conv cells; elastic: "
                        "draws of cells, resolution (--resolutions), depth and width, from a supernet trained elastic")
    p.add_argument("--resolutions", type=int, nargs="*", default=[],
                   help="--cell-set elastic: input resolutions besides --resolution")
    p.add_argument("--weak", type=int, default=3, help="--cell-set random: how many low-conv (pool/skip) cells")
    p.add_argument("--cells", type=int, default=16)
    p.add_argument("--seeds", type=int, default=8, help="stand-alone seeds per cell (3 seeds overstate the ceiling)")
    p.add_argument("--gt-epochs", type=int, default=10)
    p.add_argument("--bilevel-epochs", type=int, default=4)
    p.add_argument("--sample-epochs", type=int, default=60)
    p.add_argument("--sampling", default="uniform")
    p.add_argument("--sandwich", action="store_true", help="supernet steps also train the largest and smallest sub-network")
    p.add_argument("--distill", action="store_true", help="with --sandwich: in-place distillation from the largest")
    p.add_argument("--few-shot", action="store_true",
                   help="--cell-set elastic: one supernet per input resolution (each --sample-epochs long)")
    p.add_argument("--track-every", type=int, default=10, help="estimate every N epochs too (0: final epoch only)")
    p.add_argument("--guard-epochs", type=int, default=8)
    p.add_argument("--demo-epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the cores are shared)")
    p.add_argument("--skip-ranking", action="store_true")
    p.add_argument("--guards", action="store_true", help="compare the DARTS collapse guards")
    p.add_argument("--demo", action="store_true", help="default macro: supernet time and best stand-alone accuracy")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--gt-cache", type=Path, help="JSON file reusing stand-alone results across runs")
    p.add_argument("--workers", type=int, default=0,
                   help="> 1: train the ground truth on a Dask LocalCluster of N one-thread processes")
    p.add_argument("--scheduler", default=None, help="train the ground truth on the Dask scheduler at this address")
    args = p.parse_args(argv)
    if args.quick:
        args.cells, args.seeds, args.gt_epochs = 8, 2, 4
        args.bilevel_epochs, args.sample_epochs, args.track_every = 2, 6, 3
        args.guard_epochs, args.demo_epochs = 2, 3
    if args.few_shot and (args.cell_set != "elastic" or args.bilevel_epochs):
        p.error("--few-shot needs --cell-set elastic and --bilevel-epochs 0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    report: dict = {"argv": ["python", "benchmarks/ranking.py", *(sys.argv[1:] if argv is None else argv)],
                    "threads": args.threads, "quick": args.quick}
    t_start = time.perf_counter()
    if not args.skip_ranking:
        report["ranking"] = ranking(args)
    if args.guards:
        report["collapse_guards"] = guards(args)
    if args.demo:
        report["demo_macro"] = demo(args)
    report["wall_s"] = time.perf_counter() - t_start
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
