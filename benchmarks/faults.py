"""Fault suite: every input file kind damaged every way (through the CLI, in subprocesses), and every long
command killed with SIGKILL at seeded random points and resumed. Prints a JSON table.

    PYTHONPATH=$PWD python3 benchmarks/faults.py [--kills 2] [--seed 0] [--only inputs|kills] [--commands ...]

Targets: 0 tracebacks, 0 lost work (a unit of work -- an epoch, a generation, a timing, an exported member --
that was on disk when the process was killed and was done again by the resumed run: counted per kind from
the "resuming ..." lines the next run logs; a run killed again before it reached a stage redid nothing
there), and a resumed result
equal to the uninterrupted one: bit-identical for train-supernet (supernet.pt weights), search (front.json)
and export (ONNX files); timings are not reproducible, so profile and measure are checked for completeness.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

from hwnas.testing import corrupt  # noqa: E402

# -- inputs ----------------------------------------------------------------------------------------------------
# A child process drives hwnas.cli.main over a batch of argv lists (one interpreter start-up per batch, not per
# case): each case's exit code, whether an exception escaped main (a traceback), and stderr's first line.
CHILD = r"""
import contextlib, io, json, sys, traceback
import torch
torch.set_num_threads(1)
from hwnas.cli import main
out = []
for argv in json.load(sys.stdin):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as stop:
            rc = stop.code if isinstance(stop.code, int) else 2
        except BaseException:
            traceback.print_exc(file=err)
            rc = "exception"
    text = err.getvalue()
    out.append({"rc": rc, "traceback": "Traceback" in text, "stderr": text.strip().splitlines()[-1:] })
print(json.dumps(out))
"""


def _run_batch(argvs: list[list[str]]) -> list[dict[str, Any]]:
    proc = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(argvs), capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"fault child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loader_outcome(load: Callable[[], Any], names: str) -> str:
    """'loaded', 'clean' (ValueError/OSError naming the file) or 'traceback'."""
    try:
        load()
    except (ValueError, OSError) as err:
        return "clean" if names in str(err) else "unnamed"
    except BaseException:  # noqa: BLE001 - exactly what we count
        traceback.print_exc()
        return "traceback"
    return "loaded"


def run_inputs(world: corrupt.World, tmp: Path) -> dict[str, Any]:
    """Every kind x corruption: the library loader in this process, the CLI in child processes."""
    cases: list[tuple[str, str, corrupt.Case]] = []
    for kind in corrupt.JSON_KINDS:
        for name in corrupt.JSON_CORRUPTIONS:
            case = corrupt.json_case(world, kind, name, _fresh(tmp))
            if case is not None:
                cases.append((kind, name, case))
    for name in corrupt.CHECKPOINT_CORRUPTIONS:
        cases.append(("supernet_checkpoint", name, corrupt.checkpoint_case(world, name, _fresh(tmp))))
    from hwnas.data import load_dataset

    for name, make in corrupt.DATASET_CORRUPTIONS.items():
        d = _fresh(tmp)
        spec, names = make(d)
        cases.append((f"dataset_{name.split('_')[0]}", name,
                      corrupt.Case(lambda s=spec: load_dataset(s, 8), corrupt.train_argv(spec, d / "out"), names, True)))
    table: dict[str, dict[str, Any]] = {}
    with_cli = [(k, n, c) for k, n, c in cases if c.argv is not None]
    results = dict(zip([(k, n) for k, n, _ in with_cli], _run_batch([c.argv for _, _, c in with_cli])))
    for kind, name, case in cases:
        row = table.setdefault(kind, {"inputs": 0, "loader_refused": 0, "cli_runs": 0, "cli_refused": 0,
                                      "tracebacks": 0, "unnamed_file": 0, "cli_unnamed_file": 0, "failures": []})
        row["inputs"] += 1
        outcome = _loader_outcome(case.load, case.names)
        row["loader_refused"] += outcome in ("clean", "unnamed")
        bad = outcome == "traceback" or (case.must_fail and outcome == "loaded")
        row["unnamed_file"] += outcome == "unnamed"
        res = results.get((kind, name))
        if res is not None:
            row["cli_runs"] += 1
            row["cli_refused"] += res["rc"] not in (0, "exception")
            row["cli_unnamed_file"] += res["rc"] not in (0, "exception") and case.names not in "".join(res["stderr"])
            bad |= res["traceback"] or res["rc"] == "exception" or (case.must_fail and res["rc"] == 0)
        row["tracebacks"] += outcome == "traceback" or bool(res and (res["traceback"] or res["rc"] == "exception"))
        if bad:
            row["failures"].append({"corruption": name, "loader": outcome, "cli": res})
    return table


_counter = [0]


def _fresh(tmp: Path) -> Path:
    _counter[0] += 1
    d = tmp / f"case{_counter[0]:04d}"
    d.mkdir(parents=True)
    return d


# -- kills -----------------------------------------------------------------------------------------------------
RESUMED = {  # what each resumed run logs about the work it took over
    "epochs": re.compile(r"resuming \S+ after epoch (\d+)"),
    "generations": re.compile(r"resuming \S+ after generation (\d+)"),
    "timings": re.compile(r"resuming \S+: (\d+) timings already done"),
    "members": re.compile(r"resuming \S+: (\d+) members already exported"),
}


def _resumed(stderr: str) -> dict[str, int | None]:
    """Units of finished work the run reports it took over from disk, per kind (None: no message of that kind)."""
    out: dict[str, int | None] = {}
    for key, pattern in RESUMED.items():
        found = pattern.findall(stderr)
        out[key] = sum(map(int, found)) if found else None
    return out


def _lost(pending: dict[str, int], reported: dict[str, int | None], finished: bool) -> int:
    """Units on disk the run did not take over; a killed run that never reached a stage lost nothing there."""
    return sum(max(0, n - (reported.get(k) or 0)) for k, n in pending.items()
               if finished or reported.get(k) is not None)


def _epochs(folder: Path) -> int:
    import torch

    try:
        return int(torch.load(folder / "supernet.pt", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 - absent or (never, if the writes are atomic) damaged
        return 0


def _generations(folder: Path) -> int:
    total = 0
    for name in ("checkpoint.json", "random_checkpoint.json"):
        try:
            total += int(json.loads((folder / name).read_text())["generation"])
        except (OSError, ValueError, KeyError):
            pass
    return total


def _timings(sidecar: Path) -> int:
    """Finished timings on disk: the partial profile's records plus its journal (a torn last line not counted)."""
    done = set()
    try:
        done |= {(r[0], r[1]) for r in json.loads(sidecar.read_text())["records"]}
    except (OSError, ValueError, KeyError):
        pass
    journal = sidecar.with_name(sidecar.name + "l")
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                r = json.loads(line)
                done.add((r[0], r[1]))
            except (ValueError, IndexError):
                pass
    return len(done)


