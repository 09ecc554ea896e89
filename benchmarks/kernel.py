"""Compiled MixedOp kernels vs eager PyTorch DARTS (and torch.compile): side by side, interleaved, medians.

    python benchmarks/kernel.py [--device cpu|cuda] [--rounds 5] [--out benchmarks/results/kernel_<device>.json]

Eager baseline = the original DARTS MixedOp, `sum(w * op(x) for w, op in zip(weights, ops))`, on the
same supernet weights. Ratios > 1 mean the compiled backend is faster (or, for memory, smaller).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import signal
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from hwnas.config import MacroConfig
from hwnas.kernels import available_backends
from hwnas.space import Supernet
from hwnas.space.supernet import MixedOp

SCHEMA_VERSION = 1


def darts_forward(self: MixedOp, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MixedOp.forward as the original DARTS code writes it."""
    return sum(w * op(x) for w, op in zip(weights, self.ops))


def make_models(macro: MacroConfig, device: str) -> tuple[Supernet, Supernet]:
    """(compiled-backend supernet, eager DARTS supernet) with identical weights."""
    fast = Supernet(macro).to(device)
    eager = copy.deepcopy(fast)
    for m in eager.modules():
        if isinstance(m, MixedOp):
            m.forward = types.MethodType(darts_forward, m)
    fast.set_backend(device)
    return fast, eager


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: str, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


class Timeout(Exception):
    pass


