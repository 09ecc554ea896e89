"""Bundles: what a device needs to time a profile's (or an export's) networks without hwnas, and what comes back.

A bundle folder holds `manifest.json` (the plan: keys, input shapes, files + sha256, the timing config, what
the profile is fitted from), the ONNX models, `run.py` (hwnas/profiling/runner.py) and `hwnas_timer.py`
(hwnas/profiling/timer.py). The device writes `measurements.json` into it; `profile_from_bundle` and
`export_measure_fn` turn that back into a profile or an export report's measured latencies.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hwnas.profiling import fingerprint, runner, timer
from hwnas.profiling.runner import BundleError

log = logging.getLogger(__name__)

RUN_FILE, TIMER_FILE, FINGERPRINT_FILE, MODELS_DIR = "run.py", "hwnas_timer.py", "hwnas_fingerprint.py", "models"
Group = tuple[str, timer.Candidate | None, list[tuple[timer.Candidate, dict[str, Any]]]]  # name, sentinel, (model, extra)
Progress = Callable[[int, int, str], None]


def _entry(cand: timer.Candidate, file: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"key": cand.key, "file": file, "input_shape": list(cand.input_shape),
            "sha256": runner.sha256_bytes(cand.model), **(extra or {})}


def write_bundle(out_dir: str | Path, name: str, purpose: str, groups: Sequence[Group], timing: timer.TimingConfig,
                 seed: int = 0, extra: dict[str, Any] | None = None) -> Path:
    """Write models, manifest and runner into `out_dir`; returns the manifest path.

    Rewriting the same bundle is a no-op that keeps its (partial) measurements; a folder holding another
    bundle with measurements, or anything that is not a bundle, is refused rather than overwritten.
    """
    import hwnas

    out = Path(out_dir)
    files: dict[str, bytes] = {}
    manifest_groups = []
    for g_name, sentinel, models in groups:
        entries = []
        for cand, more in models:
            file = f"{MODELS_DIR}/{len(files):04d}.onnx"
            files[file] = cand.model
            entries.append(_entry(cand, file, more))
        sent = None
        if sentinel is not None:
            file = f"{MODELS_DIR}/{len(files):04d}-sentinel.onnx"
            files[file] = sentinel.model
            sent = _entry(sentinel, file)
        manifest_groups.append({"name": g_name, "sentinel": sent, "models": entries})
    timer_src = Path(timer.__file__).read_bytes()
    manifest = {
        "kind": runner.MANIFEST_KIND, "schema_version": runner.MANIFEST_SCHEMA_VERSION, "name": name,
        "purpose": purpose, "written_by": f"hwnas {hwnas.__version__}", "seed": seed, "timing": timing.to_dict(),
        "runner": {"run": RUN_FILE, "timer": TIMER_FILE, "fingerprint": FINGERPRINT_FILE,
                   "timer_sha256": runner.sha256_bytes(timer_src),
                   "requires": "Python >= 3.9, numpy, onnxruntime",
                   "usage": f"python3 {RUN_FILE} [--provider P] [--threads N]"},
        **(extra or {}), "groups": manifest_groups,
    }
    text = json.dumps(manifest, indent=1) + "\n"
    _prepare_dir(out, text)
    for file, data in files.items():
        path = out / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (out / TIMER_FILE).write_bytes(timer_src)
    (out / FINGERPRINT_FILE).write_bytes(Path(fingerprint.__file__).read_bytes())
    (out / RUN_FILE).write_bytes(Path(runner.__file__).read_bytes())
    (out / RUN_FILE).chmod(0o755)
    (out / runner.MANIFEST_NAME).write_text(text)  # last: a folder with a manifest is a complete bundle
    return out / runner.MANIFEST_NAME


def _prepare_dir(out: Path, manifest_text: str) -> None:
    """Make `out` ready for a bundle (see `write_bundle`)."""
    manifest = out / runner.MANIFEST_NAME
    if not out.exists():
        out.mkdir(parents=True)
        return
    if not out.is_dir():
        raise BundleError(f"{out}: exists and is not a folder")
    if not manifest.exists():
        if any(out.iterdir()):
            raise BundleError(f"{out}: not empty and not an hwnas bundle; choose a new folder")
        return
    if manifest.read_text() == manifest_text:
        return  # the same bundle: keep what was measured already
    if any((out / n).exists() for n in (runner.PARTIAL_NAME, runner.MEASUREMENTS_NAME)):
        raise BundleError(f"{out}: holds measurements of another bundle; choose a new folder or delete it")
    shutil.rmtree(out / MODELS_DIR, ignore_errors=True)


def read_measurements(bundle_dir: str | Path, purpose: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, measurements) of a measured bundle, checked to belong together and to `purpose`."""
    bundle_dir = Path(bundle_dir)
    manifest = runner.read_manifest(bundle_dir)
    if manifest.get("purpose") != purpose:
        raise BundleError(f"{bundle_dir / runner.MANIFEST_NAME}: a bundle for {manifest.get('purpose')!r}, "
                          f"not for {purpose!r}")
    path = bundle_dir / runner.MEASUREMENTS_NAME
    meas = runner.read_json_file(path, "measurements file (run the bundle's run.py on the device first)")
    if not isinstance(meas, dict) or meas.get("kind") != runner.MEASUREMENTS_KIND:
        raise BundleError(f"{path}: not hwnas measurements (kind must be {runner.MEASUREMENTS_KIND!r})")
    if meas.get("schema_version") != runner.MEASUREMENTS_SCHEMA_VERSION:
        raise BundleError(f"{path}: schema_version {meas.get('schema_version')!r} is not "
                          f"{runner.MEASUREMENTS_SCHEMA_VERSION}")
    if meas.get("manifest_sha256") != runner.manifest_sha256(bundle_dir):
        raise BundleError(f"{path}: measured from another manifest than {bundle_dir / runner.MANIFEST_NAME}")
    for field in ("records", "timing", "fingerprint"):
        if not isinstance(meas.get(field), dict):
            raise BundleError(f"{path}: field {field!r} is missing or not an object")
    try:
        meas["records"] = {g: [(str(k), int(r), float(t), float(s)) for k, r, t, s in recs]
                           for g, recs in meas["records"].items()}
        meas["timing_config"] = timer.TimingConfig(**meas["timing"])
    except (TypeError, ValueError) as err:
        raise BundleError(f"{path}: malformed records or timing ({err})") from None
    return manifest, meas


