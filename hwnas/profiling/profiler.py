"""profile_device: time blocks and whole networks on this device, fit the predictors, validate them honestly."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from torch import nn

from hwnas.config import MacroConfig, ProfileConfig
from hwnas.profiling import runner, timer

from hwnas.profiling.blocks import (FULL_SHAPE, BlockSpec, ShapeKey, ShapeTables, blocks_section, fixed_blocks, op_blocks,
                                    shape_groups, shape_tables)
from hwnas.jsonio import atomic_write_json, dumps, parse_json, read_text
from hwnas.profiling.device_profile import DeviceProfile, read_json
from hwnas.profiling.onnx_io import onnx_bytes
from hwnas.space.genotype import N_STAGES, WIDTH_CHOICES, Genotype, SearchSpace
from hwnas.space.network import Network

log = logging.getLogger(__name__)

SIDECAR_SCHEMA_VERSION = 2  # 2: records of interleaved, paired timing (1: sentinel timed before the candidate)
SENTINEL_SEED = 20_240_917  # fixed: every profile and measurement of a macro times the same sentinel
Progress = Callable[[int, int, str], None]  # (advance, total, stage)


def sentinel_genotype(macro: MacroConfig) -> Genotype:
    """The fixed reference network re-timed before every candidate to track drift."""
    return SearchSpace(macro).sample(np.random.default_rng(SENTINEL_SEED))


def default_out(cfg: ProfileConfig) -> Path:
    """profiles/<device>.json unless --out says otherwise."""
    return Path(cfg.out) if cfg.out else Path("profiles") / f"{cfg.device}.json"


def sidecar_path(out: Path) -> Path:
    """Where the partial state of an interrupted profile lives."""
    return out.with_name(out.name + ".partial.json")


def sample_sets(macro: MacroConfig, n_cal: int, n_val: int, seed: int, depth: bool = False,
                width: bool = False) -> tuple[list[Genotype], list[Genotype]]:
    """Random calibration and held-out validation genotypes (of every depth and width if asked), disjoint from each
    other and the sentinel."""
    space, rng = SearchSpace(macro, depth=depth, width=width), np.random.default_rng(seed)
    out = space.sample_distinct(rng, n_cal + n_val, exclude={sentinel_genotype(macro).arch_id})
    return out[:n_cal], out[n_cal:]


def network_candidate(key: str, genotype: Genotype, batch: int = 1) -> timer.Candidate:
    """A whole network as a timing candidate (the same exporter settings as `export_onnx`)."""
    m = genotype.macro
    shape = (batch, m.in_channels, m.resolution, m.resolution)
    return timer.Candidate(key, onnx_bytes(Network(genotype), shape), shape)


def module_candidate(key: str, module: nn.Module, shape: tuple[int, ...]) -> timer.Candidate:
    """A single block as a timing candidate."""
    return timer.Candidate(key, onnx_bytes(module, shape), tuple(shape))


def journal_path(sidecar: Path) -> Path:
    """The append-only journal next to a partial profile: one line per timing since the last compaction."""
    return sidecar.with_name(sidecar.name + "l")  # <out>.partial.jsonl


class UnusablePartialState(ValueError):
    """A partial-state file that cannot be resumed: other settings, another hwnas version, or damaged."""


class _Sidecar:
    """Resumable partial state of a profile, so that no finished timing is ever measured twice.

    `<out>.partial.json` holds the config it belongs to and the records up to its last compaction (written
    atomically); `<out>.partial.jsonl` gets one line per timing the moment it finishes (a single appended
    write, so even SIGKILL loses nothing but the timing in progress). Every COMPACT_S seconds, on an
    interruption and when resuming, the journal is folded into the JSON file.
    """

    COMPACT_S = 30.0

    def __init__(self, path: Path, key: dict[str, Any], resume: bool) -> None:
        self.path, self.key, self.journal = path, key, journal_path(path)
        self.records: list[timer.Record] = []
        self.elapsed_before = 0.0
        if resume and (path.exists() or self.journal.exists()):
            if path.exists():
                self._read_header()
            self._read_journal()
            log.info("resuming %s: %d timings already done", path, len(self.records))
        elif resume:
            log.info("--resume: no partial state at %s, starting fresh", path)
        elif path.exists():
            log.info("replacing the partial state at %s (pass --resume to continue it instead)", path)
        self.done = {(k, r) for k, r, _, _ in self.records}
        self.save(self.elapsed_before)  # the header first: a journal is only ever read next to its config

    def _read_header(self) -> None:
        data = read_json(self.path, "partial profile")
        if not isinstance(data, dict) or data.get("schema_version") != SIDECAR_SCHEMA_VERSION:
            raise UnusablePartialState(f"{self.path}: not a partial profile of this hwnas version; delete it or run without --resume")
        config = data.get("config")
        if config != self.key:
            config = config if isinstance(config, dict) else {}
            diff = sorted(k for k in self.key if config.get(k) != self.key[k])
            raise UnusablePartialState(f"{self.path}: was started with different settings ({', '.join(diff)}); use the same flags or drop --resume")
        try:
            self.records = [_record(r) for r in data["records"]]
            self.elapsed_before = float(data.get("elapsed_s", 0.0))
        except (KeyError, TypeError, ValueError) as err:
            raise UnusablePartialState(f"{self.path}: malformed timing records ({err}); delete it or run without --resume") from None

    def _read_journal(self) -> None:
        if not self.journal.exists():
            return
        if not self.path.exists():
            raise UnusablePartialState(f"{self.journal}: timings without their {self.path.name}; delete it or run without --resume")
        lines = read_text(self.journal, "profile journal").splitlines()
        seen = {(k, r) for k, r, _, _ in self.records}
        for i, line in enumerate(lines):
            try:
                *rec, elapsed = parse_json(line, f"{self.journal}: line {i + 1}")
                rec = _record(rec)
            except (TypeError, ValueError) as err:
                if i == len(lines) - 1:  # the write a kill interrupted: that timing was not finished
                    break
                raise UnusablePartialState(f"{self.journal}: line {i + 1}: malformed timing record ({err}); delete it or run "
                                 "without --resume") from None
            if (rec[0], rec[1]) not in seen:
                seen.add((rec[0], rec[1]))
                self.records.append(rec)
            self.elapsed_before = max(self.elapsed_before, float(elapsed))

    def add(self, rec: timer.Record, elapsed: float) -> None:
        """Record one finished timing: in memory, and on disk at once (journal)."""
        self.records.append(rec)
        self.done.add((rec[0], rec[1]))
        with open(self.journal, "a") as f:
            f.write(dumps([*rec, elapsed]) + "\n")
        if time.monotonic() - self._last_save > self.COMPACT_S:
            self.save(elapsed)

    def save(self, elapsed: float) -> None:
        """Fold everything into the JSON file (atomically), then empty the journal."""
        atomic_write_json(self.path, {
            "schema_version": SIDECAR_SCHEMA_VERSION, "config": self.key,
            "elapsed_s": elapsed, "records": [list(r) for r in self.records],
        })
        self.journal.unlink(missing_ok=True)  # a kill before this line leaves duplicates, dropped on reading
        self._last_save = time.monotonic()

    def remove(self) -> None:
        """The profile is complete: no partial state is left behind."""
        self.path.unlink(missing_ok=True)
        self.journal.unlink(missing_ok=True)


def _record(r: Any) -> timer.Record:
    """A timing record from JSON: [key, round, candidate ms, sentinel ms or null]."""
    if not isinstance(r, (list, tuple)) or len(r) != 4:
        raise ValueError(f"expected [key, round, ms, sentinel ms], got {str(r)[:80]}")
    k, rnd, t, sent = r
    if not isinstance(k, str) or not isinstance(rnd, int) or isinstance(rnd, bool):
        raise ValueError(f"expected a key and a round number, got {str(r)[:80]}")
    return k, rnd, float(t), float("nan") if sent is None else float(sent)


@dataclass
class Plan:
    """What a profile measures: the sentinel, blocks, fixed parts, calibration and validation networks."""

    cfg: ProfileConfig
    sentinel: Genotype
    blocks: list[BlockSpec]
    fixed: dict[str, tuple[nn.Module, tuple[int, ...]]]
    calibration: list[Genotype]
    validation: list[Genotype]

    def jobs(self) -> list[tuple[str, Callable[[], timer.Candidate]]]:
        """(key, build candidate) per timed model, cheap first; building exports ONNX."""
        first = self.fixed["stem"][1]
        return [
            ("overhead", lambda: module_candidate("overhead", nn.Identity(), first)),
            *((f"fixed:{n}", lambda n=n, m=m, s=s: module_candidate(f"fixed:{n}", m, s)) for n, (m, s) in self.fixed.items()),
            *((f"block:{b.key}", lambda b=b: module_candidate(f"block:{b.key}", b.module(), b.input_shape)) for b in self.blocks),
            *((f"cal:{g.arch_id}", lambda g=g: network_candidate(f"cal:{g.arch_id}", g)) for g in self.calibration),
            *((f"val:{g.arch_id}", lambda g=g: network_candidate(f"val:{g.arch_id}", g)) for g in self.validation),
        ]


def make_plan(cfg: ProfileConfig) -> Plan:
    """The deterministic measurement plan of `cfg` (same seed, same networks: what makes --resume possible)."""
    cfg = cfg.resolved()
    sentinel = sentinel_genotype(cfg.macro)
    cal, val = sample_sets(cfg.macro, cfg.n_calibration, cfg.n_validation, cfg.seed, depth=cfg.elastic_depth,
                           width=cfg.elastic_width)
    return Plan(cfg, sentinel, op_blocks(cfg.macro, cfg.elastic_width), fixed_blocks(cfg.macro, sentinel, cfg.elastic_width),
                cal, val)


def profile_device(cfg: ProfileConfig, progress: Progress | None = None) -> DeviceProfile:
    """Measure this device for `cfg.macro`, fit the predictors, validate, write the profile; returns it."""
    from hwnas.profiling.fingerprint import device_fingerprint

    cfg = cfg.resolved()
    out = default_out(cfg)
    tcfg = timing_config(cfg)
    side = _Sidecar(sidecar_path(out), cfg.measurement_key(), cfg.resume)
    t_start = time.monotonic()
    elapsed = lambda: side.elapsed_before + time.monotonic() - t_start  # noqa: E731
    budget_s = cfg.budget_min * 60

    plan = make_plan(cfg)
    jobs = plan.jobs()
    total = len(jobs) + 1 + cfg.rounds * len(jobs)
    step = progress or (lambda advance, total, stage: None)
    sentinel = network_candidate("sentinel", plan.sentinel)
    candidates = []
    for _, make in jobs:
        candidates.append(make())
        step(1, total, "export")
    step(1, total, "export")
    step(len(side.records), total, "resumed")

    try:  # the loop of the bundle runner (hwnas.profiling.runner): a local profile is timed like a device's
        rounds_run = runner.measure_rounds(
            candidates, sentinel, tcfg, side.records, seed=cfg.seed, budget_s=budget_s, elapsed=elapsed,
            on_record=lambda rec: (side.add(rec, elapsed()), step(1, total, f"round {rec[1] + 1}/{cfg.rounds}")),
        )
    except BaseException:
        side.save(elapsed())  # interrupted: keep every finished timing for --resume
        raise
    side.save(elapsed())

    profile = profile_from_records(plan, side.records, device_fingerprint())
    profile.meta.update({"elapsed_s": round(elapsed(), 1), "rounds_completed": rounds_run})
    profile.save(out)
    if rounds_run == cfg.rounds:
        side.remove()
    log.info("wrote %s", out)
    return profile


def timing_config(cfg: ProfileConfig) -> timer.TimingConfig:
    """The timer settings a profile config implies."""
    return timer.TimingConfig(threads=cfg.threads, optimization_level=cfg.optimization_level,
                              warmup=cfg.warmup, runs=cfg.runs, rounds=cfg.rounds, provider=cfg.provider,
                              provider_options=cfg.provider_options)


def profile_from_records(plan: Plan, records: Sequence[timer.Record], fingerprint: dict[str, Any]) -> DeviceProfile:
    """Turn timing records into a DeviceProfile: block tables, measured sets, fitted predictors, validation."""
    from hwnas.predictors import encode_all

    cfg, blocks, fixed_names = plan.cfg, plan.blocks, list(plan.fixed)
    cal, val, sentinel_g, tcfg = plan.calibration, plan.validation, plan.sentinel, timing_config(plan.cfg)
    sent_ref = timer.sentinel_median(records, tcfg.drift_window)
    kw = tcfg.reduction()
    lat = timer.combine(records, sent_ref, **kw)
    lat_a, lat_b = timer.split_halves(records, sent_ref, cfg.rounds, **kw)
    missing = [k for k in ["overhead", *(f"fixed:{n}" for n in fixed_names), *(f"block:{b.key}" for b in blocks)] if k not in lat]
    val_ok = [g for g in val if f"val:{g.arch_id}" in lat_a and f"val:{g.arch_id}" in lat_b]
    cal_ok = [g for g in cal if f"cal:{g.arch_id}" in lat]
    if missing or len(val_ok) < 3 or len(cal_ok) < 3:
        raise ValueError("too few timings to build a profile (budget too small?); run again with --resume")

    overhead = lat["overhead"]
    # A block's own cost is its session time minus the cost of running an empty graph.
    ops_ms = {b.key: max(lat[f"block:{b.key}"] - overhead, 0.0) for b in blocks}
    fixed_ms = {n: max(lat[f"fixed:{n}"] - overhead, 0.0) for n in fixed_names}
    section = blocks_section(overhead, fixed_ms, ops_ms, cfg.elastic_width)
    y_cal = np.array([lat[f"cal:{g.arch_id}"] for g in cal_ok])
    y_a = np.array([lat_a[f"val:{g.arch_id}"] for g in val_ok])
    y_b = np.array([lat_b[f"val:{g.arch_id}"] for g in val_ok])
    fitted, default, validation = fit_predictors(cfg.macro, section, cal_ok, y_cal, val_ok, y_a, y_b, cfg.seed)

    device = {
        "name": cfg.device, **fingerprint, "provider": cfg.provider, "provider_options": dict(cfg.provider_options),
        "threads": cfg.threads, "graph_optimization_level": f"ORT_ENABLE_{cfg.optimization_level.upper()}"
        if cfg.optimization_level != "disable" else "ORT_DISABLE_ALL",
        "execution_mode": "ORT_SEQUENTIAL", "allow_spinning": False, "timing": tcfg.to_dict(),
        "methodology": "fresh session per candidate per round, input bound once (io_binding), first run discarded, "
                       "warm-up, median of timed runs; rounds interleaved in shuffled order; candidate and sentinel "
                       "sessions open together, runs alternating in blocks of timing.interleave; candidate scaled by "
                       "its own sentinel to the run's undisturbed sentinel level (moving minimum); median over rounds",
    }
    return DeviceProfile(
        name=cfg.device, device=device, macro=cfg.macro, validation=validation,
        sentinel={"arch": sentinel_g.to_dict(), "arch_id": sentinel_g.arch_id, "latency_ms": sent_ref},
        blocks=section,
        calibration=[{**shape_entry(g, x), "latency_ms": float(y)} for g, x, y in zip(cal_ok, encode_all(cal_ok), y_cal)],
        validation_set=[{**shape_entry(g, x), "latency_ms_a": float(a), "latency_ms_b": float(b)}
                        for g, x, a, b in zip(val_ok, encode_all(val_ok), y_a, y_b)],
        predictors=fitted, default_predictor=default,
        meta={"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": cfg.measurement_key(),
              "quick": cfg.quick, "n_records": len(records)},
    )


def shape_entry(genotype: Genotype, x: np.ndarray) -> dict[str, Any]:
    """How a measured network is stored in a profile: its id, 32-integer cell encoding, depth and width spelled out."""
    return {"arch_id": genotype.arch_id, "x": x.tolist(), "depth": list(genotype.stage_depth),
            "width": list(genotype.stage_width)}


def entry_genotype(macro: MacroConfig, entry: dict[str, Any]) -> Genotype:
    """The network a profile's calibration or validation entry stores (entries before elastic width: full width)."""
    from dataclasses import replace

    return replace(SearchSpace(macro).decode(entry["x"]), depth=tuple(entry.get("depth", ())),
                   width=tuple(entry.get("width", ())))


