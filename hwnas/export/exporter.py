"""Export every Pareto member to ONNX, verify it (checker, onnxruntime vs PyTorch) and re-measure its latency."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Collection

import numpy as np
import torch

from hwnas.data import splits_at
from hwnas.export.parallel import pretrained, wants_dask
from hwnas.jsonio import atomic_write_json, load_json
from hwnas.search.front import FrontMember, ParetoFront
from hwnas.space.genotype import Genotype
from hwnas.space.network import Network, count_params

log = logging.getLogger(__name__)

REPORT_VERSION = 1
REPORT_NAME = "export_report.json"
PARTIAL_NAME = "export_report.partial.json"  # rows of the members exported so far: a rerun keeps them
MAX_ABS_DIFF = 1e-4  # onnxruntime vs PyTorch on the same float32 input
LATENCY_TOLERANCE = 0.10  # "measured within +-10 % of predicted"
DRIFT_RETRIES = 2  # re-measurements of a macro's networks while its sentinel is > 10 % off the profiled one
DRIFT_WAIT_S = 45.0  # pause before each: the slow phases seen on shared hosts last seconds to minutes
VERIFY_BATCH = 3  # != the export batch of 1, so the dynamic batch axis is exercised
MeasureFn = Callable[[list[Genotype]], np.ndarray]
ScaleFn = Callable[[Any], tuple[float, float]]  # profile -> (sentinel now / at profiling, sentinel ms now)
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _default_measure(threads: int, profiles: dict[Any, Any] | None = None, drift_retries: int = DRIFT_RETRIES,
                     drift_wait_s: float = DRIFT_WAIT_S, partial_dir: Path | None = None) -> MeasureFn:
    """Latency (ms) with the profiling methodology of hwnas.profiling.profiler and the profile's runs and rounds.

    Always the interleaved, paired timing, also for profiles written before it existed: under bursts of
    interference it agrees with their predictions where the earlier timing did not (benchmarks/latency_noise.py).
    When the sentinel shows the device more than 10 % off its state at profiling (another job slowing the
    cores for minutes, say), the macro's networks are measured again after `drift_wait_s`, up to
    `drift_retries` times; the attempt whose sentinel is closest to the profile's is kept, and every
    attempt's sentinel ratio is reported. `partial_dir`: every finished timing is kept there, so that an
    export killed while measuring times only what is left when it is run again.
    """
    from hwnas.profiling import profiler

    profiles = profiles or {}
    first = next(iter(profiles.values()), None)
    timing = dict((first.device.get("timing") or {}) if first is not None else {})
    kwargs = {k: timing[k] for k in ("rounds", "runs", "warmup", "optimization_level", "provider", "provider_options")
              if k in timing}

    def drift(macro: Any, m: Any) -> float | None:
        """log of sentinel now / at profiling, or None when the profile's sentinel cannot be compared."""
        profile = profiles.get(macro)
        if profile is None or not profiler.has_repeatable_sentinel(profile) or not np.isfinite(m.sentinel_ms):
            return None
        return math.log(m.sentinel_ms / float(profile.sentinel["latency_ms"]))

    def measure(genotypes: list[Genotype]) -> np.ndarray:
        out, halves = np.empty(len(genotypes)), np.empty((2, len(genotypes)))
        for macro, rows in _rows_by_macro(genotypes).items():  # each macro has its own sentinel network
            group = [genotypes[i] for i in rows]
            best, attempts = None, []
            for attempt in range(drift_retries + 1):
                if attempt:
                    log.warning("resolution %d: sentinel %.2fx its profiled latency (device busier or slower than at "
                                "profiling); measuring again in %.0f s", macro.resolution, math.exp(attempts[-1]), drift_wait_s)
                    time.sleep(drift_wait_s)
                m = _measure_kept(group, attempt, partial_dir, threads=threads, **kwargs)
                d = drift(macro, m)
                if best is None or (d is not None and abs(d) < abs(best[1])):
                    best = (m, d if d is not None else 0.0)
                if d is None:
                    break
                attempts.append(d)
                if abs(d) <= math.log1p(LATENCY_TOLERANCE):
                    break
            m = best[0]
            out[rows], halves[0, rows], halves[1, rows] = m.ms, m.ms_a, m.ms_b
            measure.sentinel_ms[macro] = m.sentinel_ms
            measure.attempts[macro] = [round(math.exp(d), 4) for d in attempts]
        measure.halves = halves
        return out

    # The sentinel level seen while measuring, per macro: the profile's own statistic over every round, so the
    # rescaling needs no separate (and, during a burst from another tenant, misleading) sentinel timing.
    # The even- and odd-round halves are two independent measurements: their agreement is the noise now.
    measure.sentinel_ms, measure.halves, measure.attempts = {}, None, {}
    return measure


