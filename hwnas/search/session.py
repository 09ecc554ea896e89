"""One `hwnas search` run on disk: real objectives from a supernet dir + a profile, output folder, result files."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hwnas.config import SearchConfig, SupernetConfig
from hwnas.search.front import ParetoFront, plot_fronts
from hwnas.search.problem import HWNASProblem
from hwnas.search.runner import Progress, search

if TYPE_CHECKING:
    from hwnas.data import DataSplits
    from hwnas.profiling.device_profile import DeviceProfile

log = logging.getLogger(__name__)

FRONT = "front.json"
FRONT_CSV = "front.csv"
RANDOM_FRONT = "random_front.json"
PLOT = "pareto.png"
CHECKPOINT = "checkpoint.json"
RANDOM_CHECKPOINT = "random_checkpoint.json"


def prepare_out_dir(out_dir: Path, resume: bool, checkpoint: str = CHECKPOINT) -> None:
    """Create/check the output folder: writable, and never silently overwrite an earlier search."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to output directory {out_dir}: {err.strerror or err}") from None
    exists = (out_dir / checkpoint).exists()
    if exists and not resume:
        raise ValueError(f"{out_dir} already holds a search ({checkpoint}); pass --resume to continue it "
                         "or choose another --out")


def load_profiles(paths: str | Path | Sequence[str | Path], sn_cfg: SupernetConfig) -> list[DeviceProfile]:
    """The device profiles for a supernet's networks, one per input resolution searched; errors name the file."""
    from hwnas.profiling.device_profile import DeviceProfile

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no device profile given")
    profiles = []
    for path in paths:
        if len(paths) == 1:  # one profile: it must be for the supernet's own macro (DeviceProfile names both)
            profile = DeviceProfile.load(path, expected_macro=sn_cfg.macro)
        else:
            profile = DeviceProfile.load(path)
            if not sn_cfg.macro.same_but_resolution(profile.macro):
                raise ValueError(f"{path}: profile was measured for macro {profile.macro.to_dict()}, but the supernet's "
                                 f"networks use macro {sn_cfg.macro.to_dict()} (any of resolutions {list(sn_cfg.all_resolutions)})")
            if profile.macro.resolution not in sn_cfg.all_resolutions:
                raise ValueError(f"{path}: profile is for resolution {profile.macro.resolution}, but the supernet was "
                                 f"trained at resolutions {list(sn_cfg.all_resolutions)}")
        profiles.append(profile)
    return profiles


def build_problem(supernet_dir: str | Path, profile_path: str | Path | Sequence[str | Path], cfg: SearchConfig,
                  estimator_kwargs: dict[str, Any] | None = None, valid_subset: int | None = None) -> HWNASProblem:
    """The search problem on the real objectives: supernet accuracy estimate + the profiles' latency predictors.

    One profile: architectures at the supernet's macro. Several (one per resolution the supernet was
    trained at): the search also chooses each architecture's input resolution among the profiled ones.
    A supernet trained with elastic depth (width) lets the search choose each architecture's depth (width) too.
    `valid_subset` estimates on the first N validation images only (a cheaper, noisier estimate).
    """
    from hwnas.predictors import ByMacroPredictor
    from hwnas.space.genotype import SearchSpace
    from hwnas.train import AccuracyEstimator, load_elastic_data, load_supernet

    supernet, sn_cfg = load_supernet(Path(supernet_dir))
    profiles = load_profiles(profile_path, sn_cfg)
    predictor = ByMacroPredictor.from_profiles(profiles)
    resolutions = sorted(p.macro.resolution for p in profiles)
    data: Any = load_elastic_data(sn_cfg)
    if valid_subset is not None:
        data = {r: _first_valid(data[r], valid_subset) for r in resolutions}
    estimator = AccuracyEstimator(supernet, data, **(estimator_kwargs or {}))
    space = SearchSpace(sn_cfg.macro, resolutions, depth=sn_cfg.elastic_depth, width=sn_cfg.elastic_width)
    return HWNASProblem(space, estimator.error, predictor.predict,
                        max_latency_ms=cfg.max_latency_ms, max_params_m=cfg.max_params_m)