def _members(export_dir: Path) -> int:
    try:
        rows = json.loads((export_dir / "export_report.partial.json").read_text())["members"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum((export_dir / e["row"]["onnx"]).is_file() for e in rows)


def _export_units(export_dir: Path) -> dict[str, int]:
    """Members exported and timings of their measurement kept on disk."""
    return {"members": _members(export_dir),
            "timings": sum(_timings(p) for p in export_dir.glob("measure-*.partial.json"))}


def _run_to_end(cmd: list[str], timeout: float = 900) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout)
    return proc.returncode, proc.stderr, time.perf_counter() - t0


def kill_and_resume(name: str, cmd: list[str], on_disk: Callable[[], dict[str, int]], kills: int, reference_s: float,
                    rng: np.random.Generator) -> dict[str, Any]:
    """Start `cmd`, SIGKILL it at a random moment, `kills` times, then let it finish; count work done twice."""
    row: dict[str, Any] = {"kills": 0, "finished_before_kill": 0, "lost_work": 0, "tracebacks": 0, "units_on_disk_at_kills": []}
    pending: dict[str, int] = {}  # units on disk at the last kill, to be taken over by the next run
    for _ in range(kills):
        at = float(rng.uniform(0.15, 0.95)) * reference_s
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
        try:
            proc.wait(timeout=at)
            row["finished_before_kill"] += 1
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            row["kills"] += 1
        stderr = proc.communicate()[1]
        row["lost_work"] += _lost(pending, _resumed(stderr), finished=proc.returncode == 0)
        row["tracebacks"] += "Traceback" in stderr
        pending = on_disk()
        row["units_on_disk_at_kills"].append(sum(pending.values()))
    rc, stderr, _ = _run_to_end(cmd)
    row["lost_work"] += _lost(pending, _resumed(stderr), finished=True)
    row["tracebacks"] += "Traceback" in stderr
    row["final_exit_code"] = rc
    row["survived"] = rc == 0
    if rc != 0:
        row["final_stderr"] = stderr.strip().splitlines()[-3:]
    return row