def _measure_kept(group: list[Genotype], attempt: int, partial_dir: Path | None, **kwargs: Any) -> Any:
    """profiler.measure_genotypes(detailed=True), resumed from the partial timings in `partial_dir` if any."""
    from hwnas.profiling import profiler

    if partial_dir is None:
        return profiler.measure_genotypes(group, detailed=True, **kwargs)
    digest = hashlib.sha1(json.dumps([g.arch_id for g in group]).encode()).hexdigest()[:12]
    partial = partial_dir / f"measure-{digest}-{attempt}.partial.json"
    try:
        return profiler.measure_genotypes(group, detailed=True, partial=partial, resume=True, **kwargs)
    except profiler.UnusablePartialState as err:  # left by a run with other settings, or damaged
        log.warning("%s; timing these members from the start", err)
        return profiler.measure_genotypes(group, detailed=True, partial=partial, resume=False, **kwargs)


def _rows_by_macro(genotypes: list[Genotype]) -> dict[Any, list[int]]:
    """Row indices grouped by macro config, in first-seen order."""
    groups: dict[Any, list[int]] = {}
    for i, g in enumerate(genotypes):
        groups.setdefault(g.macro, []).append(i)
    return groups


def _by_macro(profile: Any) -> dict[Any, Any]:
    """A profile, a list of them (one per resolution) or None, as macro -> profile."""
    if profile is None:
        return {}
    profiles = list(profile) if isinstance(profile, (list, tuple)) else [profile]
    return {p.macro: p for p in profiles}


def _onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path))
    return int(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), -1))


def _verify_input(member: FrontMember, data: Any, seed: int) -> torch.Tensor:
    """Real test images when a dataset is given (the range a deployed model sees), else seeded noise."""
    macro = member.genotype.macro
    if data is not None:
        return splits_at(data, macro.resolution).test.tensors[0][:VERIFY_BATCH].float()
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(VERIFY_BATCH, macro.in_channels, macro.resolution, macro.resolution, generator=gen)


def _export_member(rank: int, member: FrontMember, out_dir: Path, train_epochs: int, data: Any, seed: int,
                   tolerance: float, train_fn: Callable | None, train_seeds: int = 1,
                   on_run: Callable[[], None] | None = None) -> dict[str, Any]:
    """Build (and optionally train), export, check one member; every failure is recorded, never raised.

    `on_run` is called after each stand-alone training run (one per seed)."""
    from hwnas.profiling.onnx_io import export_onnx, verify_onnx

    g = member.genotype
    stem = f"{rank:02d}_{member.arch_id}"
    row: dict[str, Any] = {
        "rank": rank, "arch_id": member.arch_id, "arch": f"{stem}.json", "onnx": None, "opset": None,
        "estimated_error": member.error, "predicted_latency_ms": member.latency_ms, "params_m": member.params_m,
        "trained_epochs": 0, "test_accuracy": None, "max_abs_diff": None, "checker": False,
        "measured_latency_ms": None, "latency_ratio": None, "passed": False, "errors": [],
    }
    try:
        g.save(out_dir / f"{stem}.json")
        if train_epochs > 0:
            if data is None:
                raise ValueError("stand-alone training needs the dataset")
            net, accs = _train_seeds(train_fn or _train_network, g, splits_at(data, g.macro.resolution),
                                     train_epochs, seed, train_seeds, on_run)
            row["trained_epochs"], row["test_accuracy"] = train_epochs, float(np.mean(accs))
            row["test_accuracy_seeds"] = accs
        else:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                net = Network(g)
        row["params_m"] = count_params(net) / 1e6
        macro = g.macro
        path = export_onnx(net, out_dir / f"{stem}.onnx", (1, macro.in_channels, macro.resolution, macro.resolution))
        row["onnx"], row["opset"] = path.name, _onnx_opset(path)
        diff = verify_onnx(path, net, _verify_input(member, data, seed))  # runs onnx.checker first
        row["checker"], row["max_abs_diff"] = True, diff
        if not math.isfinite(diff) or diff > tolerance:
            row["errors"].append(f"max |onnxruntime - torch| = {diff:.3g} > {tolerance:g}")
    except Exception as err:  # noqa: BLE001 - a failing member is reported, not dropped
        log.warning("member %s (%s) failed: %s", rank, member.arch_id, err)
        row["errors"].append(f"{type(err).__name__}: {err}")
    return row


