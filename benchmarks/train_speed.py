"""Stand-alone training step of a discrete Network: eager PyTorch vs the compiled kernels, side by side.

    PYTHONPATH=. python3 benchmarks/train_speed.py [--rounds 5] [--batch 128] [--C 16] [--layers 5]
        [--resolution 28] [--arch-seed 0] [--threads N] [--out benchmarks/results/train_speed.json]

One step = forward + cross-entropy + backward + SGD (momentum) step, as hwnas.train.standalone does it.
Two copies of the same network with identical weights train on the same batch; the steps are timed
round-robin (eager, compiled, eager, ...) so load drift hits both alike, and medians are reported.
`ratio` > 1 means the compiled training step is faster. The first step's losses and gradients are
compared too (`max_grad_diff`): the two paths compute the same function.
"""
from __future__ import annotations

import argparse
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
from hwnas.train.fast_ops import available, compiled_training

SCHEMA_VERSION = 1


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
        return float(loss)

    return step


def first_step_agreement(eager: Network, fast: Network, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """|loss difference| and max |gradient difference| of one forward/backward on copies of both nets."""
    a, b = copy.deepcopy(eager), copy.deepcopy(fast)
    la = F.cross_entropy(a(x), y)
    la.backward()
    with compiled_training(b):
        lb = F.cross_entropy(b(x), y)
        lb.backward()
    grad_diff = max(float((pa.grad - pb.grad).abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))
    return {"loss_diff": abs(float(la.detach()) - float(lb.detach())), "max_grad_diff": grad_diff}


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
        raise SystemExit("hwnas._C is not built: nothing to compare (build the extension first)")

    macro = MacroConfig(C=args.C, layers=args.layers, in_channels=1, resolution=args.resolution, classes=10)
    genotype = SearchSpace(macro).sample(np.random.default_rng(args.arch_seed))
    torch.manual_seed(0)
    eager = Network(genotype).train()
    fast = copy.deepcopy(eager)
    x = torch.randn(args.batch, 1, args.resolution, args.resolution)
    y = torch.randint(0, 10, (args.batch,))
    agreement = first_step_agreement(eager, fast, x, y)

    steps = {"eager": make_step(eager, x, y), "compiled": make_step(fast, x, y)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    with compiled_training(fast):
        for name, step in steps.items():  # warm-up (allocator, oneDNN primitive cache)
            step()
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "standalone training step (forward + backward + SGD)",
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "macro": macro.to_dict(),
        "batch": args.batch,
        "genotype": genotype.to_dict(),
        "rounds": args.rounds,
        "eager_step_s": round(med["eager"], 4),
        "compiled_step_s": round(med["compiled"], 4),
        "ratio": round(med["eager"] / med["compiled"], 3),
        "eager_images_per_s": round(args.batch / med["eager"], 1),
        "compiled_images_per_s": round(args.batch / med["compiled"], 1),
        "all_times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        **{k: float(f"{v:.3g}") for k, v in agreement.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