# --- profiles --------------------------------------------------------------------------------------------------

PROFILE_GROUP = "profile"
ROLES = {"overhead": "overhead", "fixed": "fixed part", "block": "block", "cal": "calibration", "val": "validation"}


def _seeded(make: Callable[[], timer.Candidate], seed: int) -> timer.Candidate:
    """Build a candidate with fixed weights, so writing the same bundle twice gives the same bytes."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make()


def write_profile_bundle(cfg: Any, out_dir: str | Path, progress: Progress | None = None) -> Path:
    """The bundle of a `hwnas profile` config (a ProfileConfig): every network the profile times."""
    from hwnas.profiling.profiler import make_plan, network_candidate, timing_config

    import torch

    cfg = cfg.resolved()
    if _same_profile_bundle(Path(out_dir), cfg):
        log.info("%s already holds the bundle of this profile config; reusing it (and its measurements)", out_dir)
        return Path(out_dir) / runner.MANIFEST_NAME
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # the plan builds the fixed parts' modules: same weights, same bundle
        plan = make_plan(cfg)
    jobs = plan.jobs()
    models = []
    for i, (key, make) in enumerate(jobs):
        models.append((_seeded(make, i), {"role": ROLES[key.split(":", 1)[0]]}))
        if progress is not None:
            progress(i + 1, len(jobs) + 1, "export ONNX")
    sentinel = _seeded(lambda: network_candidate("sentinel", plan.sentinel), len(jobs))
    if progress is not None:
        progress(len(jobs) + 1, len(jobs) + 1, "export ONNX")
    extra = {
        "budget_min": cfg.budget_min,
        "profile": {
            "device": cfg.device, "quick": cfg.quick, "config": cfg.measurement_key(),
            "sentinel_arch_id": plan.sentinel.arch_id,
            "fitted_from": "overhead and fixed:* and block:* -> the block latency table; cal:* -> the predictors' "
                           "calibration; val:* -> held-out validation, even vs odd rounds as two measurements "
                           "(hwnas profile --from-measurements DIR)",
        },
    }
    return write_bundle(out_dir, cfg.device, "profile", [(PROFILE_GROUP, sentinel, models)],
                        timing_config(cfg), seed=cfg.seed, extra=extra)


def _same_profile_bundle(out: Path, cfg: Any) -> bool:
    """Whether `out` holds an intact bundle of the same profile config (a rerun continues with it, no re-export)."""
    from hwnas.profiling.profiler import timing_config

    try:
        m = runner.read_manifest(out)
    except BundleError:
        return False
    info = m.get("profile") or {}
    return (m.get("purpose") == "profile" and info.get("device") == cfg.device
            and info.get("config") == json.loads(json.dumps(cfg.measurement_key()))
            and m.get("timing") == timing_config(cfg).to_dict() and m.get("budget_min") == cfg.budget_min)


def profile_config_of(manifest: dict[str, Any], threads: int | None = None) -> Any:
    """The ProfileConfig a profile bundle was written from (threads: what the device actually used)."""
    from hwnas.config import MacroConfig, ProfileConfig

    try:
        info = manifest["profile"]
        key = dict(info["config"])
        key["macro"] = MacroConfig.from_dict(key["macro"])
        key.setdefault("elastic_width", False)  # a bundle written before elastic width planned full width only
        if threads is not None:
            key["threads"] = int(threads)
        return ProfileConfig(device=info["device"], quick=False, budget_min=float(manifest.get("budget_min") or 15.0),
                             **key)
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"manifest.json: field 'profile' does not describe a profile of this hwnas ({err})") from None


def profile_from_bundle(bundle_dir: str | Path) -> Any:
    """Fit and validate the predictors from a profile bundle's measurements.json; returns the DeviceProfile."""
    from hwnas.profiling.profiler import make_plan, profile_from_records

    bundle_dir = Path(bundle_dir)
    manifest, meas = read_measurements(bundle_dir, "profile")
    tcfg = meas["timing_config"]
    cfg = profile_config_of(manifest, threads=tcfg.threads)
    plan = make_plan(cfg)
    want = [k for k, _ in plan.jobs()]
    have = [e["key"] for e in manifest["groups"][0]["models"]]
    if want != have or plan.sentinel.arch_id != manifest["profile"].get("sentinel_arch_id"):
        raise BundleError(f"{bundle_dir / runner.MANIFEST_NAME}: its networks are not the ones this hwnas plans "
                          "for that config (written by another hwnas version?); write the bundle again")
    records = meas["records"].get(PROFILE_GROUP, [])
    profile = profile_from_records(plan, records, meas["fingerprint"])
    # The device block says what the device measured with, which the runner may have overridden.
    profile.device.update({"threads": tcfg.threads, "timing": tcfg.to_dict(),
                           "provider": meas["fingerprint"].get("provider", profile.device.get("provider"))})
    profile.meta.update({
        "quick": bool(manifest["profile"].get("quick")), "elapsed_s": meas.get("elapsed_s"),
        "rounds_completed": (meas.get("rounds_completed") or {}).get(PROFILE_GROUP),
        "measured_by": "bundle runner", "bundle_manifest_sha256": meas["manifest_sha256"],
        "runner_sessions": len(meas.get("sessions") or []),
    })
    return profile


