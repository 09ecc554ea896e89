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
    data = None
    if train_epochs > 0:
        supernet_dir = front.config.get("supernet")
        if not supernet_dir:
            raise ValueError(f"{run_dir / 'front.json'}: config names no supernet, so the dataset for --train-epochs is unknown")
        data = _load_search_data(Path(supernet_dir))
    report = export_front(front, out_dir, profile=profile, train_epochs=train_epochs, data=data,
                          threads=getattr(args, "threads", None), progress=_progress_printer(),
                          train_seeds=getattr(args, "train_seeds", 1),  # export_front rejects < 1
                          workers=getattr(args, "workers", 0) or 0, scheduler=getattr(args, "scheduler", None))
    print(format_table(report))
    print(f"wrote {out_dir / REPORT_NAME}")
    return 0 if report["summary"]["n_passed"] == report["summary"]["n"] else 1


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