def hwnas(*args: str) -> list[str]:
    return [sys.executable, "-m", "hwnas.cli", *args]


def _same_files(a: Path, b: Path, names: list[str]) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def _same_weights(a: Path, b: Path) -> bool:
    import torch

    sa, sb = (torch.load(p / "supernet.pt", weights_only=True) for p in (a, b))
    return sa["epoch"] == sb["epoch"] and sa["history"] == sb["history"] and \
        all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"]) and sa["model"].keys() == sb["model"].keys()


def _front(path: Path) -> Any:
    return json.loads((path / "front.json").read_text())


def _report_fields(folder: Path) -> list:
    report = json.loads((folder / "export_report.json").read_text())
    keep = ("rank", "arch_id", "onnx", "opset", "params_m", "max_abs_diff", "checker", "test_accuracy")
    return [{k: r[k] for k in keep} for r in report["members"]]


def run_kills(world: corrupt.World, tmp: Path, kills: int, seed: int, commands: list[str]) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    table: dict[str, Any] = {}
    data = corrupt.tiny_npz(tmp / "train.npz", n=600)
    arch_files = []
    from hwnas.space import SearchSpace

    for i in range(3):
        p = tmp / f"arch{i}.json"
        SearchSpace(corrupt.TINY_MACRO).sample(np.random.default_rng(100 + i)).save(p)
        arch_files.append(str(p))

    def cycle(name: str, make_cmd: Callable[[Path], list[str]], on_disk: Callable[[Path], dict[str, int]],
              equal: Callable[[Path, Path], bool] | None, what: str) -> None:
        if name not in commands:
            return
        ref, run = tmp / f"{name}-ref", tmp / f"{name}-killed"
        rc, stderr, ref_s = _run_to_end(make_cmd(ref))
        if rc != 0:
            table[name] = {"error": "the uninterrupted run failed", "stderr": stderr.strip().splitlines()[-3:]}
            return
        row = kill_and_resume(name, make_cmd(run), lambda: on_disk(run), kills, ref_s, rng)
        row["uninterrupted_s"] = round(ref_s, 1)
        row["equal_to_uninterrupted"] = (equal(ref, run) if row["survived"] else False) if equal else None
        row["compared"] = what
        table[name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)  # a long run shows each command as it ends

    train = ["--data", f"npz:{data}", "--epochs", "1", "--sample-epochs", "5", "--C", "4", "--layers", "3",
             "--resolution", "8", "--batch-size", "16", "--resume"]
    cycle("train-supernet", lambda d: hwnas("train-supernet", "--out", str(d), *train),
          lambda d: {"epochs": _epochs(d)}, _same_weights,
          "supernet.pt weights, epoch and history bit-identical")
    search = ["--supernet", str(world.supernet), "--profile", str(world.profile), "--pop", "6", "--gens", "8", "--resume",
              "--trust-profile"]  # the world's profile has made-up timings: no sentinel to check
    cycle("search", lambda d: hwnas("search", "--out", str(d), *search), lambda d: {"generations": _generations(d)},
          lambda a, b: _front(a)["members"] == _front(b)["members"] and _front(a)["history"] == _front(b)["history"],
          "front.json members and history identical")
    macro = str(world.macro)
    profile = ["--device", "faults", "--macro", macro, "--n-calibration", "10", "--n-validation", "5", "--runs", "5",
               "--rounds", "2", "--budget-min", "30", "--resume"]
    cycle("profile", lambda d: hwnas("profile", "--out", str(d / "p.json"), *profile),
          lambda d: {"timings": _timings(d / "p.json.partial.json")},
          lambda a, b: _profile_complete(b / "p.json") and not (b / "p.json.partial.json").exists(),
          "complete profile (every validation network, all rounds), partial state removed; timings differ by nature")
    measure = ["--rounds", "4", "--runs", "300", "--resume", *arch_files]
    cycle("measure", lambda d: hwnas("measure", "--partial", str(d / "m.partial.json"), *measure),
          lambda d: {"timings": _timings(d / "m.partial.json")},
          lambda a, b: not (b / "m.partial.json").exists(),
          "every architecture measured (exit 0), partial state removed; timings differ by nature")
    # The world's profile has made-up timings: without its sentinel, export does not wait out a "drifted" device.
    profile_data = json.loads(world.profile.read_text())
    profile_data["sentinel"] = {}
    no_sentinel = tmp / "profile-no-sentinel.json"
    no_sentinel.write_text(json.dumps(profile_data))
    cycle("export", lambda d: hwnas("export", str(world.search), "--out", str(d), "--profile", str(no_sentinel),
                                 "--trust-profile"),
          _export_units, lambda a, b: _report_fields(a) == _report_fields(b) and _same_files(
              a, b, [r["onnx"] for r in _report_fields(a)]),
          "report rows (all but timings) and ONNX files bit-identical")
    run_code = _tiny_pipeline_code()
    cycle("run", lambda d: [sys.executable, "-c", run_code, str(d)],
          lambda d: {"epochs": _epochs(d / "supernet"), "generations": _generations(d / "search"),
                     "members": _export_units(d / "export")["members"],
                     "timings": _timings(d / "profile-8px.json.partial.json") + _export_units(d / "export")["timings"]},
          lambda a, b: _same_weights(a / "supernet", b / "supernet") and (b / "export" / "export_report.json").exists(),
          "supernet bit-identical, export report written (profile timings, hence the front, differ by nature)")
    return table