def time_boxed(fn: Callable[[], object], seconds: int) -> bool:
    """Run fn (e.g. a torch.compile warm-up) with a wall-clock limit; False when it did not finish."""
    fired = []

    def handler(signum, frame):
        fired.append(True)
        raise Timeout()

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        fn()
        return True
    except Exception:  # torch.compile wraps our Timeout in its own exception types
        if fired:
            return False
        raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def train_step(net: Supernet, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One SGD-style step minus the update: forward, cross-entropy, backward into weights and alphas."""
    def step() -> None:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    return step


def _rss_child(kind: str, batch: int, threads: int, queue) -> None:
    """In a fresh process: peak RSS growth (bytes) over one training step of the `kind` model."""
    import psutil

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    macro = MacroConfig(C=16, layers=8, in_channels=3, resolution=32, classes=10)
    fast, eager = make_models(macro, "cpu")
    net = fast if kind == "fast" else eager
    del fast, eager
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    base = psutil.Process().memory_info().rss
    train_step(net, x, y)()
    # VmHWM belongs to this process image (ru_maxrss would inherit the parent's peak across exec)
    with open("/proc/self/status") as f:
        hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    queue.put(hwm_kb * 1024 - base)


def peak_memory_bytes(kind: str, step: Callable[[], None], device: str, batch: int, threads: int) -> int:
    """Peak memory of one training step: CUDA allocator peak, or on CPU peak RSS growth in a fresh process."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_rss_child, args=(kind, batch, threads, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return int(value)


# ------------------------------------------------------------------------------------------------
# Parts: the fused combine and the depthwise branches, each against its eager equivalent


def combine_part(n: int, c: int, hw: int, device: str):
    """(fast fwd+bwd, eager fwd+bwd, fast fwd, eager fwd) for one stride-1 edge's combine."""
    m = MixedOp(c, 1).to(device).train()
    x = torch.randn(n, c, hw, hw, device=device, requires_grad=True)
    w = torch.softmax(torch.randn(8, device=device), 0).requires_grad_()
    branches = [torch.randn(n, c, hw, hw, device=device, requires_grad=True) for _ in range(4)]
    bn_max, bn_avg = m.ops[1][1], m.ops[2][1]
    g = torch.randn(n, c, hw, hw, device=device)

    def fast_fwd():
        out, stats = torch.ops.hwnas.combine(x, w, branches, None, 0b11111110, 1, True, 1e-5)
        with torch.no_grad():  # the running-stat update the backend does per edge
            for bn, k in ((bn_max, 0), (bn_avg, 2)):
                bn.running_mean.mul_(0.9).add_(stats[k], alpha=0.1)
                bn.running_var.mul_(0.9).add_(stats[k + 1], alpha=0.1)
        return out

    def eager_fwd():
        outs = [m.ops[0](x), m.ops[1](x), m.ops[2](x), m.ops[3](x), *branches]
        return sum(wk * o for wk, o in zip(w, outs))

    def fwd_bwd(f):
        def run():
            f().backward(g)
        return run

    def no_grad(f):
        def run():
            with torch.no_grad():
                f()
        return run

    return fwd_bwd(fast_fwd), fwd_bwd(eager_fwd), no_grad(fast_fwd), no_grad(eager_fwd)


def depthwise_part(n: int, c: int, hw: int, device: str):
    """(fast, eager) fwd+bwd of the six depthwise convs of one stride-1 edge (ReLU included)."""
    x = torch.randn(n, c, hw, hw, device=device, requires_grad=True)
    # (kernel, dilation) of sep3 first/second, sep5 first/second, dil3, dil5
    convs = [(3, 1), (3, 1), (5, 1), (5, 1), (3, 2), (5, 2)]
    ws = [torch.randn(c, 1, k, k, device=device, requires_grad=True) for k, _ in convs]
    g = torch.randn(n, c, hw, hw, device=device)

    def fast():
        outs = [torch.ops.hwnas.dwconv(x, w, 1, d, True) for (k, d), w in zip(convs, ws)]
        torch.autograd.backward(outs, [g] * len(outs))

    def eager():
        r = F.relu(x)
        outs = [F.conv2d(r, w, None, 1, d * (k - 1) // 2, d, c) for (k, d), w in zip(convs, ws)]
        torch.autograd.backward(outs, [g] * len(outs))

    return fast, eager


def copy_bandwidth(numel: int, rounds: int = 20) -> float:
    """Measured device copy bandwidth (bytes/s, read + write)."""
    a = torch.empty(numel, device="cuda")
    b = torch.empty_like(a)
    t = interleaved({"copy": lambda: b.copy_(a)}, rounds, "cuda", warmup=3)["copy"]
    return 2 * a.numel() * a.element_size() / t


# ------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: this torch ({torch.__version__}) sees no CUDA GPU; run on a GPU machine "
                         "with a CUDA build of torch and of hwnas._C")
    if device not in available_backends():
        raise SystemExit(f"--device {device}: the compiled {device} backend is not built here "
                         f"(available: {available_backends()}); build hwnas._C with {device.upper()} first")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.batch or (32 if device == "cpu" else 64)
    macro = MacroConfig(C=16, layers=8, in_channels=3, resolution=32, classes=10)
    results: dict = {
        "schema_version": SCHEMA_VERSION,
        "device": device,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads() if device == "cpu" else None,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        },
        "config": {"batch": n, "macro": macro.to_dict(), "rounds": args.rounds, "part_rounds": args.part_rounds},
        "note": "ratios = eager time / compiled time (higher is better), medians of interleaved rounds",
    }

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    sections = set(args.sections.split(","))
    if "parts" in sections:
        run_parts(results, n, macro, device, args, log)
    fast, eager = make_models(macro, device)
    x = torch.randn(n, macro.in_channels, macro.resolution, macro.resolution, device=device)
    y = torch.randint(0, macro.classes, (n,), device=device)
    steps = {"fast": train_step(fast, x, y), "eager": train_step(eager, x, y)}
    if "step" in sections:
        run_step(results, steps, eager, x, y, device, args, log)
    if "memory" in sections:
        log("peak memory ...")
        mem = {k: peak_memory_bytes(k, steps[k], device, n, args.threads) for k in ("fast", "eager")}
        results["train_step_peak_memory"] = {
            "fast_mb": mem["fast"] / 2**20,
            "eager_mb": mem["eager"] / 2**20,
            "ratio": mem["eager"] / max(mem["fast"], 1),
            "method": "torch.cuda.max_memory_allocated" if device == "cuda"
            else "peak RSS growth (VmHWM - RSS before) over one step in a fresh process per model",
        }
        log(json.dumps(results["train_step_peak_memory"]))
    if device == "cuda" and "bandwidth" in sections:
        run_bandwidth(results, device, args)
    return results


def run_parts(results: dict, n: int, macro: MacroConfig, device: str, args, log) -> None:
    """Combine and depthwise parts alone, each against its eager equivalent."""
    log("combine part ...")
    f_fb, e_fb, f_f, e_f = combine_part(n, macro.C, macro.resolution, device)
    # the parts take milliseconds: many rounds and a few warm-up calls (allocator, page faults) steady the medians
    t = interleaved({"fast": f_fb, "eager": e_fb}, args.part_rounds, device, warmup=5)
    tf = interleaved({"fast": f_f, "eager": e_f}, args.part_rounds, device, warmup=5)
    results["combine_fwd_bwd"] = {"fast_ms": 1e3 * t["fast"], "eager_ms": 1e3 * t["eager"], "ratio": t["eager"] / t["fast"]}
    results["combine_fwd"] = {"fast_ms": 1e3 * tf["fast"], "eager_ms": 1e3 * tf["eager"], "ratio": tf["eager"] / tf["fast"]}
    log(json.dumps(results["combine_fwd_bwd"]))
    log("depthwise part ...")
    f_dw, e_dw = depthwise_part(n, macro.C, macro.resolution, device)
    t = interleaved({"fast": f_dw, "eager": e_dw}, max(1, args.part_rounds // 2), device, warmup=3)
    results["depthwise_fwd_bwd"] = {"fast_ms": 1e3 * t["fast"], "eager_ms": 1e3 * t["eager"], "ratio": t["eager"] / t["fast"]}
    log(json.dumps(results["depthwise_fwd_bwd"]))


def run_step(results: dict, steps: dict, eager: Supernet, x, y, device: str, args, log) -> None:
    """The supernet training step: compiled backend vs eager (+ CUDA graph, + torch.compile time-boxed)."""
    if device == "cuda" and not args.no_graph:
        steps["eager_cuda_graph"] = cuda_graph_step(eager, x, y)
    log("training step ...")
    t = interleaved(steps, args.rounds, device)
    step = {f"{k}_ms": 1e3 * v for k, v in t.items()}
    step["ratio_vs_eager"] = t["eager"] / t["fast"]
    if "eager_cuda_graph" in t:
        step["ratio_vs_eager_cuda_graph"] = t["eager_cuda_graph"] / t["fast"]
    log(json.dumps(step))
    # torch.compile of the eager step, time-boxed
    if args.compile_timeout > 0:
        compiled_eager = copy.deepcopy(eager)
        compiled_eager.forward = torch.compile(compiled_eager.forward)
        cstep = train_step(compiled_eager, x, y)
        t0 = time.perf_counter()
        ok = time_boxed(lambda: (cstep(), cstep()), args.compile_timeout)
        step["torch_compile_warmup_s"] = time.perf_counter() - t0
        if ok:
            t = interleaved({"fast": steps["fast"], "compiled": cstep}, args.rounds, device, warmup=0)
            step["torch_compile_ms"] = 1e3 * t["compiled"]
            step["ratio_vs_torch_compile"] = t["compiled"] / t["fast"]
        else:
            step["torch_compile"] = f"did not finish within {args.compile_timeout} s"
        log(json.dumps(step))
    results["train_step"] = step


def run_bandwidth(results: dict, device: str, args) -> None:
    """CUDA: the combine forward at N=256, C=64, 32x32 as a fraction of measured copy bandwidth."""
    big_n, big_c = 256, 64
    _, _, f_f, _ = combine_part(big_n, big_c, 32, device)
    tb = interleaved({"fast": f_f}, args.rounds * 4, device, warmup=3)["fast"]
    elem = big_n * big_c * 32 * 32 * 4
    moved = elem * (1 + 4 + 1)  # read x and 4 branches, write out (pool passes hit cache)
    bw = copy_bandwidth(big_n * big_c * 32 * 32)
    results["combine_bandwidth"] = {
        "shape": [big_n, big_c, 32, 32],
        "achieved_gbs": moved / tb / 1e9,
        "copy_gbs": bw / 1e9,
        "fraction_of_copy": moved / tb / bw,
    }


def cuda_graph_step(net: Supernet, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The eager step captured once in a CUDA graph and replayed (static input, grads accumulate in place)."""
    net = copy.deepcopy(net)
    params = list(net.parameters())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            for p in params:
                p.grad = None
            F.cross_entropy(net(x), y).backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    for p in params:
        p.grad = None
    with torch.cuda.graph(graph):
        F.cross_entropy(net(x), y).backward()
    return graph.replay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds for the training step")
    parser.add_argument("--part-rounds", type=int, default=100,
                        help="interleaved rounds for the combine and depthwise parts (milliseconds each)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=0, help="batch size (default 32 on CPU, 64 on CUDA)")
    parser.add_argument("--compile-timeout", type=int, default=240, help="seconds for torch.compile; 0 skips it")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph eager baseline")
    parser.add_argument(
        "--sections", default="parts,step,memory,bandwidth",
        help="comma list of parts,step,memory,bandwidth; a subset updates those entries of an existing --out file",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = run(args)
    out = args.out or Path(__file__).parent / "results" / f"kernel_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and args.sections != parser.get_default("sections"):
        old = json.loads(out.read_text())
        results = {**old, **{k: v for k, v in results.items() if k not in ("config",)}}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