# --- export ----------------------------------------------------------------------------------------------------


def member_key(rank: int, arch_id: str) -> str:
    """The bundle key of a front member."""
    return f"{rank:02d}:{arch_id}"


def export_timing(profiles: dict[Any, Any], threads: int) -> timer.TimingConfig:
    """How export re-measures (as hwnas.export does locally): the profile's runs, rounds, warm-up and level."""
    first = next(iter(profiles.values()), None)
    timing = dict((first.device.get("timing") or {}) if first is not None else {})
    kwargs = {k: timing[k] for k in ("rounds", "runs", "warmup", "optimization_level") if k in timing}
    return timer.TimingConfig(threads=threads, combine="median", **kwargs)


def write_export_bundle(members: Sequence[Any], profiles: dict[Any, Any], out_dir: str | Path, threads: int,
                        name: str = "export") -> Path:
    """The bundle that re-measures Pareto members on the device: one group (and sentinel) per input resolution."""
    from hwnas.profiling.profiler import network_candidate, sentinel_genotype

    by_macro: dict[Any, list[tuple[timer.Candidate, dict[str, Any]]]] = {}
    for rank, m in enumerate(members):
        g = m.genotype
        cand = _seeded(lambda g=g, rank=rank: network_candidate(member_key(rank, g.arch_id), g), rank)
        by_macro.setdefault(g.macro, []).append((cand, {"rank": rank, "arch_id": g.arch_id}))
    groups: list[Group] = []
    for i, (macro, models) in enumerate(by_macro.items()):
        sentinel = _seeded(lambda: network_candidate("sentinel", sentinel_genotype(macro)), 10_000 + i)
        groups.append((f"resolution-{macro.resolution}", sentinel, models))
    extra = {"export": {"members": [{"rank": r, "arch_id": m.genotype.arch_id} for r, m in enumerate(members)]}}
    return write_bundle(out_dir, name, "export", groups, export_timing(profiles, threads), extra=extra)