def _train_seeds(train: Callable, genotype: Genotype, data: Any, epochs: int, seed: int,
                 n_seeds: int, on_run: Callable[[], None] | None = None) -> tuple[torch.nn.Module, list[float]]:
    """Train with seeds seed .. seed+n_seeds-1; the first run's network (the one exported) and every test accuracy.

    On a small test set one run's accuracy moves by a few test images between seeds, enough to reorder
    members; the mean over seeds is the architecture's figure.
    """
    net, acc = train(genotype, data, epochs, seed)
    accs = [float(acc)]
    for extra in range(n_seeds):
        if extra:
            accs.append(float(train(genotype, data, epochs, seed + extra)[1]))
        if on_run is not None:
            on_run()
    return net, accs


def _run_counter(progress: Callable, total: int) -> Callable[[], None] | None:
    """A callback reporting progress("train", runs done, total) after each stand-alone training run."""
    if total == 0:
        return None
    done = 0

    def on_run() -> None:
        nonlocal done
        done += 1
        progress("train", done, total)

    return on_run


def _train_network(genotype: Genotype, data: Any, epochs: int, seed: int) -> tuple[torch.nn.Module, float]:
    from hwnas.train import train_network

    return train_network(genotype, data, epochs, seed=seed)


def export_front(
    front: ParetoFront,
    out_dir: str | Path,
    profile: Any = None,
    train_epochs: int = 0,
    data: Any = None,
    threads: int | None = None,
    measure_fn: MeasureFn | None = None,
    measure: bool = True,
    seed: int = 0,
    tolerance: float = MAX_ABS_DIFF,
    train_fn: Callable | None = None,
    train_ids: Collection[str] | None = None,
    progress: Progress | None = None,
    scale_fn: ScaleFn | None = None,
    train_seeds: int = 1,
    workers: int = 0,
    scheduler: str | None = None,
) -> dict[str, Any]:
    """ONNX + checks + measured latency for every member; writes out_dir/export_report.json and returns it.

    `profile` (a DeviceProfile, or a list with one per input resolution of the front) supplies the
    measurement thread count and the noise ceiling the predicted/measured agreement is compared with.
    `data` is the dataset (a DataSplits, or a resolution -> DataSplits mapping). `train_ids` limits stand-alone training to those
    arch_ids (None: every member). A trained member is trained `train_seeds` times (seeds `seed`, `seed` + 1, ...): its
    test accuracy is the mean, and the first run is the network exported; `workers` > 1 or a Dask `scheduler` address trains
    all those runs on a Dask cluster first. A member failing any check keeps its row, with errors. After measuring,
    the profile's sentinel is timed again (`scale_fn`, default `sentinel_scale`) and the predictions are
    also reported rescaled by it, as `hwnas predict --rescale` would give them now.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to export directory {out_dir}: {err.strerror or err}") from None
    if not isinstance(train_epochs, int) or train_epochs < 0:
        raise ValueError(f"train_epochs must be a non-negative integer, got {train_epochs!r}")
    if not isinstance(train_seeds, int) or train_seeds < 1:
        raise ValueError(f"train_seeds must be a positive integer, got {train_seeds!r}")
    profiles = _by_macro(profile)
    first = next(iter(profiles.values()), None)
    from hwnas.profiling.sentinel_check import foreign_profiles_note

    # Another device's profile predicts that device: timings taken here would compare apples with pears.
    not_measured = foreign_profiles_note(list(profiles.values())) if measure and measure_fn is None else None
    if not_measured:
        log.warning("%s", not_measured)
        measure = False
    if threads is None:
        threads = int((first.device.get("threads") if first is not None else None) or 1)

    rows = []
    n = len(front.members)
    finished = _read_partial(out_dir)  # members a killed run already exported (and trained)
    epochs_of = [train_epochs if train_ids is None or m.arch_id in train_ids else 0 for m in front.members]
    keys = [_member_key(rank, m, epochs_of[rank], train_seeds, seed, tolerance) for rank, m in enumerate(front.members)]
    if any(k in finished for k in keys):  # one line before any work, so that even a run killed again reports it
        log.info("resuming %s: %d members already exported", out_dir, sum(k in finished for k in keys))
    parallel = train_epochs > 0 and data is not None and wants_dask(workers, scheduler)
    to_train = [m.genotype for m, k, e in zip(front.members, keys, epochs_of) if e > 0 and k not in finished]
    if parallel and to_train:  # every training run of the members still to export, spread over the cluster first
        train_fn = pretrained(to_train, lambda g: splits_at(data, g.macro.resolution), train_epochs,
                              range(seed, seed + train_seeds), train_fn or _train_network, workers, scheduler,
                              None if progress is None else lambda done, total: progress("train", done, total))
    on_run = None if parallel or progress is None else _run_counter(
        progress, sum(train_seeds for k, e in zip(keys, epochs_of) if e > 0 and k not in finished))
    for rank, member in enumerate(front.members):
        epochs, key = epochs_of[rank], keys[rank]
        row = finished.get(key)
        if row is None:
            row = _export_member(rank, member, out_dir, epochs, data, seed, tolerance, train_fn, train_seeds, on_run)
            if not row["errors"]:
                finished[key] = json.loads(json.dumps(row))
                atomic_write_json(out_dir / PARTIAL_NAME, {"schema_version": REPORT_VERSION,
                                                           "members": [{"key": k, "row": r} for k, r in finished.items()]})
        else:
            log.info("member %d (%s) was exported by an earlier run; kept", rank, member.arch_id)
        rows.append(row)
        if progress is not None:
            progress("export", rank + 1, n)

    measure_error = None
    if measure and rows:
        try:
            fn = measure_fn or _default_measure(threads, profiles, partial_dir=out_dir)
            measured = np.asarray(fn([m.genotype for m in front.members]), dtype=float).reshape(-1)
            if measured.shape != (n,):
                raise ValueError(f"measurement returned {measured.size} values for {n} models")
            for row, ms in zip(rows, measured):
                row["measured_latency_ms"] = float(ms)
                row["latency_ratio"] = float(ms / row["predicted_latency_ms"])
        except Exception as err:  # noqa: BLE001 - keep the export even if timing fails
            measure_error = f"{type(err).__name__}: {err}"
            log.warning("latency measurement failed: %s", measure_error)
            for row in rows:
                row["errors"].append(f"latency not measured ({measure_error})")
    sentinel, noise_now = None, None
    if measure and measure_error is None and rows:
        seen = {} if scale_fn is not None else getattr(fn, "sentinel_ms", {})
        sentinel = _sentinel_rescale(rows, [m.genotype for m in front.members], profiles, scale_fn, seen,
                                     getattr(fn, "attempts", {}))
        noise_now = _noise_now(getattr(fn, "halves", None))
    for row in rows:
        row["passed"] = not row["errors"]

    report = _report(rows, front, profiles, train_epochs, train_seeds, threads, tolerance, measure_error, sentinel)
    report["summary"]["noise_now_within_10pct"] = noise_now
    report["summary"]["not_measured"] = not_measured
    atomic_write_json(out_dir / REPORT_NAME, report)
    (out_dir / PARTIAL_NAME).unlink(missing_ok=True)
    return report


def _member_key(rank: int, member: FrontMember, epochs: int, seeds: int, seed: int, tolerance: float) -> str:
    """What decides a member's export: an earlier run's row is reused only when all of it is the same."""
    return json.dumps([rank, member.arch_id, epochs, seeds if epochs else 1, seed, tolerance])


def _read_partial(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Rows of members an interrupted export finished, whose files are still there (a damaged file: none)."""
    path = out_dir / PARTIAL_NAME
    if not path.exists():
        return {}
    try:
        data = load_json(path, "no partial export")
        entries = data["members"] if isinstance(data, dict) and data.get("schema_version") == REPORT_VERSION else []
        rows = {e["key"]: e["row"] for e in entries if isinstance(e, dict) and isinstance(e.get("row"), dict)}
    except (ValueError, KeyError, TypeError) as err:
        log.warning("%s: ignored (%s); every member is exported again", path, err)
        return {}
    return {k: r for k, r in rows.items() if isinstance(k, str) and all(
        isinstance(r.get(f), str) and (out_dir / r[f]).is_file() for f in ("arch", "onnx"))}