def fit_predictors(macro: MacroConfig, blocks_section: dict[str, Any], cal: Sequence[Genotype], y_cal: np.ndarray,
                   val: Sequence[Genotype], y_a: np.ndarray, y_b: np.ndarray,
                   seed: int = 0) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Every predictor fitted on the calibration networks and validated on the held-out ones (two measurements).

    Returns (fitted parameters by name, the default chosen by cross-validated error, the validation block).
    """
    from hwnas.predictors import PREDICTORS, encode_all

    tables = shape_tables(macro, blocks_section, [g.shape_key for g in [*cal, *val]])
    x_cal, x_val = encode_all(cal), encode_all(val)
    cal_keys, val_keys = [g.shape_key for g in cal], [g.shape_key for g in val]
    cal_groups = shape_groups(cal_keys, tables)
    fitted, per_pred, cv, val_pred = {}, {}, {}, {}
    for name, cls in PREDICTORS.items():
        pred = cls(*tables[FULL_SHAPE]).fit_encoded(x_cal, y_cal, cal_groups)
        fitted[name] = pred.to_dict()
        val_pred[name] = predict_shapes(pred, x_val, val_keys, tables)
        per_pred[name] = validation_figures(val_pred[name], y_a, y_b)
        cv[name] = cv_mape(cls, tables, x_cal, y_cal, cal_keys, seed=seed)
    default = min(cv, key=cv.get)  # chosen on the calibration set, so the held-out figures stay honest
    validation = {**per_pred[default], "predictor": default, "per_predictor": per_pred,
                  "cv_mape_calibration": cv, "compared_against": "each figure is the mean of the predictor vs measurement A (even rounds) and vs measurement B (odd rounds)"}
    if any(g.width for g in val):
        validation["per_width"] = per_width_figures(val_pred[default], [g.stage_width for g in val], y_a, y_b)
    return fitted, default, validation


def refit_profile(profile: DeviceProfile) -> DeviceProfile:
    """The profile with its predictors fitted again from the measurements it stores (no timing): what a newer
    hwnas predictor makes of the same records."""
    from dataclasses import replace

    def genotypes(entries: list[dict[str, Any]]) -> list[Genotype]:
        return [entry_genotype(profile.macro, e) for e in entries]

    try:
        cal, val = genotypes(profile.calibration), genotypes(profile.validation_set)
        y_cal = np.array([e["latency_ms"] for e in profile.calibration], dtype=float)
        y_a = np.array([e["latency_ms_a"] for e in profile.validation_set], dtype=float)
        y_b = np.array([e["latency_ms_b"] for e in profile.validation_set], dtype=float)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"profile {profile.name!r}: stored measurements are incomplete ({err})") from None
    narrow = next((g for g in [*cal, *val] if not profile.covers_width(g.width)), None)
    if narrow is not None:  # a hand-edited or mixed-up file: its blocks cannot give that width's table
        raise ValueError(f"profile {profile.name!r}: measured network {narrow.arch_id} has width {list(narrow.width)}, "
                         f"but the blocks cover stage widths {list(profile.widths)} only; re-profile with elastic width")
    fitted, default, validation = fit_predictors(profile.macro, profile.blocks, cal, y_cal, val, y_a, y_b,
                                                 int(profile.meta.get("config", {}).get("seed", 0)))
    meta = {**profile.meta, "refitted": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return replace(profile, predictors=fitted, default_predictor=default, validation=validation, meta=meta)


def validation_figures(pred: np.ndarray, meas_a: np.ndarray, meas_b: np.ndarray) -> dict[str, Any]:
    """Predictor vs each of the two independent measurements (averaged), next to their noise ceiling."""
    from hwnas.predictors.metrics import agreement, noise_ceiling

    fa, fb = agreement(pred, meas_a), agreement(pred, meas_b)
    figs: dict[str, Any] = {k: (fa[k] + fb[k]) / 2 for k in fa if k != "n"}
    figs["n"] = fa["n"]
    figs.update(noise_ceiling(meas_a, meas_b))
    figs["latency_range_ms"] = [float(np.min(meas_a)), float(np.max(meas_a))]
    return figs


def per_width_figures(pred: np.ndarray, widths: Sequence[tuple[float, ...]], meas_a: np.ndarray,
                      meas_b: np.ndarray) -> list[dict[str, Any]]:
    """MAPE and share within +-10 % (mean vs A and vs B) of the held-out networks running stage s at fraction w, per
    (s, w): the validated accuracy at every width (per stage, so each figure rests on about a third of the networks)."""
    from hwnas.predictors.metrics import agreement

    rows = []
    for stage in range(N_STAGES):
        for w in WIDTH_CHOICES:
            sel = np.array([ws[stage] == w for ws in widths])
            if sel.any():
                fa, fb = agreement(pred[sel], meas_a[sel]), agreement(pred[sel], meas_b[sel])
                rows.append({"stage": stage, "width": w, "n": int(sel.sum()), "mape": (fa["mape"] + fb["mape"]) / 2,
                             "within_10pct": (fa["within_10pct"] + fb["within_10pct"]) / 2})
    return rows


def predict_shapes(pred: Any, x: np.ndarray, keys: Sequence[ShapeKey], tables: ShapeTables) -> np.ndarray:
    """Predictions of a full-depth, full-width predictor for encodings `x` whose networks have the given shape keys
    (Genotype.shape_key: depth, width): each group through its own blocks, the fitted coefficients kept."""
    out = np.empty(len(x))
    for rows, table, fixed, counts in shape_groups(keys, tables):
        depth, width = keys[rows[0]]
        moved = pred.with_blocks(table, fixed, depth, counts, width=width) if (depth or width) else pred
        out[rows] = moved.predict_encoded(x[rows])
    return out


def cv_mape(cls: type, tables: ShapeTables, x: np.ndarray, y: np.ndarray, keys: Sequence[ShapeKey],
            folds: int = 5, seed: int = 0) -> float:
    """K-fold cross-validated MAPE (%) on the calibration set (`keys`: each network's shape key)."""
    idx = np.random.default_rng(seed).permutation(len(y))
    errs = []
    for part in np.array_split(idx, min(folds, len(y))):
        train = np.setdiff1d(idx, part)
        pred = cls(*tables[FULL_SHAPE]).fit_encoded(x[train], y[train], shape_groups([keys[i] for i in train], tables))
        errs.append(np.abs(predict_shapes(pred, x[part], [keys[i] for i in part], tables) / y[part] - 1))
    return float(np.mean(np.concatenate(errs)) * 100)


@dataclass(frozen=True)
class Measurement:
    """Measured latency (ms) per model, the sentinel level seen meanwhile, and the even/odd-round halves."""

    ms: np.ndarray
    sentinel_ms: float
    ms_a: np.ndarray  # from the even rounds only: with ms_b, two independent measurements (the noise now)
    ms_b: np.ndarray


def measure_genotypes(
    genotypes: list[Genotype], threads: int = 1, rounds: int = 4, runs: int = 100, warmup: int = 10,
    optimization_level: str = "all", sentinel: bool = True, progress: Progress | None = None,
    detailed: bool = False, seed: int = 0, interleave: int = timer.TimingConfig.interleave,
    partial: str | Path | None = None, resume: bool = False,
    provider: str = "CPUExecutionProvider", provider_options: dict[str, str] | None = None,
) -> np.ndarray | Measurement:
    """Measured latency (ms) of each genotype with the profiling methodology; `detailed`: a Measurement.

    `partial`: a file that keeps every finished timing as it is taken (with a .jsonl journal beside it, as a
    profile's sidecar), so that a run killed at any point and repeated with `resume` measures only what is
    left; it is removed when the measurement completes. Without `resume` an existing one is replaced.
    """
    if not genotypes:
        empty = np.zeros(0)
        return Measurement(empty, float("nan"), empty, empty) if detailed else empty
    macros = {g.macro for g in genotypes}
    if len(macros) != 1:
        raise ValueError(f"all architectures must share one macro config to be measured together, got {len(macros)}")
    tcfg = timer.TimingConfig(threads=threads, optimization_level=optimization_level, warmup=warmup, runs=runs,
                              rounds=rounds, sentinel=sentinel, interleave=interleave,
                              combine="median" if sentinel and interleave > 0 else "min", provider=provider,
                              provider_options=provider_options or {})
    keys = [f"{i}:{g.arch_id}" for i, g in enumerate(genotypes)]
    cands = [network_candidate(k, g) for k, g in zip(keys, genotypes)]
    sent = network_candidate("sentinel", sentinel_genotype(genotypes[0].macro)) if sentinel else None
    total = rounds * len(cands)
    step = (lambda n: progress(n, total, "measure")) if progress else None
    if partial is None:
        lat, records = timer.measure_models(cands, tcfg, sent, seed=seed, progress=step)
    else:
        records = _measure_resumable(cands, tcfg, sent, seed, Path(partial), resume, step)
        lat = timer.combine(records, **tcfg.reduction())
    ms = np.array([lat[k] for k in keys])
    if not detailed:
        return ms
    ref = timer.sentinel_median(records, tcfg.drift_window)
    halves = timer.split_halves(records, None if np.isnan(ref) else ref, rounds, **tcfg.reduction())
    a, b = (np.array([h.get(k, np.nan) for k in keys]) for h in halves)
    return Measurement(ms, ref, a, b)


def _measure_resumable(cands: list[timer.Candidate], tcfg: timer.TimingConfig, sentinel: timer.Candidate | None,
                       seed: int, partial: Path, resume: bool, step: Callable[[int], None] | None) -> list[timer.Record]:
    """timer.measure_models, every finished timing kept in `partial` and skipped when resumed."""
    key = {"kind": "measure", "models": [c.key for c in cands], **tcfg.to_dict(), "seed": seed}
    side = _Sidecar(partial, key, resume)
    if step is not None and side.records:
        step(len(side.records))
    t0, before = time.monotonic(), side.elapsed_before
    for r in range(tcfg.rounds):
        timer.run_round(cands, r, tcfg, sentinel if tcfg.sentinel else None, seed=seed,
                        done=lambda k, rr: (k, rr) in side.done,
                        on_record=lambda rec: (side.add(rec, before + time.monotonic() - t0), step and step(1)))
    records = list(side.records)
    side.remove()
    return records


def has_repeatable_sentinel(profile: DeviceProfile) -> bool:
    """Whether the profile stores its sentinel network and latency (so now / then is meaningful)."""
    from hwnas.profiling.sentinel_check import sentinel_arch

    if not isinstance(profile.sentinel, dict) or not profile.sentinel.get("latency_ms"):
        return False
    try:
        sentinel_arch(profile)
    except ValueError:
        return False
    return True


def sentinel_scale(profile: DeviceProfile, pairs: int | None = None) -> tuple[float, float]:
    """(now / at profiling, sentinel ms now): the profile's stored sentinel network timed now as the profile did.

    Multiplying predictions by the ratio follows changes of the device's speed since profiling (CPU
    frequency, thermal state, background load) that affect all networks alike. The sentinel is timed
    interleaved with calibration networks and reduced with the profile's statistic (the median of a moving
    minimum of session medians): timed alone in fresh sessions it runs faster than in the profile's rounds.
    """
    from hwnas.profiling.sentinel_check import measure_sentinel

    if not has_repeatable_sentinel(profile):
        raise ValueError(f"profile {profile.name!r} has no sentinel measurement this version of hwnas can repeat")
    now = measure_sentinel(profile, pairs)
    return now / float(profile.sentinel["latency_ms"]), now
