"""Stand-alone training step of a discrete Network: eager PyTorch vs the fast training modes, side by side.

    PYTHONPATH=. python3 benchmarks/train_speed.py [--rounds 5] [--batch 128] [--C 16] [--layers 5]
        [--resolution 28] [--arch-seed 0] [--threads N] [--out benchmarks/results/train_speed.json]

One step = forward + cross-entropy + backward + SGD (momentum) step, as hwnas.train.standalone does it.
Copies of the same network with identical weights train on the same batch, one per mode of
hwnas.train.fast_ops (eager, compiled, channels_last, fused); the steps are timed round-robin so load
drift hits all alike, and medians are reported. `ratio_<mode>` > 1 means that mode's step is faster than
eager. On a shared machine other processes' load can stretch single steps many times over (two torch
threads on two busy cores wait for each other at every parallel region), so the fastest step of each
mode is reported too (`best_step_s`, `best_ratio_<mode>`): the closest estimate of the unloaded time.
The first step's losses and gradients are compared too (`agreement`): the modes compute the same function.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hwnas.config import MacroConfig
from hwnas.space import SearchSpace
from hwnas.space.network import Network
from hwnas.train.fast_ops import MODES, available, fast_training

SCHEMA_VERSION = 2  # 2: best_step_s and best_ratio_<mode>


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_step(net: Network, x: torch.Tensor, y: torch.Tensor):
    """One SGD training step of `net` on (x, y); returns the loss."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=3e-4)

    def step() -> float:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def first_step_agreement(eager: Network, fast: Network, mode: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """|loss difference| and max |gradient difference| relative to the largest gradient, one forward/backward."""
    a, b = copy.deepcopy(eager), copy.deepcopy(fast)
    la = F.cross_entropy(a(x), y)
    la.backward()
    with fast_training(b, mode):
        lb = F.cross_entropy(b(x), y)
        lb.backward()
    grad_diff = max(float((pa.grad - pb.grad).abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))
    grad_max = max(float(pa.grad.abs().max()) for pa in a.parameters())
    return {"loss_diff": abs(float(la.detach()) - float(lb.detach())), "max_grad_diff_rel": grad_diff / grad_max}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--C", type=int, default=16)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--resolution", type=int, default=28)
    p.add_argument("--arch-seed", type=int, default=0, help="seed of the random genotype")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not available():
        raise SystemExit("hwnas._C is not built: the compiled mode would be eager (build the extension first)")

    macro = MacroConfig(C=args.C, layers=args.layers, in_channels=1, resolution=args.resolution, classes=10)
    genotype = SearchSpace(macro).sample(np.random.default_rng(args.arch_seed))
    torch.manual_seed(0)
    eager = Network(genotype).train()
    nets = {mode: copy.deepcopy(eager) for mode in MODES}
    x = torch.randn(args.batch, 1, args.resolution, args.resolution)
    y = torch.randint(0, 10, (args.batch,))
    agreement = {m: first_step_agreement(eager, nets[m], m, x, y) for m in MODES if m != "eager"}

    steps = {m: make_step(net, x, y) for m, net in nets.items()}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    with contextlib.ExitStack() as stack:
        for m, net in nets.items():
            stack.enter_context(fast_training(net, m))
        for step in steps.values():  # warm-up (allocator, oneDNN primitive cache)
            step()
        for _ in range(args.rounds):
            for m, step in steps.items():
                start = time.perf_counter()
                step()
                times[m].append(time.perf_counter() - start)
    med = {m: statistics.median(v) for m, v in times.items()}
    best = {m: min(v) for m, v in times.items()}
    result = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "standalone training step (forward + backward + SGD)",
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "macro": macro.to_dict(),
        "batch": args.batch,
        "arch_id": genotype.arch_id,
        "normal": [f"{op}@{inp}" for op, inp in genotype.normal],
        "reduce": [f"{op}@{inp}" for op, inp in genotype.reduce],
        "rounds": args.rounds,
        "step_s": {m: round(v, 4) for m, v in med.items()},
        **{f"ratio_{m}": round(med["eager"] / med[m], 3) for m in MODES if m != "eager"},
        "best_step_s": {m: round(v, 4) for m, v in best.items()},
        **{f"best_ratio_{m}": round(best["eager"] / best[m], 3) for m in MODES if m != "eager"},
        "images_per_s": {m: round(args.batch / v, 1) for m, v in med.items()},
        "all_times_s": {m: [round(t, 4) for t in v] for m, v in times.items()},
        "agreement": {m: {k: float(f"{v:.3g}") for k, v in a.items()} for m, a in agreement.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
