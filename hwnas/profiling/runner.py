"""The on-device runner of an hwnas bundle: times the bundle's ONNX models exactly as a local profile does.

Needs only Python >= 3.9, numpy and onnxruntime. A bundle holds this file as `run.py` next to
`hwnas_timer.py` (a copy of hwnas/profiling/timer.py, the timing methodology), `manifest.json` and the
models; inside hwnas it is `hwnas.profiling.runner`, so the local profiler runs the very same loop.

    python3 DIR/run.py [--provider P] [--threads N]

writes DIR/measurements.json (the timing records and this device's fingerprint). Every finished timing is
saved atomically to DIR/measurements.partial.json at once: an interrupted run (Ctrl-C, a dropped SSH
connection, a reboot) continues where it stopped when started again, and never times finished work twice.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

if __package__:  # imported as hwnas.profiling.runner
    from . import fingerprint as _fingerprint
    from . import timer
else:  # run as DIR/run.py: the timer and the fingerprint are the copies next to it
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import hwnas_timer as timer  # type: ignore[no-redef]
    try:
        import hwnas_fingerprint as _fingerprint  # type: ignore[no-redef]
    except ImportError:  # a bundle without it: the basic fingerprint below
        _fingerprint = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MEASUREMENTS_NAME = "measurements.json"
PARTIAL_NAME = "measurements.partial.json"
LOCK_NAME = ".runner.lock"
MANIFEST_KIND = "hwnas-bundle"
MANIFEST_SCHEMA_VERSION = 1
MEASUREMENTS_KIND = "hwnas-measurements"
MEASUREMENTS_SCHEMA_VERSION = 1
Progress = Callable[[int, int, str], None]  # (done, total, stage)


class BundleError(ValueError):
    """A bundle, its manifest or its measurements are unusable; the message names the file and field."""


# --- files ---------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temp file and a rename: a reader (or a resumed run) never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, str(path))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json_file(path: Path, what: str) -> Any:
    """Parse a JSON file; BundleError naming the file when it is missing or corrupt."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: no such {what}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: {what} is not valid JSON ({err})") from None


def read_manifest(bundle_dir: Path) -> Dict[str, Any]:
    """The bundle's manifest, checked for kind, schema version and the fields the runner needs."""
    path = Path(bundle_dir) / MANIFEST_NAME
    data = read_json_file(path, "bundle manifest")
    if not isinstance(data, dict) or data.get("kind") != MANIFEST_KIND:
        raise BundleError(f"{path}: not an hwnas bundle manifest (kind must be {MANIFEST_KIND!r})")
    if data.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise BundleError(f"{path}: schema_version {data.get('schema_version')!r} is not {MANIFEST_SCHEMA_VERSION} "
                          "(bundle written by another hwnas version; write it again)")
    groups = data.get("groups")
    if not isinstance(groups, list) or not groups:
        raise BundleError(f"{path}: field 'groups' must be a non-empty list")
    for i, g in enumerate(groups):
        entries = [g.get("sentinel")] + list(g.get("models") or []) if isinstance(g, dict) else [None]
        if not isinstance(g, dict) or not isinstance(g.get("name"), str) or not g.get("models"):
            raise BundleError(f"{path}: groups[{i}] needs a 'name' and a non-empty 'models' list")
        for e in entries:
            if e is not None and not (isinstance(e, dict) and {"key", "file", "input_shape", "sha256"} <= set(e)):
                raise BundleError(f"{path}: groups[{i}] has a model entry without key, file, input_shape and sha256")
    try:
        timing_config(data)
    except (TypeError, ValueError) as err:
        raise BundleError(f"{path}: field 'timing' is not a timing configuration of this runner ({err})") from None
    return data


def manifest_sha256(bundle_dir: Path) -> str:
    """SHA-256 of the manifest file: measurements and partial state name the bundle they belong to by it."""
    return sha256_bytes((Path(bundle_dir) / MANIFEST_NAME).read_bytes())


def timing_config(manifest: Dict[str, Any], provider: Optional[str] = None,
                  threads: Optional[int] = None) -> "timer.TimingConfig":
    """The manifest's timing config with the device's own provider and thread count, if given."""
    cfg = timer.TimingConfig(**manifest["timing"])
    if threads is not None:
        cfg = replace(cfg, threads=int(threads))
    if provider is not None:
        names = {f.name for f in fields(cfg)}
        if "provider" in names:
            cfg = replace(cfg, provider=provider)
        elif provider != "CPUExecutionProvider":
            raise BundleError(f"--provider {provider}: this bundle's timer times with CPUExecutionProvider only")
    return cfg