def _profile_complete(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return data["meta"].get("rounds_completed") == 2 and data["validation"]["n"] == 5


def _tiny_pipeline_code() -> str:
    """`hwnas run --quick` with budgets small enough for a fault run (seconds per stage)."""
    return (
        "import sys, dataclasses, logging\n"
        "import hwnas.pipeline as p\n"
        "from hwnas.config import MacroConfig, ProfileConfig, SearchConfig, SupernetConfig\n"
        "p.PLANS['quick'] = p.RunPlan(SupernetConfig(macro=MacroConfig(C=4, layers=3, resolution=8), epochs=0,"
        " sample_epochs=3, batch_size=64), SearchConfig(pop=4, gens=3), train_epochs=1, train_members=1,"
        " train_seeds=1, profile_quick=False)\n"
        "ProfileConfig.resolved = lambda self: dataclasses.replace(self, n_calibration=8, n_validation=4, runs=5,"
        " rounds=2, warmup=0)\n"
        "import hwnas.export.exporter as e\n"
        "real = e._default_measure  # no waiting out a busy machine's drift\n"
        "e._default_measure = lambda threads, profiles=None, **kw: real(threads, profiles, drift_retries=0, drift_wait_s=0.0, **kw)\n"
        "from hwnas.cli import main\n"
        "sys.exit(main(['run', '--quick', '--out', sys.argv[1]]))\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs per command (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("inputs", "kills"), default=None)
    parser.add_argument("--commands", nargs="*", default=["train-supernet", "search", "profile", "measure", "export", "run"])
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hwnas-faults-") as tmp_name:
        tmp = Path(tmp_name)
        world = corrupt.build_world(tmp / "world")
        if args.only != "kills":
            inputs = run_inputs(world, tmp / "inputs")
            out["inputs"] = inputs
            out["inputs_total"] = {k: sum(r[k] for r in inputs.values()) for k in ("inputs", "cli_runs", "tracebacks", "unnamed_file", "cli_unnamed_file")}
            out["inputs_total"]["failures"] = sum(len(r["failures"]) for r in inputs.values())
        if args.only != "inputs":
            (tmp / "kills").mkdir()
            kills = run_kills(world, tmp / "kills", args.kills, args.seed, args.commands)
            out["kills"] = kills
            rows = [r for r in kills.values() if "kills" in r]
            out["kills_total"] = {"kills": sum(r["kills"] for r in rows), "survived": sum(r["survived"] for r in rows),
                                  "commands": len(kills), "lost_work": sum(r["lost_work"] for r in rows),
                                  "tracebacks": sum(r["tracebacks"] for r in rows),
                                  "equal_to_uninterrupted": sum(bool(r["equal_to_uninterrupted"]) for r in rows)}
    out["elapsed_s"] = round(time.perf_counter() - t0, 1)
    out["cpu"] = _cpu()
    print(json.dumps(out, indent=1))


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
