"""Command line: argparse subcommands -> config dataclasses -> library calls.

Every subcommand runs inside one error boundary (`main`): a problem is one line on stderr and an exit code,
never a traceback unless --debug is given.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

Handler = Callable[[argparse.Namespace], int]

# Exit codes (documented in `hwnas --help`).
EXIT_OK = 0
EXIT_CHECKS_FAILED = 1  # the command finished, but a result failed its checks (export / run: a member failed)
EXIT_BAD_INPUT = 2  # bad arguments or input file contents (argparse's usage errors use 2 as well)
EXIT_OS_ERROR = 3  # the file system refused: permissions, a folder where a file is expected, full disk, ...
EXIT_INTERNAL = 4  # an unexpected error, i.e. a bug in hwnas: rerun with --debug for the traceback
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell's convention)
EXIT_CODES_HELP = """exit codes:
  0    done
  1    finished, but a result failed its checks (export, run: a member failed verification)
  2    bad input: arguments or the contents of an input file
  3    file system error: permissions, a folder where a file is expected (or the reverse), disk full
  4    internal error (a bug): rerun with --debug for the traceback
  130  interrupted (Ctrl-C); the message says what was saved and how to resume"""


# --- input checks run before any slow work ---


def _writable_dir(path: str | Path, flag: str) -> Path:
    """Create folder `path` if needed and prove it writable; an OSError names the path (exit 3)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{flag} must be a folder, this is a file", str(path))
    path.mkdir(parents=True, exist_ok=True)  # NotADirectoryError when a parent is a file, PermissionError, ...
    probe = path / f".hwnas-write-test-{os.getpid()}"
    probe.write_text("")
    probe.unlink()
    return path


def _writable_file(path: str | Path, flag: str) -> Path:
    """Check that file `path` can be written (not a folder; its folder created and writable)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{flag} must be a file, this is a folder", str(path))
    _writable_dir(path.parent, f"the folder of {flag}")
    return path


def _positive(value: int | None, flag: str, minimum: int = 1) -> None:
    """ValueError unless `value` is None or >= minimum."""
    if value is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")


def _info(args: argparse.Namespace) -> int:
    """Print kernel backends, the device fingerprint and library versions."""
    import numpy
    import onnx
    import onnxruntime
    import torch

    import hwnas
    from hwnas.kernels import available_backends, backend
    from hwnas.profiling.fingerprint import device_fingerprint

    try:
        from hwnas import _C
        extension = {"built": True, "with_cuda": bool(_C.with_cuda)}
    except ImportError:
        extension = {"built": False, "with_cuda": False}
    info = {
        "hwnas": hwnas.__version__,
        "extension": extension,  # with_cuda: CUDA kernels compiled in (usable only where a GPU is)
        "kernel_backends": available_backends(),
        "default_backend": {"cpu": backend("cpu"), "cuda": backend("cuda")},
        "cuda_available": torch.cuda.is_available(),
        "device": device_fingerprint(),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(info, indent=2))
    return EXIT_OK


def _add_info(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("info", help="kernel backends, device fingerprint, versions").set_defaults(handler=_info)


def _search_progress(total: int, desc: str):
    """tqdm bars advanced once per generation (one per algorithm), showing best error, front size, hypervolume."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(info: dict) -> None:
        algorithm = info["algorithm"]
        if algorithm not in bars:
            bars[algorithm] = tqdm(total=info["gens"], desc=f"{desc} {algorithm}", unit="gen")
        bar = bars[algorithm]
        bar.update(info["gen"] - bar.n)
        bar.set_postfix(best_err=f"{100 * info['best_error']:.2f}%", front=info["front_size"],
                        hv=f"{info['hypervolume']:.4f}", evals=info["n_evals"])
        if info["gen"] >= info["gens"]:
            bar.close()

    return update


def _search(args: argparse.Namespace) -> int:
    """Run NSGA-II (or random search) on the supernet's accuracy estimate and the profile's latency predictor."""
    from hwnas.config import SearchConfig
    from hwnas.search.session import build_problem, prepare_out_dir, run_search, summary_lines

    cfg = SearchConfig(pop=args.pop, gens=args.gens, max_latency_ms=args.max_latency_ms,
                       max_params_m=args.max_params_m, algorithm=args.algorithm, seed=args.seed,
                       workers=args.workers, scheduler=args.scheduler)
    out = _writable_dir(args.out, "--out")
    prepare_out_dir(out, args.resume)  # fail before the slow loading when the folder is unusable or holds a search
    problem = build_problem(args.supernet, args.profile, cfg)  # supernet and profile files are read (and checked) here
    from hwnas.profiling.sentinel_check import validate_profiles

    validate_profiles(args.profile, trust=args.trust_profile)  # this machine's profile: is its sentinel still right?
    paths = [str(Path(p).resolve()) for p in args.profile]
    provenance = {"supernet": str(Path(args.supernet).resolve()), "profile": paths[0] if len(paths) == 1 else paths}
    front, baseline = run_search(problem, cfg, out, resume=args.resume, compare_random=args.compare_random,
                                 progress=_search_progress(cfg.gens, "search"), provenance=provenance)
    print("\n".join(summary_lines(front, baseline, out)))
    return EXIT_OK