def _sentinel_rescale(rows: list[dict], genotypes: list[Genotype], profiles: dict[Any, Any],
                      scale_fn: ScaleFn | None, seen: dict[Any, float],
                      attempts: dict[Any, list[float]] | None = None) -> list[dict[str, Any]] | None:
    """Each profile's sentinel now (`seen` while measuring, else timed); add the rescaled prediction to its rows.

    `attempts`: per macro, the sentinel ratio of every measurement attempt (when the device drifted).
    """
    if not profiles:
        return None
    from hwnas.profiling.profiler import has_repeatable_sentinel

    if scale_fn is None:
        from hwnas.profiling.profiler import sentinel_scale as scale_fn
    out = []
    for macro, idx in _rows_by_macro(genotypes).items():
        profile = profiles.get(macro)
        if profile is None:
            log.warning("predictions at resolution %d not rescaled: no profile for that macro", macro.resolution)
            continue
        try:
            if np.isfinite(seen.get(macro, float("nan"))) and has_repeatable_sentinel(profile):
                now = float(seen[macro])
                scale = now / float(profile.sentinel["latency_ms"])
            else:
                scale, now = scale_fn(profile)
        except Exception as err:  # noqa: BLE001 - e.g. a profile without a repeatable sentinel: keep the export
            # Skip this macro only: rows of macros already done carry their rescaling, and the summary must list them.
            log.warning("predictions at resolution %d not rescaled: %s", macro.resolution, err)
            continue
        for i in idx:
            row = rows[i]
            row["predicted_rescaled_ms"] = row["predicted_latency_ms"] * scale
            if row["measured_latency_ms"] is not None:
                row["latency_ratio_rescaled"] = row["measured_latency_ms"] / row["predicted_rescaled_ms"]
        out.append({"profile": profile.name, "resolution": macro.resolution, "scale": scale, "now_ms": now,
                    "profile_ms": float(profile.sentinel["latency_ms"])})
        if attempts and len(attempts.get(macro, [])) > 1:
            out[-1]["attempts"] = attempts[macro]
    return out or None