def _first_valid(data: DataSplits, n: int) -> DataSplits:
    """`data` with only the first n search-validation samples."""
    from dataclasses import replace as dc_replace

    from torch.utils.data import TensorDataset

    x, y = data.valid.tensors
    return dc_replace(data, valid=TensorDataset(x[:n], y[:n]))


def input_hashes(provenance: dict[str, Any] | None) -> dict[str, str]:
    """sha256 of the supernet weights and each profile file named in `provenance` (files that exist)."""
    from hwnas.train.supernet import CHECKPOINT_FILE

    provenance = provenance or {}
    files: dict[str, Path] = {}
    if provenance.get("supernet"):
        files[f"supernet {CHECKPOINT_FILE}"] = Path(provenance["supernet"]) / CHECKPOINT_FILE
    profiles = provenance.get("profile") or []
    for path in [profiles] if isinstance(profiles, (str, Path)) else profiles:
        files[f"profile {Path(path).name}"] = Path(path)
    out = {}
    for name, path in files.items():
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            out[name] = digest.hexdigest()
    return out


def run_search(problem: HWNASProblem, cfg: SearchConfig, out_dir: str | Path, resume: bool = False,
               compare_random: bool = False, progress: Progress | None = None,
               provenance: dict[str, Any] | None = None) -> tuple[ParetoFront, ParetoFront | None]:
    """Search into out_dir (checkpoint, front.json, front.csv, pareto.png); optionally random search beside it.

    `provenance` ({"supernet": dir, "profile": path or paths}) goes into the fronts' config; the files' sha256
    go into the checkpoints, so that a resume with another supernet or profile is refused.
    """
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, resume)
    ref = None
    inputs = input_hashes(provenance)
    front = search(problem, cfg, resume=out_dir / CHECKPOINT if resume and (out_dir / CHECKPOINT).exists() else None,
                   checkpoint=out_dir / CHECKPOINT, progress=progress, inputs=inputs)
    front.config.update(provenance or {})
    front.save(out_dir / FRONT)
    front.save_csv(out_dir / FRONT_CSV)
    baseline = None
    if compare_random and cfg.algorithm != "random":
        ref = front.reference_point  # the same box, so the two hypervolumes compare
        rcfg = replace(cfg, algorithm="random")
        ck = out_dir / RANDOM_CHECKPOINT
        baseline = search(problem, rcfg, resume=ck if resume and ck.exists() else None, checkpoint=ck,
                          progress=progress, reference_point=ref, inputs=inputs)
        baseline.config.update(provenance or {})
        baseline.save(out_dir / RANDOM_FRONT)
    elif (out_dir / RANDOM_FRONT).exists():
        baseline = ParetoFront.load(out_dir / RANDOM_FRONT)
    plot_fronts(front, out_dir / PLOT, baseline=baseline)
    return front, baseline


def summary_lines(front: ParetoFront, baseline: ParetoFront | None, out_dir: Path) -> list[str]:
    """What the CLI prints at the end of a search."""
    lines = []
    if not front.feasible:
        lines.append(f"no evaluated architecture meets the budgets {front.config.get('budgets')}; "
                     f"the front holds the {len(front.members)} least violating ones")
    best = min(front.members, key=lambda m: m.error, default=None)
    fast = min(front.members, key=lambda m: m.latency_ms, default=None)
    lines.append(f"{len(front.members)} Pareto members from {front.n_evaluations} evaluated architectures; "
                 f"hypervolume {front.hypervolume:.4f}")
    if best is not None and fast is not None:
        lines.append(f"most accurate: {best.arch_id} error {100 * best.error:.2f} % at {best.latency_ms:.3f} ms; "
                     f"fastest: {fast.arch_id} {fast.latency_ms:.3f} ms at error {100 * fast.error:.2f} %")
    if baseline is not None:
        lines.append(f"random search, same number of evaluations: hypervolume {baseline.hypervolume:.4f} "
                     f"({len(baseline.members)} members)")
    lines.append(f"wrote {out_dir / FRONT}, {out_dir / FRONT_CSV}, {out_dir / PLOT}")
    return lines