def export_measure_fn(bundle_dir: str | Path, members: Sequence[Any]) -> Callable[[list[Any]], np.ndarray]:
    """A `measure_fn` for hwnas.export.export_front that returns the device's measurements of `members`.

    Like the local measurement it carries `sentinel_ms` (per macro), `halves` (even/odd rounds) and
    `attempts`; `fingerprint` is the device's.
    """
    bundle_dir = Path(bundle_dir)
    manifest, meas = read_measurements(bundle_dir, "export")
    want = [{"rank": r, "arch_id": m.genotype.arch_id} for r, m in enumerate(members)]
    if manifest.get("export", {}).get("members") != want:
        raise BundleError(f"{bundle_dir / runner.MANIFEST_NAME}: made for other front members than this export's")
    tcfg = meas["timing_config"]
    red = tcfg.reduction()
    ms, half_a, half_b, sentinel_ms = {}, {}, {}, {}
    macro_of = {group["name"]: next(m.genotype.macro for r, m in enumerate(members)
                                    if member_key(r, m.genotype.arch_id) == group["models"][0]["key"])
                for group in manifest["groups"]}
    for name, records in meas["records"].items():
        ref = timer.sentinel_median(records, tcfg.drift_window)
        ms.update(timer.combine(records, **red))
        a, b = timer.split_halves(records, None if np.isnan(ref) else ref, tcfg.rounds, **red)
        half_a.update(a)
        half_b.update(b)
        if name in macro_of:
            sentinel_ms[macro_of[name]] = ref

    def measure(genotypes: list[Any]) -> np.ndarray:
        keys = [member_key(r, g.arch_id) for r, g in enumerate(genotypes)]
        missing = [k for k in keys if k not in ms]
        if missing:
            raise BundleError(f"{bundle_dir / runner.MEASUREMENTS_NAME}: no timing of {', '.join(missing)}")
        measure.halves = np.array([[h.get(k, np.nan) for k in keys] for h in (half_a, half_b)])
        return np.array([ms[k] for k in keys])

    measure.sentinel_ms, measure.halves, measure.attempts = sentinel_ms, None, {}
    measure.fingerprint, measure.timing = meas["fingerprint"], tcfg.to_dict()
    return measure


__all__ = ["BundleError", "export_measure_fn", "profile_from_bundle", "read_measurements", "write_bundle",
           "write_export_bundle", "write_profile_bundle"]
