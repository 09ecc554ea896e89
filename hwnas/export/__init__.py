"""Export Pareto members as verified ONNX models with re-measured latency."""
from __future__ import annotations

import argparse
from pathlib import Path

from hwnas.export.exporter import REPORT_NAME, export_front, format_table, load_report

__all__ = ["REPORT_NAME", "cli_export_dir", "export_front", "format_table", "load_report"]


def cli_export_dir(args: argparse.Namespace) -> int:
    """`hwnas export DIR [--train-epochs E] [--train-seeds K] [--profile P] [--threads N] [--out D]`: export a search's front.

    DIR is a `hwnas search` output folder; its front.json names the supernet (for the dataset used by
    stand-alone training) and the profile (threads and noise ceiling), unless --profile is given.
    """
    from hwnas.search.front import ParetoFront

    run_dir = Path(args.dir)
    front = ParetoFront.load(run_dir / "front.json")
    train_epochs = int(getattr(args, "train_epochs", 0) or 0)
    out_dir = Path(getattr(args, "out", None) or run_dir / "export")
    profile_paths = getattr(args, "profile", None) or front.config.get("profile")
    if isinstance(profile_paths, str):
        profile_paths = [profile_paths]
    profile = None
    if profile_paths:
        from hwnas.profiling.device_profile import DeviceProfile

        profile = [DeviceProfile.load(p) for p in profile_paths]
        missing = sorted({m.genotype.macro.resolution for m in front.members} - {p.macro.resolution for p in profile})
        if missing or any(not p.macro.same_but_resolution(m.genotype.macro) for p in profile for m in front.members):
            raise ValueError(f"the profiles {profile_paths} do not cover the front's macros "
                             f"{sorted({str(m.genotype.macro.to_dict()) for m in front.members})}")
    on_device = any(getattr(args, k, None) for k in ("bundle", "ssh", "from_measurements"))
    if profile and not on_device:  # timed here: the profiles must be this machine's settings and speed
        _check_profiles(profile, args)
    measure_fn = None
    if on_device:
        measure_fn = _device_measure_fn(args, front, profile, out_dir, run_dir)
        if measure_fn is None:
            return 0  # the bundle is written; the device measures it next
    data = None
    if train_epochs > 0:
        supernet_dir = front.config.get("supernet")
        if not supernet_dir:
            raise ValueError(f"{run_dir / 'front.json'}: config names no supernet, so the dataset for --train-epochs is unknown")
        data = _load_search_data(Path(supernet_dir))
    report = export_front(front, out_dir, profile=profile, train_epochs=train_epochs, data=data,
                          threads=getattr(args, "threads", None), progress=_progress_printer(),
                          train_seeds=getattr(args, "train_seeds", 1),  # export_front rejects < 1
                          measure_fn=measure_fn,
                          workers=getattr(args, "workers", 0) or 0, scheduler=getattr(args, "scheduler", None))
    if measure_fn is not None:
        _record_device(out_dir / REPORT_NAME, report, measure_fn)
    print(format_table(report))
    print(f"wrote {out_dir / REPORT_NAME}")
    return 0 if report["summary"]["n_passed"] == report["summary"]["n"] else 1


def _check_profiles(profiles: list, args: argparse.Namespace) -> None:
    """--provider/--provider-option must be the profiles'; this machine's profiles must pass the sentinel check."""
    from hwnas.cli import parse_provider_options
    from hwnas.profiling.sentinel_check import require_settings, validate_here

    options = parse_provider_options(getattr(args, "provider_option", None))
    require_settings(profiles, getattr(args, "provider", None), options)
    for p in profiles:  # another device's profile passes unchecked: export then reports it did not measure
        validate_here(p, trust=bool(getattr(args, "trust_profile", False)))


def _device_measure_fn(args: argparse.Namespace, front, profile, out_dir: Path, run_dir: Path):
    """--from-measurements B: the device's timings; --bundle B / --ssh HOST: write the members' bundle (and measure it
    over ssh). None when the bundle was only written."""
    from hwnas.profiling.bundle import export_measure_fn, write_export_bundle

    if args.from_measurements:
        return export_measure_fn(args.from_measurements, front.members)
    profiles = {p.macro: p for p in (profile or [])}
    first = next(iter(profiles.values()), None)
    threads = args.threads or int((first.device.get("threads") if first is not None else None) or 1)
    bundle = Path(args.bundle or out_dir / "device-bundle")
    write_export_bundle(front.members, profiles, bundle, threads, name=f"export-{run_dir.resolve().name}")
    if not args.ssh:
        print(f"wrote {bundle}: run `python3 {bundle.name}/run.py` on the device, bring the folder back and run "
              f"`hwnas export {args.dir} --from-measurements {bundle}`")
        return None
    from hwnas.cli import measure_through

    measure_through(args, bundle, "measure members")
    return export_measure_fn(bundle, front.members)


def _record_device(path: Path, report: dict, measure_fn) -> None:
    """Say in the export report which device measured the latencies (its fingerprint and timing)."""
    from hwnas.jsonio import atomic_write_json

    report["measured_on"] = {"fingerprint": measure_fn.fingerprint, "timing": measure_fn.timing}
    atomic_write_json(path, report)


def _load_search_data(supernet_dir: Path):  # -> MultiResolutionData
    """The dataset (same splits) a supernet was trained on, at each resolution it was trained at."""
    from hwnas.train import load_elastic_data, load_supernet

    _, cfg = load_supernet(supernet_dir)
    return load_elastic_data(cfg)


def _progress_printer():
    """A tqdm bar for the export stage (CLI layer only)."""
    from tqdm import tqdm

    bar: dict[str, tqdm] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in bar:
            bar[stage] = tqdm(total=total, desc=stage, unit="model", leave=False)
        bar[stage].update(done - bar[stage].n)
        if done >= total:
            bar[stage].close()

    return update