def load_models(bundle_dir: Path, group: Dict[str, Any]) -> "tuple[Optional[timer.Candidate], List[timer.Candidate]]":
    """The group's sentinel and models as timing candidates; every file checked against its manifest hash."""
    def load(entry: Dict[str, Any]) -> "timer.Candidate":
        path = Path(bundle_dir) / entry["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BundleError(f"{path}: model file of {entry['key']!r} is missing") from None
        if sha256_bytes(data) != entry["sha256"]:
            raise BundleError(f"{path}: sha256 differs from the manifest's (corrupt or changed model file)")
        return timer.Candidate(str(entry["key"]), data, tuple(int(d) for d in entry["input_shape"]))

    sentinel = load(group["sentinel"]) if group.get("sentinel") else None
    return sentinel, [load(e) for e in group["models"]]


# --- the device's fingerprint ----------------------------------------------------------------------------------
# hwnas/profiling/fingerprint.py (stdlib + onnxruntime only) is copied into the bundle as hwnas_fingerprint.py, so
# the device describes itself with the keys hwnas compares; the basic reader here is the fallback.

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
             "amx_int8", "amx_bf16", "neon", "asimd", "asimddp", "asimdhp", "sve", "sve2", "i8mm", "bf16")


def _basic_fingerprint() -> Dict[str, Any]:
    """CPU model, vendor/family/model/stepping, ISA, cores, OS and Python from /proc/cpuinfo and platform."""
    first: Dict[str, str] = {}
    path = Path("/proc/cpuinfo")
    for line in (path.read_text(errors="replace") if path.exists() else "").splitlines():
        k, sep, v = line.partition(":")
        if sep:
            first.setdefault(k.strip().lower(), v.strip())
    name = next((first[k] for k in ("model name", "model", "hardware") if first.get(k) and not first[k].isdigit()),
                platform.processor() or platform.machine())
    out: Dict[str, Any] = {"cpu_model": name, "cpu_vendor": first.get("vendor_id") or first.get("cpu implementer")}
    for key, field in (("cpu family", "cpu_family"), ("model", "cpu_model_id"), ("stepping", "cpu_stepping")):
        if first.get(key, "").isdigit():
            out[field] = int(first[key])
    flags = first.get("flags") or first.get("features")
    if flags is not None:
        out["isa"] = sorted(f for f in ISA_FLAGS if f in set(flags.split()))
        out["hypervisor"] = "hypervisor" in flags.split()
    try:
        out["cores"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        out["cores"] = os.cpu_count() or 1
    out.update(machine=platform.machine(), system=platform.system(), kernel=platform.release(),
               python=platform.python_version())
    return {k: v for k, v in out.items() if v is not None}


def fingerprint(cfg: "timer.TimingConfig") -> Dict[str, Any]:
    """What identifies this device for latency: CPU, ISA, cores, OS, runtime versions, provider and threads."""
    import numpy as np
    import onnxruntime as ort

    out = _basic_fingerprint()
    if _fingerprint is not None:
        try:
            out.update(_fingerprint.device_fingerprint())
        except Exception as err:  # noqa: BLE001 - a reader failing on an unusual board must not stop the run
            log.warning("the full fingerprint could not be read (%s); recording the basic one", err)
    out.update({
        "numpy_version": np.__version__, "onnxruntime_version": ort.__version__,
        "providers": ort.get_available_providers(), "provider": getattr(cfg, "provider", "CPUExecutionProvider"),
        "provider_options": dict(getattr(cfg, "provider_options", ()) or ()), "threads": cfg.threads,
    })
    return out


# --- the timing loop shared with the local profiler -------------------------------------------------------


def measure_rounds(
    candidates: Sequence["timer.Candidate"], sentinel: "Optional[timer.Candidate]", cfg: "timer.TimingConfig",
    records: List["timer.Record"], seed: int = 0, budget_s: float = float("inf"),
    elapsed: Optional[Callable[[], float]] = None, on_record: Optional[Callable[["timer.Record"], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> int:
    """Time every (candidate, round) not in `records` yet, round by round; returns the rounds completed.

    A new round starts only when at least two are done and the time budget allows it (two rounds are the
    least the validation's two independent measurements need). `on_record` sees each timing as it is made.
    """
    done = {(k, r) for k, r, _, _ in records}
    elapsed = elapsed or (lambda: 0.0)
    t_timing, n_before, rounds_run = time.monotonic(), len(records), 0
    for r in range(cfg.rounds):
        pending = sum((c.key, r) not in done for c in candidates)
        if pending == 0:
            rounds_run += 1
            continue
        per_task = (time.monotonic() - t_timing) / max(len(records) - n_before, 1)
        if rounds_run >= 2 and elapsed() + pending * per_task > budget_s:
            log.warning("time budget of %.1f min reached after %d of %d rounds; the measurements end there",
                        budget_s / 60, rounds_run, cfg.rounds)
            break

        def add(rec: "timer.Record") -> None:
            done.add((rec[0], rec[1]))
            if on_record is not None:
                on_record(rec)

        timer.run_round(candidates, r, cfg, sentinel if cfg.sentinel else None, seed=seed,
                        done=lambda k, rr: (k, rr) in done, on_record=add, should_stop=should_stop)
        if any((c.key, r) not in done for c in candidates):
            break  # stopped inside the round
        rounds_run += 1
    return rounds_run


# --- the resumable run of a bundle --------------------------------------------------------------------------


class _State:
    """Every record so far per group, saved atomically to the partial file after each one."""

    def __init__(self, path: Path, key: Dict[str, Any], restart: bool) -> None:
        self.path, self.key = path, key
        self.records: Dict[str, List[timer.Record]] = {}
        self.sessions: List[Dict[str, Any]] = []
        self.elapsed_before = 0.0
        if path.exists() and not restart:
            data = read_json_file(path, "partial measurements")
            if not isinstance(data, dict) or data.get("kind") != MEASUREMENTS_KIND + "-partial":
                raise BundleError(f"{path}: not partial hwnas measurements; delete it or pass --restart")
            if data.get("key") != key:
                old = data.get("key") or {}
                diff = sorted(k for k in set(key) | set(old) if old.get(k) != key.get(k))
                raise BundleError(f"{path}: was started with other settings ({', '.join(diff)}); use the same "
                                  "--provider/--threads, or pass --restart to measure again from scratch")
            try:
                self.records = {g: [(str(k), int(r), float(t), float(s)) for k, r, t, s in recs]
                                for g, recs in data["records"].items()}
                self.sessions = list(data.get("sessions", []))
                self.elapsed_before = float(data.get("elapsed_s", 0.0))
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise BundleError(f"{path}: malformed timing records ({err}); delete it or pass --restart") from None
        self.t0 = time.monotonic()
        self.session = {"started": _now(), "resumed_with": self.n_records(), "timed": 0}
        self.sessions.append(self.session)

    def n_records(self) -> int:
        return sum(len(v) for v in self.records.values())

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.t0

    def add(self, group: str, rec: "timer.Record") -> None:
        self.records.setdefault(group, []).append(rec)
        self.session["timed"] += 1
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, {
            "kind": MEASUREMENTS_KIND + "-partial", "key": self.key, "elapsed_s": round(self.elapsed(), 3),
            "sessions": self.sessions, "records": {g: [list(r) for r in v] for g, v in self.records.items()},
        })


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Lock:
    """An exclusive lock on the bundle: a runner left behind by a dropped connection finishes or dies first."""

    def __init__(self, path: Path) -> None:
        self.path, self.f = path, None

    def __enter__(self) -> "_Lock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no second runner to fear from a dropped SSH session
            return self
        self.f = open(self.path, "w")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.warning("another runner is working on this bundle; waiting for it to stop")
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.f is not None:
            self.f.close()


def run_bundle(
    bundle_dir: Path, provider: Optional[str] = None, threads: Optional[int] = None,
    budget_min: Optional[float] = None, progress: Optional[Progress] = None, restart: bool = False,
    stop_after: Optional[int] = None,
) -> Dict[str, Any]:
    """Time every model of the bundle (resuming its partial state); writes and returns measurements.json's object.

    `stop_after`: stop (as an interruption would) after timing that many models in this session.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    cfg = timing_config(manifest, provider, threads)
    _check_provider(getattr(cfg, "provider", provider or "CPUExecutionProvider"))
    m_sha = manifest_sha256(bundle_dir)
    budget = budget_min if budget_min is not None else manifest.get("budget_min")
    budget_s = float(budget) * 60 if budget else float("inf")
    groups = manifest["groups"]
    total = cfg.rounds * sum(len(g["models"]) for g in groups)
    with _Lock(bundle_dir / LOCK_NAME):
        state = _State(bundle_dir / PARTIAL_NAME, {"manifest_sha256": m_sha, "timing": cfg.to_dict()}, restart)
        step = progress or (lambda done, total, stage: None)
        step(state.n_records(), total, "resumed" if state.n_records() else "start")
        rounds: Dict[str, int] = {}
        should_stop = (lambda: state.session["timed"] >= stop_after) if stop_after is not None else None
        for group in groups:
            name = group["name"]
            sentinel, cands = load_models(bundle_dir, group)
            records = state.records.setdefault(name, [])

            def on_record(rec: "timer.Record", name: str = name) -> None:
                state.add(name, rec)
                step(state.n_records(), total, f"{name} round {rec[1] + 1}/{cfg.rounds}")

            rounds[name] = measure_rounds(cands, sentinel, cfg, records, seed=int(manifest.get("seed", 0)),
                                          budget_s=budget_s, elapsed=state.elapsed, on_record=on_record,
                                          should_stop=should_stop)
            if should_stop is not None and should_stop():
                state.save()
                raise KeyboardInterrupt(f"stopped after {stop_after} timings (--stop-after)")
        state.save()
        out = {
            "schema_version": MEASUREMENTS_SCHEMA_VERSION, "kind": MEASUREMENTS_KIND, "created": _now(),
            "bundle": manifest.get("name"), "purpose": manifest.get("purpose"), "manifest_sha256": m_sha,
            "timing": cfg.to_dict(), "fingerprint": fingerprint(cfg), "elapsed_s": round(state.elapsed(), 1),
            "rounds_completed": rounds, "complete": all(n == cfg.rounds for n in rounds.values()),
            "sessions": state.sessions, "records": {g: [list(r) for r in v] for g, v in state.records.items()},
        }
        write_json_atomic(bundle_dir / MEASUREMENTS_NAME, out)
    return out


def _check_provider(provider: str) -> None:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        raise BundleError(f"--provider {provider} is not available in this onnxruntime; available: {', '.join(available)}")


# --- command line ------------------------------------------------------------------------------------------


def _printer(json_lines: bool) -> Progress:
    """Progress to stdout: JSON lines for a transport to parse, or a line every few seconds for a person."""
    seen: Dict[str, float] = {}  # first count seen (resumed work is not part of the rate), last print time

    def show(done: int, total: int, stage: str) -> None:
        now = time.monotonic()
        if not seen:
            seen.update(first=done, t0=now, last=0.0)
        if json_lines:
            line = json.dumps({"progress": done, "total": total, "stage": stage})
        elif now - seen["last"] >= 2.0 or done >= total:
            rate = (now - seen["t0"]) / (done - seen["first"]) if done > seen["first"] else 0.0
            eta = f", about {rate * (total - done):.0f} s left" if rate else ""
            line = f"{done}/{total} timings ({stage}){eta}"
        else:
            return
        seen["last"] = now
        print(line, flush=True)  # a dead SSH pipe raises here, which stops this runner at once

    return show


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python3 run.py [--provider P] [--threads N]`: time the bundle this file lives in."""
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description="Time this hwnas bundle's models on this device (resumable).")
    p.add_argument("--bundle", default=str(here), help="bundle folder (default: the folder of this file)")
    p.add_argument("--provider", default=None, help="onnxruntime execution provider (default: the bundle's)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the bundle's)")
    p.add_argument("--budget-min", type=float, default=None, help="time budget in minutes (default: the bundle's)")
    p.add_argument("--restart", action="store_true", help="discard the partial measurements and start again")
    p.add_argument("--progress-json", action="store_true", help="progress as JSON lines (for hwnas transports)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: interrupt after N
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s run.py: %(message)s")
    if sys.version_info < (3, 9):
        print("run.py: error: needs Python >= 3.9", file=sys.stderr)
        return 2
    try:
        out = run_bundle(Path(args.bundle), provider=args.provider, threads=args.threads, budget_min=args.budget_min,
                         progress=_printer(args.progress_json), restart=args.restart, stop_after=args.stop_after)
    except ValueError as err:  # BundleError, or the timer refusing a provider: one line, the partial state kept
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"run.py: interrupted; finished timings are in {Path(args.bundle) / PARTIAL_NAME}: run again to continue",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # the connection that started us is gone; the partial state is saved
        return 141
    n = sum(len(v) for v in out["records"].values())
    print(f"wrote {Path(args.bundle) / MEASUREMENTS_NAME}: {n} timings in {out['elapsed_s']} s"
          f"{'' if out['complete'] else ' (stopped early by the time budget)'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