def _search_interrupted(args: argparse.Namespace) -> str:
    from hwnas.search.session import CHECKPOINT

    ckpt = Path(args.out) / CHECKPOINT
    if not ckpt.exists():
        return "no generation had finished, nothing was saved"
    return f"every finished generation is in {ckpt}: rerun the same command with --resume to continue"


def _add_search(sub: argparse._SubParsersAction) -> None:
    from hwnas.config import SEARCH_ALGORITHMS, SearchConfig

    d = SearchConfig()
    p = sub.add_parser("search", help="multi-objective search: error, latency on a device, parameters")
    p.add_argument("--supernet", required=True, help="folder written by `hwnas train-supernet`")
    p.add_argument("--profile", required=True, action="append",
                   help="device profile JSON (hwnas profile); repeat it with one profile per input resolution the "
                        "supernet was trained at to let the search choose each architecture's resolution too")
    p.add_argument("--pop", type=int, default=d.pop, help="population size (default %(default)s)")
    p.add_argument("--gens", type=int, default=d.gens, help="generations incl. the initial one (default %(default)s)")
    p.add_argument("--max-latency-ms", type=float, default=None, help="latency budget (predicted, ms)")
    p.add_argument("--max-params-m", type=float, default=None, help="size budget (millions of parameters)")
    p.add_argument("--algorithm", choices=SEARCH_ALGORITHMS, default=d.algorithm)
    p.add_argument("--compare-random", action="store_true",
                   help="also run random search with the same number of evaluations (plotted beside)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers, help="> 1: evaluate on a Dask LocalCluster")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--out", required=True, help="output folder (front.json, front.csv, pareto.png, checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue the search checkpointed in --out")
    _add_trust_flag(p)
    p.set_defaults(handler=_search, interrupted=_search_interrupted)


def _add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-profile", action="store_true",
                   help="use this machine's profile without first timing its sentinel network here (by default a "
                        "profile whose sentinel is off by more than its own noise is refused)")


def _add_provider_flags(p: argparse.ArgumentParser, default: str | None = "CPUExecutionProvider") -> None:
    p.add_argument("--provider", default=default, help="onnxruntime execution provider (default %(default)s)")
    p.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the execution provider (repeatable)")


def _provider_options(args: argparse.Namespace) -> dict[str, str]:
    """--provider-option KEY=VALUE flags as a dict; checks that --provider exists in this onnxruntime."""
    from hwnas.profiling.timer import check_provider

    if args.provider is not None:
        check_provider(args.provider)
    return parse_provider_options(args.provider_option)


def parse_provider_options(items: Sequence[str] | None) -> dict[str, str]:
    """--provider-option KEY=VALUE strings as a dict (ValueError naming a malformed one)."""
    opts = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--provider-option must be KEY=VALUE, got {item!r}")
        opts[key] = value
    return opts


def _run(args: argparse.Namespace) -> int:
    """The whole pipeline on the embedded default: supernet, profile, search, export, plot."""
    from hwnas.export.parallel import check_cluster
    from hwnas.pipeline import plan_for, run_pipeline

    plan = plan_for(args.data, args.quick)  # an unknown --data is an input error before any folder is made
    if args.workers < 0:
        raise ValueError(f"--workers must be a non-negative integer, got {args.workers}")
    check_cluster(args.workers, args.scheduler)  # as is an unreachable scheduler
    out = _writable_dir(_run_out(args), "--out")
    summary = run_pipeline(out, quick=args.quick, progress=_run_progress, plan=plan, workers=args.workers,
                           scheduler=args.scheduler)
    print("\n".join(summary["lines"]))
    return EXIT_OK if summary["ok"] else EXIT_CHECKS_FAILED


def _run_out(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    name = "hwnas-run" if args.data == "digits" else f"hwnas-run-{_data_name(args.data)}"
    return Path(name + ("-quick" if args.quick else ""))


def _data_name(spec: str) -> str:
    """A folder-name part for data set `spec`: fashion-mnist, or the last folder of idx:DIR."""
    kind, _, arg = spec.partition(":")
    name = Path(arg.rstrip("/")).name if arg else kind
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name) or kind