def _noise_now(halves: np.ndarray | None) -> float | None:
    """Share of members whose two half measurements (even vs odd rounds) agree within the latency tolerance."""
    if halves is None or not np.isfinite(halves).all():
        return None
    from hwnas.predictors.metrics import noise_ceiling

    return noise_ceiling(halves[0], halves[1])["noise_ceiling_within_10pct"]


def _within(rows: list[dict], key: str) -> float | None:
    ratios = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
    return float(np.mean(np.abs(ratios - 1) <= LATENCY_TOLERANCE)) if ratios.size else None


def _report(rows: list[dict], front: ParetoFront, profiles: dict[Any, Any], train_epochs: int, train_seeds: int,
            threads: int, tolerance: float, measure_error: str | None, sentinel: list[dict[str, Any]] | None) -> dict[str, Any]:
    within = _within(rows, "latency_ratio")
    # Each member is held to the noise ceiling of the profile that predicted it; the front's is their mean.
    ceilings = [profiles[m.genotype.macro].validation.get("noise_ceiling_within_10pct")
                for m in front.members if m.genotype.macro in profiles]
    ceiling = float(np.mean(ceilings)) if ceilings and None not in ceilings else None
    acc = [r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]
    return {
        "schema_version": REPORT_VERSION,
        "tolerance": {"max_abs_diff": tolerance, "latency_within": LATENCY_TOLERANCE},
        "train_epochs": train_epochs,
        "train_seeds": train_seeds,
        "threads": threads,
        "profile": [p.name for p in profiles.values()] if len(profiles) > 1 else next((p.name for p in profiles.values()), None),
        "front": {"n_members": len(front.members), "hypervolume": front.hypervolume, "feasible": front.feasible},
        "summary": {
            "n": len(rows),
            "n_passed": sum(r["passed"] for r in rows),
            "max_abs_diff": max((r["max_abs_diff"] for r in rows if r["max_abs_diff"] is not None), default=None),
            "latency_within_10pct": within,
            "latency_within_10pct_rescaled": _within(rows, "latency_ratio_rescaled"),
            "sentinel": sentinel,
            "noise_ceiling_within_10pct": ceiling,
            "best_test_accuracy": max(acc) if acc else None,
            "measure_error": measure_error,
        },
        "members": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    """The terminal table of an export report: one line per member, then the summary."""
    head = f"{'#':>2} {'arch_id':16} {'params M':>8} {'est err%':>8} {'test acc%':>9} {'pred ms':>8} {'meas ms':>8} {'ratio':>6} {'max|diff|':>9}  status"
    lines = [head, "-" * len(head)]

    def fmt(v: Any, spec: str, scale: float = 1.0) -> str:
        return format(v * scale, spec) if v is not None else "-"

    for r in report["members"]:
        status = "ok" if r["passed"] else "FAIL: " + "; ".join(r["errors"])
        lines.append(
            f"{r['rank']:>2} {r['arch_id']:16} {fmt(r['params_m'], '8.4f')} {fmt(r['estimated_error'], '8.2f', 100)} "
            f"{fmt(r['test_accuracy'], '9.2f', 100)} {fmt(r['predicted_latency_ms'], '8.3f')} "
            f"{fmt(r['measured_latency_ms'], '8.3f')} {fmt(r['latency_ratio'], '6.2f')} {fmt(r['max_abs_diff'], '9.1e')}  {status}"
        )
    s = report["summary"]
    within = "-" if s["latency_within_10pct"] is None else f"{100 * s['latency_within_10pct']:.0f} %"
    ceiling = "-" if s["noise_ceiling_within_10pct"] is None else f"{100 * s['noise_ceiling_within_10pct']:.0f} %"
    line = f"{s['n_passed']}/{s['n']} passed all checks; measured within +-10 % of predicted: {within}"
    if s.get("latency_within_10pct_rescaled") is not None:
        scales = ", ".join(f"{x['scale']:.3f} ({x['resolution']}px)" for x in s.get("sentinel") or [])
        line += (f", of predicted x {scales} (sentinel now / at profiling): "
                 f"{100 * s['latency_within_10pct_rescaled']:.0f} %")
    noise = s.get("noise_now_within_10pct")
    noise = "" if noise is None else f"; this run's even vs odd rounds agree for {100 * noise:.0f} %"
    lines.append(f"{line} (profile noise ceiling {ceiling}{noise})")
    if s.get("not_measured"):
        lines.append(s["not_measured"])
    if report.get("train_seeds", 1) > 1 and s["best_test_accuracy"] is not None:
        lines.append(f"test acc %: mean of {report['train_seeds']} stand-alone runs (seeds); each ONNX file holds the first run")
    return "\n".join(lines)


def load_report(path: str | Path) -> dict[str, Any]:
    """Read an export_report.json; errors name the file."""
    data = load_json(path, "no such export report")
    if not isinstance(data, dict) or data.get("schema_version") != REPORT_VERSION:
        raise ValueError(f"{path}: not an hwnas export report (schema_version {REPORT_VERSION})")
    members, summary = data.get("members"), data.get("summary")
    if not isinstance(summary, dict) or not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise ValueError(f"{path}: not an hwnas export report (needs a 'summary' object and a 'members' list)")
    return data