def _run_interrupted(args: argparse.Namespace) -> str:
    return f"every finished stage (and the finished part of the current one) is kept in {_run_out(args)}: " \
           "rerun the same command to resume"


def _bar_to(desc: str) -> Callable[[int, int], None]:
    """A tqdm bar moved to `done` of `total` at each call, closed when it gets there."""
    from tqdm import tqdm

    bar = tqdm(total=1, desc=desc, unit="step", dynamic_ncols=True)

    def to(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return to


def _run_progress(stage: str, plan):  # -> the callback of that stage (see hwnas.pipeline.run_pipeline)
    """tqdm bars for the stages of `hwnas run`."""
    if stage == "search":
        return _search_progress(plan.search.gens, "search")
    if stage == "profile":
        return _tqdm_progress("profile")[0]
    if stage == "supernet":
        to = _bar_to(stage)
        return lambda done, total, metrics: to(done, total)
    bars: dict[str, Callable[[int, int], None]] = {}  # export: one bar for training runs, one for members

    def on(what: str, done: int, total: int) -> None:
        if what not in bars:
            bars[what] = _bar_to("train (runs)" if what == "train" else what)
        bars[what](done, total)

    return on


def _add_run(sub: argparse._SubParsersAction) -> None:
    from hwnas.pipeline import RUN_DATA

    p = sub.add_parser("run", help="the whole pipeline on the built-in digits data or MNIST-format data (resumable)")
    p.add_argument("--quick", action="store_true", help="a few-minute run with small budgets")
    p.add_argument("--data", default="digits", help=f"{RUN_DATA} (default %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default hwnas-run, or hwnas-run-quick with --quick; "
                   "hwnas-run-<data>[-quick] for other data); rerun the same command to resume")
    p.add_argument("--workers", type=int, default=0,
                   help="> 1: evaluate the search and train the chosen members on a Dask LocalCluster of N processes")
    p.add_argument("--scheduler", default=None,
                   help="evaluate and train on the Dask scheduler at this address, e.g. tcp://host:8786")
    p.set_defaults(handler=_run, interrupted=_run_interrupted)


# Each entry adds one subcommand; its parser sets `handler`.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info]
SUBCOMMANDS += [_add_search, _add_run]


def _train_supernet(args: argparse.Namespace) -> int:
    """Train a supernet (DARTS bilevel + single-path fine-tuning) with a progress bar; resumable."""
    from dataclasses import fields, replace

    from tqdm import tqdm

    from hwnas.config import MacroConfig, SupernetConfig
    from hwnas.train import train_supernet

    values = {f.name: getattr(args, f.name) for f in fields(SupernetConfig) if f.name != "macro"}
    values["resolutions"] = tuple(args.resolutions)
    macro = replace(MacroConfig(), C=args.C, layers=args.layers, resolution=args.resolution)
    cfg = SupernetConfig(macro=macro, **values)
    out_dir = _writable_dir(args.out, "--out")  # before loading the data
    bar = None  # created on the first step, so input errors print no empty bar

    def progress(done: int, total: int, info: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=done - 1, desc="supernet", unit="step")
        bar.n = done
        bar.set_postfix(epoch=info["epoch"], loss=f"{info['loss']:.3f}", refresh=False)
        bar.refresh()

    try:
        out = train_supernet(cfg, out_dir, resume=args.resume, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"supernet: {out / 'supernet.pt'}  derived genotype: {out / 'genotype.json'}")
    return EXIT_OK


def _train_supernet_interrupted(args: argparse.Namespace) -> str:
    from hwnas.train.supernet import CHECKPOINT_FILE

    ckpt = Path(args.out) / CHECKPOINT_FILE
    if not ckpt.exists():
        return "no epoch had finished, nothing was saved"
    return f"every finished epoch is checkpointed in {ckpt}: rerun the same command with --resume to continue"


def _add_train_supernet(sub: argparse._SubParsersAction) -> None:
    from dataclasses import fields

    from hwnas.config import MacroConfig, SupernetConfig

    d, m = SupernetConfig(), MacroConfig()
    p = sub.add_parser("train-supernet", help="train the weight-sharing supernet (checkpoint every epoch)")
    p.add_argument("--out", required=True, help="output folder (supernet.pt, supernet.json, genotype.json)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    # Macro flags; input channels and classes always come from the dataset.
    p.add_argument("--C", type=int, default=m.C, help="channels of the first cell (default %(default)s)")
    p.add_argument("--layers", type=int, default=m.layers, help="cells (default %(default)s)")
    p.add_argument("--resolution", type=int, default=m.resolution, help="input size in pixels (default %(default)s)")
    helps = {
        "data": "digits | fashion-mnist | idx:DIR (MNIST-format files) | cifar10:PATH | folder:PATH | npz:PATH",
        "train_subset": "train on a stratified subset of N training images, 0 = all (validation and test stay whole)",
        "epochs": "DARTS bilevel epochs",
        "sample_epochs": "single-path fine-tuning epochs after the bilevel ones",
        "sampling": "uniform | alpha",
        "guard": "collapse guard: none | skip_dropout | early_stop",
        "elastic_depth": "single-path steps also drop trailing normal cells per stage, so the search chooses depth",
        "elastic_width": "single-path steps also narrow each stage to 0.5/0.75/1.0 of its channels, so the search chooses width",
        "sandwich": "single-path steps also train the largest and smallest sub-network (sandwich rule)",
        "distill": "with --sandwich: the largest sub-network's predictions are the others' targets",
    }
    p.add_argument("--resolutions", type=int, nargs="*", default=list(d.resolutions),
                   help="extra input resolutions trained by single-path steps (elastic macro), e.g. 8 12")
    for f in fields(SupernetConfig):
        if f.name in ("macro", "resolutions"):
            continue
        default = getattr(d, f.name)
        if isinstance(default, bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", default=default,
                           help=helps.get(f.name, f.name.replace('_', ' ')))
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default,
                       help=f"{helps.get(f.name, f.name.replace('_', ' '))} (default %(default)s)")
    p.set_defaults(handler=_train_supernet, interrupted=_train_supernet_interrupted)


SUBCOMMANDS.append(_add_train_supernet)


# --- profiling: profile / predict / measure / export (helper P) ---


def _tqdm_progress(desc: str):
    """A (advance, total, stage) callback that drives one tqdm bar with an ETA; returns (callback, bar)."""
    from tqdm import tqdm

    bar = tqdm(total=1, desc=desc, unit="step", dynamic_ncols=True)

    def update(advance: int, total: int, stage: str) -> None:
        if bar.total != total:
            bar.total = total
        bar.set_postfix_str(stage, refresh=False)
        bar.update(advance)

    return update, bar


def _load_archs(paths: Sequence[str]) -> list:
    """Architecture JSON files -> genotypes (errors name the file)."""
    from hwnas.space import Genotype

    for p in paths:
        if Path(p).is_dir():
            raise ValueError(f"{p}: is a folder; expected an architecture JSON file (e.g. one written by hwnas export)")
    return [Genotype.load(p) for p in paths]


def _profile(args: argparse.Namespace) -> int:
    """Measure this device and write a profile with its validation figures (--refit: fit again, no timing)."""
    from hwnas.config import DEFAULT_MACRO, ProfileConfig
    from hwnas.profiling.profiler import default_out, profile_device

    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.refit:
        from hwnas.profiling.device_profile import DeviceProfile
        from hwnas.profiling.profiler import refit_profile

        _writable_file(args.out or args.refit, "--out")
        profile = refit_profile(DeviceProfile.load(args.refit))
        profile.save(args.out or args.refit)
        v = profile.validation
        print(json.dumps({"profile": str(args.out or args.refit), "refitted": True, "validation": {
            k: v[k] for k in ("predictor", "n", "mape", "within_5pct", "within_10pct", "spearman", "noise_ceiling_within_10pct")}},
            indent=2))
        return EXIT_OK

    if args.from_measurements:
        return _profile_from_measurements(args)
    if args.ssh and args.run_here:
        raise ValueError("give either --ssh HOST or --run-here, not both")
    if args.device is None and (args.bundle or args.ssh) and not args.run_here:
        raise ValueError("a profile of another device needs a name: give --device NAME")
    if args.device is None:
        from hwnas.profiling.fingerprint import device_slug

        args.device = device_slug(args.threads)
    macro = DEFAULT_MACRO
    if args.macro:
        from hwnas.config import MacroConfig

        macro = MacroConfig.load(args.macro)  # errors name the file
    cfg = ProfileConfig(device=args.device, threads=args.threads, budget_min=args.budget_min, out=args.out,
                        provider=args.provider, provider_options=_provider_options(args), resume=args.resume, quick=args.quick, macro=macro, seed=args.seed,
                        elastic_width=not args.no_elastic_width,
                        **{k: v for k, v in (("n_calibration", args.n_calibration), ("n_validation", args.n_validation),
                                              ("runs", args.runs), ("rounds", args.rounds)) if v is not None})
    _writable_file(default_out(cfg), "--out")  # before the minutes of timing
    if args.bundle or args.ssh or args.run_here:
        return _profile_bundle(args, cfg)
    update, bar = _tqdm_progress(f"profile {args.device}")
    try:
        profile = profile_device(cfg, progress=update)
    finally:
        bar.close()
    print(json.dumps(_profile_summary(profile, cfg.out or f"profiles/{cfg.device}.json"), indent=2))
    return EXIT_OK


def _profile_interrupted(args: argparse.Namespace) -> str:
    if args.refit:
        return f"{args.out or args.refit} was not changed"
    from hwnas.profiling.fingerprint import device_slug
    from hwnas.profiling.profiler import sidecar_path

    out = Path(args.out or Path("profiles") / f"{args.device or device_slug(args.threads)}.json")
    side = sidecar_path(out)
    if not side.exists():
        return "no timing had finished, nothing was saved"
    return f"every finished timing is in {side}: rerun the same command with --resume to continue"


# --- bundles and transports: profile another device (hwnas.profiling.bundle / transport) ---


def _profile_summary(profile, out) -> dict:
    v = profile.validation
    figures = {k: v[k] for k in ("predictor", "n", "mape", "within_5pct", "within_10pct", "spearman", "kendall",
                                 "noise_ceiling_within_10pct")}
    if "per_width" in v:  # the validated accuracy at each stage width: "stage0@0.5": MAPE
        figures["mape_per_stage_width"] = {f"stage{r['stage']}@{r['width']:g}": round(r["mape"], 4) for r in v["per_width"]}
    return {"profile": str(out), "elapsed_s": profile.meta.get("elapsed_s"), "validation": figures}


def _profile_from_measurements(args: argparse.Namespace) -> int:
    """Fit and validate a profile from a measured bundle; write it to --out or profiles/NAME.json."""
    from pathlib import Path

    from hwnas.profiling.bundle import profile_from_bundle

    profile = profile_from_bundle(args.from_measurements)
    out = Path(args.out or Path("profiles") / f"{profile.name}.json")
    profile.save(out)
    print(json.dumps(_profile_summary(profile, out), indent=2))
    return 0


def _transport(args: argparse.Namespace):
    """--ssh HOST: an SSHTransport; otherwise this machine in a separate process."""
    from hwnas.profiling.transport import LocalTransport, SSHTransport

    if args.ssh:
        return SSHTransport(args.ssh, remote_python=args.remote_python, remote_dir=args.remote_dir,
                            options=args.ssh_option or ())
    return LocalTransport()


def _runner_args(args: argparse.Namespace) -> list[str]:
    """What the device's run.py is told: the provider, if one was chosen."""
    provider = getattr(args, "provider", None)
    return ["--provider", provider] if provider else []


def measure_through(args: argparse.Namespace, bundle, desc: str) -> None:
    """Run `bundle` through --ssh (or here) with a progress bar; a transport failure is one clear line."""
    from hwnas.profiling.transport import TransportError, measure_bundle

    update = _bar_to(desc)
    try:
        measure_bundle(_transport(args), bundle, _runner_args(args), progress=lambda done, total, stage: update(done, total))
    except TransportError as err:
        raise ValueError(f"{err} (finished timings stay on the device: rerun the same command to continue)") from None


def _profile_bundle(args: argparse.Namespace, cfg) -> int:
    """--bundle DIR: write the bundle; with --ssh HOST or --run-here also measure it there and fit the profile."""
    from pathlib import Path

    from hwnas.profiling.bundle import profile_from_bundle, write_profile_bundle
    from hwnas.profiling.profiler import default_out

    out = default_out(cfg)
    bundle = Path(args.bundle or out.with_suffix(".bundle"))
    to = _bar_to("write bundle")
    write_profile_bundle(cfg, bundle, progress=lambda done, total, stage: to(done, total))
    if not (args.ssh or args.run_here):
        print(f"wrote {bundle}: copy it to the device and run `python3 {bundle.name}/run.py [--provider P] "
              f"[--threads N]` there (needs Python >= 3.9, numpy, onnxruntime), bring the folder back and run "
              f"`hwnas profile --from-measurements {bundle}`")
        return 0
    measure_through(args, bundle, f"measure {cfg.device}")
    profile = profile_from_bundle(bundle)
    profile.save(out)
    print(json.dumps(_profile_summary(profile, out), indent=2))
    return 0


def add_device_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--bundle / --from-measurements / --ssh and its options, shared by profile and export."""
    p.add_argument("--bundle", default=None, metavar="DIR",
                   help=f"write {what} as ONNX + manifest + run.py (needs only Python, numpy, onnxruntime) to DIR; "
                        "run it on the device with `python3 DIR/run.py`")
    p.add_argument("--from-measurements", default=None, metavar="DIR",
                   help="a bundle whose measurements.json came back from the device: use those timings")
    p.add_argument("--ssh", default=None, metavar="USER@HOST",
                   help="measure on this host over ssh/scp (resumes after a dropped connection)")
    p.add_argument("--ssh-option", action="append", default=None, metavar="KEY=VALUE",
                   help="an ssh -o option, e.g. Port=2222 or IdentityFile=~/.ssh/pi (repeatable)")
    p.add_argument("--remote-python", default="python3", help="Python on the --ssh host (default %(default)s)")
    p.add_argument("--remote-dir", default=None,
                   help="bundle folder on the --ssh host (default ~/hwnas-bundles/NAME-HASH)")


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure this device's latencies and fit a latency predictor")
    p.add_argument("--device", default=None, help="profile name, file profiles/NAME.json (default: CPU model, cores, threads)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--budget-min", type=float, default=15.0, help="time budget in minutes (default 15)")
    p.add_argument("--out", default=None, help="output file (default profiles/NAME.json)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its .partial.json")
    p.add_argument("--quick", action="store_true", help="small sets, fewer runs: about 2 minutes")
    p.add_argument("--macro", default=None, help="JSON file with a macro config (default: the built-in one)")
    p.add_argument("--no-elastic-width", action="store_true",
                   help="time full-width networks only (fewer blocks; such a profile cannot predict narrowed networks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-calibration", type=int, default=None)
    p.add_argument("--n-validation", type=int, default=None)
    p.add_argument("--runs", type=int, default=None, help="timed runs per session")
    p.add_argument("--rounds", type=int, default=None, help="interleaved fresh-session rounds (>= 2)")
    _add_provider_flags(p)
    p.add_argument("--refit", default=None, metavar="PROFILE",
                   help="fit the predictors of PROFILE again from the measurements it stores (no timing); "
                        "writes PROFILE, or --out")
    add_device_flags(p, "every network the profile times")
    p.add_argument("--run-here", action="store_true",
                   help="with --bundle: run the bundle's run.py on this machine (a separate process) and fit")
    p.set_defaults(handler=_profile, interrupted=_profile_interrupted)


def _resolve_profile(path: str | None, macro, provider: str | None = None):
    """--profile or the shipped default for this device, macro and provider."""
    from hwnas.profiling import default_profile_path

    if path:
        return path
    found = default_profile_path(macro, provider=provider or "CPUExecutionProvider")
    if found is None:
        raise ValueError(f"no --profile given and no shipped profile matches this device, macro {macro.to_dict()} and "
                         f"provider {provider or 'CPUExecutionProvider'}; run `hwnas profile`")
    return found


def _predict(args: argparse.Namespace) -> int:
    """Predicted latency (ms) of each architecture file; each macro (input resolution) uses its own profile."""
    import numpy as np

    from hwnas.predictors import ByMacroPredictor
    from hwnas.profiling.device_profile import DeviceProfile

    from hwnas.profiling.sentinel_check import require_settings, validate_here

    genotypes = _load_archs(args.arch)
    given = [DeviceProfile.load(p) for p in args.profile or []]
    ms = np.empty(len(genotypes))
    out: dict[str, Any] = {"profiles": []}
    for macro in dict.fromkeys(g.macro for g in genotypes):
        rows = [i for i, g in enumerate(genotypes) if g.macro == macro]
        profile = next((p for p in given if p.macro == macro), None)
        if profile is None:
            if given:
                raise ValueError(f"{args.arch[rows[0]]}: macro {macro.to_dict()} is not the macro of any --profile "
                                 f"({', '.join(str(p.macro.to_dict()) for p in given)})")
            profile = DeviceProfile.load(_resolve_profile(None, macro, args.provider), expected_macro=macro)
        require_settings([profile], args.provider)
        if not args.rescale:  # --rescale times the sentinel anyway and scales by it
            validate_here(profile, trust=args.trust_profile)
        # ByMacroPredictor gives each elastic depth and width its own table from this profile.
        ms[rows] = ByMacroPredictor.from_profiles([profile], args.predictor).predict([genotypes[i] for i in rows])
        entry: dict[str, Any] = {"profile": profile.name, "resolution": macro.resolution,
                                 "predictor": args.predictor or profile.default_predictor,
                                 "validation_mape": profile.validation.get("mape")}
        if args.rescale:
            from hwnas.profiling.profiler import sentinel_scale

            scale, now = sentinel_scale(profile)
            ms[rows] *= scale
            entry["sentinel_ms"] = {"profile": round(float(profile.sentinel["latency_ms"]), 4), "now": round(now, 4)}
            entry["scale"] = round(scale, 4)
        out["profiles"].append(entry)
    if len(out["profiles"]) == 1:  # one macro: the flat form
        out = {k: v for k, v in out["profiles"][0].items() if k != "resolution"}
    out["latency_ms"] = {p: round(float(m), 4) for p, m in zip(args.arch, ms)}
    print(json.dumps(out, indent=2))
    return EXIT_OK


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predicted latency (ms) per architecture")
    p.add_argument("arch", nargs="+", help="architecture JSON file(s)")
    p.add_argument("--profile", default=None, action="append",
                   help="device profile; repeat it for several macros / input resolutions "
                        "(default: the shipped ones for this device)")
    p.add_argument("--predictor", default=None, help="predictor name (default: the profile's)")
    p.add_argument("--rescale", action="store_true",
                   help="time the profile's sentinel network now (a few seconds) and scale the predictions by "
                        "its latency now / at profiling, to follow speed changes of the device since then")
    p.add_argument("--provider", default=None, help="refuse profiles measured with another execution provider")
    _add_trust_flag(p)
    p.set_defaults(handler=_predict)


def _measure(args: argparse.Namespace) -> int:
    """Measured latency (ms) of each architecture file with the profiling methodology."""
    from hwnas.profiling.profiler import measure_genotypes

    _positive(args.threads, "--threads")
    _positive(args.runs, "--runs")
    _positive(args.rounds, "--rounds")
    if args.resume and not args.partial:
        raise ValueError("--resume continues a measurement kept with --partial FILE: give both")
    genotypes = _load_archs(args.arch)
    options = _provider_options(args)
    if args.partial:
        _writable_file(args.partial, "--partial")
    update, bar = _tqdm_progress("measure")
    try:
        m = measure_genotypes(genotypes, threads=args.threads, rounds=args.rounds, runs=args.runs,
                              progress=update, detailed=True, provider=args.provider, provider_options=options,
                              partial=args.partial, resume=args.resume)
    finally:
        bar.close()
    print(json.dumps({"threads": args.threads, "provider": args.provider, "rounds": args.rounds, "runs": args.runs,
                      "sentinel_ms": round(m.sentinel_ms, 4),
                      "latency_ms": {p: round(float(v), 4) for p, v in zip(args.arch, m.ms)}}, indent=2))
    return EXIT_OK


def _measure_interrupted(args: argparse.Namespace) -> str:
    if not args.partial:
        return "nothing was saved (give --partial FILE to keep finished timings): rerun the same command"
    if not Path(args.partial).exists():
        return "no timing had finished, nothing was saved: rerun the same command"
    return f"every finished timing is in {args.partial}: rerun the same command with --resume to continue"


def _add_measure(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("measure", help="measured latency (ms) per architecture on this device")
    p.add_argument("arch", nargs="+", help="architecture JSON file(s)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4, help="interleaved fresh-session rounds")
    p.add_argument("--runs", type=int, default=100, help="timed runs per session")
    p.add_argument("--partial", default=None, metavar="FILE",
                   help="keep every finished timing in FILE (removed when the measurement completes)")
    p.add_argument("--resume", action="store_true", help="continue the measurement kept in --partial FILE")
    _add_provider_flags(p)
    p.set_defaults(handler=_measure, interrupted=_measure_interrupted)


def _export(args: argparse.Namespace) -> int:
    """`export --arch A --out F`: one verified ONNX file; `export DIR`: the search's Pareto front (hwnas.export)."""
    _positive(args.threads, "--threads")
    _positive(args.train_seeds, "--train-seeds")
    _positive(args.train_epochs, "--train-epochs", minimum=0)
    if args.dir is not None:
        from hwnas.export import cli_export_dir

        if not Path(args.dir).is_dir():
            raise ValueError(f"{args.dir}: not a folder; DIR is the --out folder of `hwnas search`")
        if not (args.bundle and not args.ssh):  # writing a bundle only writes the bundle
            _writable_dir(args.out or Path(args.dir) / "export", "--out")  # before loading profiles and data
        return cli_export_dir(args)
    if not args.arch or not args.out:
        raise ValueError("give either DIR, or both --arch ARCH.json and --out FILE.onnx")
    import torch

    from hwnas.profiling.onnx_io import export_onnx, verify_onnx
    from hwnas.space import Network

    g = _load_archs([args.arch])[0]
    _writable_file(args.out, "--out")
    net = Network(g).eval()
    m = g.macro
    path = export_onnx(net, args.out, (1, m.in_channels, m.resolution, m.resolution))
    err = verify_onnx(path, net, torch.randn(2, m.in_channels, m.resolution, m.resolution))
    if err > 1e-4:
        raise ValueError(f"{path}: onnxruntime output differs from PyTorch by {err:.2e} (> 1e-4)")
    print(json.dumps({"onnx": str(path), "arch_id": g.arch_id, "max_abs_diff": err}, indent=2))
    return EXIT_OK


def _export_interrupted(args: argparse.Namespace) -> str:
    if args.dir is None:
        return f"{args.out} may be missing or incomplete: rerun the same command"
    out = args.out or Path(args.dir) / "export"
    return f"members exported so far are in {out}, without a report: rerun the same command to export them all"


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export verified ONNX: one architecture (--arch/--out) or a search result DIR")
    p.add_argument("dir", nargs="?", default=None, help="search output directory (Pareto front)")
    p.add_argument("--arch", default=None, help="architecture JSON file")
    p.add_argument("--out", default=None, help="ONNX file to write (with --arch) or output folder (with DIR)")
    p.add_argument("--train-epochs", type=int, default=0, help="with DIR: train each member stand-alone first")
    p.add_argument("--train-seeds", type=int, default=1,
                   help="with DIR and --train-epochs: train each member with this many seeds; report the mean test accuracy")
    p.add_argument("--profile", default=None, action="append",
                   help="with DIR: device profile, repeated for each input resolution (default: the ones the search used)")
    p.add_argument("--threads", type=int, default=None, help="with DIR: onnxruntime threads for re-measuring")
    p.add_argument("--workers", type=int, default=0,
                   help="with --train-epochs: train the members on a Dask LocalCluster of N processes")
    p.add_argument("--scheduler", default=None, help="with --train-epochs: train on the Dask scheduler at this address")
    _add_provider_flags(p, default=None)  # with DIR: must be the profile's provider (default: the profile's)
    _add_trust_flag(p)
    add_device_flags(p, "the members (and sentinels) to re-measure on the device")
    p.set_defaults(handler=_export, interrupted=_export_interrupted)


SUBCOMMANDS += [_add_profile, _add_predict, _add_measure, _add_export]


def _nothing_written(args: argparse.Namespace) -> str:
    return "nothing was written"


def build_parser() -> argparse.ArgumentParser:
    """The `hwnas` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="hwnas", description=__doc__, epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error (for bug reports)")
    parser.set_defaults(interrupted=_nothing_written)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    for p in sub.choices.values():  # --debug also after the subcommand; SUPPRESS keeps the global value
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


class _Once(logging.Filter):
    """Drops a warning already shown (a profile loaded twice warns once)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _setup_logging(verbose: bool) -> Callable[[], None]:
    """Log to stderr through a handler that shows each warning once; returns the undo (tests call main often)."""
    import warnings

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Once())
    level, root.level = root.level, logging.DEBUG if verbose else logging.INFO
    root.addHandler(handler)
    filters = warnings.filters[:]
    # hwnas logs every warning it raises; the Python warning would say the same thing a second time.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"hwnas(\.|$)")

    def undo() -> None:
        root.removeHandler(handler)
        root.setLevel(level)
        warnings.filters[:] = filters

    return undo


def _error_line(err: BaseException, args: argparse.Namespace) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ended a subcommand."""
    if isinstance(err, (ValueError, FileNotFoundError)):  # JSON, schema and missing-input errors name the file
        if isinstance(err, FileNotFoundError) and err.filename is not None:
            return EXIT_BAD_INPUT, f"{err.filename}: no such file or folder"
        return EXIT_BAD_INPUT, str(err)
    if isinstance(err, OSError):
        reason = err.strerror or str(err)
        if err.filename is not None:
            where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 is not None else "")
            return EXIT_OS_ERROR, f"{where}: {reason}"
        out = getattr(args, "out", None)
        return EXIT_OS_ERROR, reason + (f" (while writing under {out})" if out else "")
    return EXIT_INTERNAL, (f"internal error: {type(err).__name__}: {err}; "
                           "rerun with --debug for the traceback and report it")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hwnas` console script; exit codes in EXIT_CODES_HELP."""
    args = build_parser().parse_args(argv)
    undo_logging = _setup_logging(args.verbose)
    prefix = f"hwnas {args.command}"
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"\n{prefix}: interrupted; {args.interrupted(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the one boundary: every error becomes one line and an exit code
        if args.debug:
            raise
        code, line = _error_line(err, args)
        print(f"{prefix}: error: {' '.join(line.split())}", file=sys.stderr)
        return code
    finally:
        undo_logging()


if __name__ == "__main__":
    sys.exit(main())
