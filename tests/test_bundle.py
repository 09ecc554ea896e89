"""Bundles: the manifest, the runner (torch-free, resumable, in a numpy+onnxruntime venv) and fitting from its output."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hwnas.config import MacroConfig, ProfileConfig
from hwnas.profiling import bundle, profiler, runner, timer
from hwnas.profiling.device_profile import DeviceProfile

REPO = Path(__file__).resolve().parents[1]

# Imports of torch or hwnas fail inside the child: what a device without them would see.
BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'hwnas'):
            raise ImportError(f'{name} is blocked: the runner must not need it')
sys.meta_path.insert(0, _Block())
"""


def tiny_cfg(macro: MacroConfig, **kw) -> ProfileConfig:
    base = dict(device="tiny-device", macro=macro, n_calibration=6, n_validation=4, runs=2, warmup=0, rounds=2)
    return ProfileConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """One tiny profile bundle (writing exports ~60 ONNX models), copied by each test that changes it."""
    macro = MacroConfig(C=4, layers=3, in_channels=1, resolution=8, classes=10)
    out = tmp_path_factory.mktemp("bundle") / "b"
    bundle.write_profile_bundle(tiny_cfg(macro), out)
    return out


@pytest.fixture
def fresh(written, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(written, dst)
    return dst


def test_timer_and_fingerprint_import_with_torch_and_hwnas_blocked(written):
    code = BLOCKER + f"""
import importlib.util
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = sys.modules[name] = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod
print(load('hwnas_timer', {str(REPO / 'hwnas/profiling/timer.py')!r}).TimingConfig().rounds)
print(load('hwnas_fingerprint', {str(REPO / 'hwnas/profiling/fingerprint.py')!r}).device_fingerprint()['cores'])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # the blocker itself works: importing torch there fails
    blocked = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True)
    assert blocked.returncode != 0 and "blocked" in blocked.stderr


def test_manifest_lists_every_planned_model_with_its_hash(written, tiny_macro):
    cfg = tiny_cfg(tiny_macro)
    m = runner.read_manifest(written)
    assert m["kind"] == runner.MANIFEST_KIND and m["schema_version"] == runner.MANIFEST_SCHEMA_VERSION
    assert m["purpose"] == "profile" and m["timing"] == profiler.timing_config(cfg).to_dict()
    assert m["profile"]["config"] == json.loads(json.dumps(cfg.measurement_key()))
    (group,) = m["groups"]
    assert [e["key"] for e in group["models"]] == [k for k, _ in profiler.make_plan(cfg).jobs()]
    for e in [group["sentinel"], *group["models"]]:
        data = (written / e["file"]).read_bytes()
        assert runner.sha256_bytes(data) == e["sha256"] and e["input_shape"][0] == 1
    assert {e["role"] for e in group["models"]} == {"overhead", "fixed part", "block", "calibration", "validation"}
    assert (written / "run.py").read_bytes() == (REPO / "hwnas/profiling/runner.py").read_bytes()
    assert (written / "hwnas_timer.py").read_bytes() == (REPO / "hwnas/profiling/timer.py").read_bytes()
    assert (written / "hwnas_fingerprint.py").read_bytes() == (REPO / "hwnas/profiling/fingerprint.py").read_bytes()


def test_writing_the_same_bundle_again_keeps_its_measurements(fresh, tiny_macro):
    (fresh / runner.PARTIAL_NAME).write_text("{}")
    before = (fresh / "manifest.json").read_text()
    bundle.write_profile_bundle(tiny_cfg(tiny_macro), fresh)  # the same config: reused as it is
    assert (fresh / runner.PARTIAL_NAME).exists() and (fresh / "manifest.json").read_text() == before
    with pytest.raises(bundle.BundleError, match="holds measurements of another bundle"):
        bundle._prepare_dir(fresh, "{}")  # what another config's manifest would meet
    (fresh / "manifest.json").unlink()
    with pytest.raises(bundle.BundleError, match="not an hwnas bundle"):
        bundle._prepare_dir(fresh, "{}")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "manifest.json").write_text("{ not json"), "manifest.json: bundle manifest is not valid JSON"),
    (lambda d: (d / "manifest.json").write_text('{"kind": "something-else"}'), "not an hwnas bundle manifest"),
    (lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace('"schema_version": 1', '"schema_version": 99')), "schema_version 99"),
    (lambda d: (d / "models" / "0003.onnx").write_bytes(b"changed"), "0003.onnx: sha256 differs"),
    (lambda d: (d / "models" / "0003.onnx").unlink(), "0003.onnx: model file .* is missing"),
])
def test_a_corrupt_or_foreign_bundle_is_a_clear_error(fresh, damage, message, capsys):
    damage(fresh)
    assert runner.main(["--bundle", str(fresh)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("run.py: error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err)


def test_interrupted_runner_resumes_without_timing_anything_twice(fresh, monkeypatch):
    timed = []
    real = timer.time_pair
    monkeypatch.setattr(timer, "time_pair", lambda a, b, cfg: (timed.append(b.key), real(a, b, cfg))[1])
    with pytest.raises(KeyboardInterrupt):
        runner.run_bundle(fresh, stop_after=7)
    first = list(timed)
    assert len(first) == 7 and not (fresh / runner.MEASUREMENTS_NAME).exists()
    partial = json.loads((fresh / runner.PARTIAL_NAME).read_text())
    assert len(partial["records"]["profile"]) == 7
    timed.clear()
    out = runner.run_bundle(fresh)
    records = out["records"]["profile"]
    n_models = len(runner.read_manifest(fresh)["groups"][0]["models"])
    assert len(timed) == 2 * n_models - 7 and len(records) == 2 * n_models
    assert len({(k, r) for k, r, _, _ in records}) == len(records)  # nothing timed twice
    assert records[:7] == partial["records"]["profile"]
    assert [s["timed"] for s in out["sessions"]] == [7, 2 * n_models - 7] and out["complete"]


def test_resume_with_other_threads_is_refused(fresh):
    with pytest.raises(KeyboardInterrupt):
        runner.run_bundle(fresh, stop_after=1)
    with pytest.raises(runner.BundleError, match="other settings.*timing"):
        runner.run_bundle(fresh, threads=2)


def test_unavailable_provider_lists_the_available_ones(fresh):
    with pytest.raises(runner.BundleError, match="CPUExecutionProvider"):
        runner.run_bundle(fresh, provider="NoSuchExecutionProvider")


def test_from_measurements_writes_a_valid_profile(fresh, tmp_path, capsys):
    from hwnas.cli import main

    with pytest.raises(bundle.BundleError, match="measurements.json: no such measurements file"):
        bundle.profile_from_bundle(fresh)
    runner.run_bundle(fresh)
    out = tmp_path / "p.json"
    assert main(["profile", "--from-measurements", str(fresh), "--out", str(out)]) == 0
    profile = DeviceProfile.load(out)
    summary = json.loads(capsys.readouterr().out)
    assert summary["validation"]["n"] == 4 and summary["profile"] == str(out)
    assert profile.name == "tiny-device" and profile.meta["measured_by"] == "bundle runner"
    assert profile.device["isa"] and profile.device["cpu_vendor"] and profile.device["timing"]["runs"] == 2
    assert profile.device["provider"] == "CPUExecutionProvider"
    assert profile.sentinel["latency_ms"] > 0 and len(profile.calibration) == 6


def test_measurements_of_another_manifest_are_refused(fresh):
    runner.run_bundle(fresh)
    manifest = fresh / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"tiny-device"', '"other-device"'))
    with pytest.raises(bundle.BundleError, match="another manifest"):
        bundle.profile_from_bundle(fresh)


def test_export_bundle_measures_members_for_the_export_report(tmp_path, tiny_macro, rng):
    from hwnas.export import export_front
    from hwnas.search.front import FrontMember, ParetoFront
    from hwnas.space import SearchSpace

    space = SearchSpace(tiny_macro)
    members = [FrontMember(space.sample(rng), 0.1, 1.0 + i, 0.01) for i in range(2)]
    front = ParetoFront(members, (1.0, 10.0, 1.0))
    b = tmp_path / "eb"
    quick = type("P", (), {"device": {"timing": {"runs": 5, "rounds": 2, "warmup": 0}}})()
    bundle.write_export_bundle(members, {tiny_macro: quick}, b, threads=1)
    assert runner.read_manifest(b)["timing"]["runs"] == 5
    runner.run_bundle(b)
    fn = bundle.export_measure_fn(b, members)
    report = export_front(front, tmp_path / "export", measure_fn=fn)
    ms = [r["measured_latency_ms"] for r in report["members"]]
    assert all(v > 0 for v in ms) and fn.sentinel_ms[tiny_macro] > 0
    assert report["members"][1]["latency_ratio"] == pytest.approx(ms[1] / 2.0)
    with pytest.raises(bundle.BundleError, match="other front members"):
        bundle.export_measure_fn(b, members[::-1])


# --- the runner in a virtual environment holding only numpy and onnxruntime --------------------------------------


def _venv() -> Path:
    """A venv with numpy + onnxruntime only (the versions installed here), cached in /tmp across test runs."""
    import numpy
    import onnxruntime

    key = f"py{sys.version_info.major}{sys.version_info.minor}-np{numpy.__version__}-ort{onnxruntime.__version__}"
    path = Path(os.environ.get("HWNAS_RUNNER_VENV", f"/tmp/hwnas-runner-venv-{key}"))
    py = path / "bin" / "python"
    if (path / ".complete").exists():
        return py
    shutil.rmtree(path, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True, timeout=120)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"numpy=={numpy.__version__}",
                        f"onnxruntime=={onnxruntime.__version__}"], check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
        detail = getattr(err, "stderr", b"") or b""
        pytest.skip(f"cannot create a numpy+onnxruntime venv here ({err}; {detail.decode(errors='replace')[-300:]})")
    (path / ".complete").write_text(key)
    return py


def test_runner_in_a_venv_with_only_numpy_and_onnxruntime(fresh, tmp_path):
    py = _venv()
    probe = subprocess.run([str(py), "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0  # the venv really lacks torch
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # and hwnas
    done = subprocess.run([str(py), str(fresh / "run.py")], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "timings" in done.stdout
    meas = json.loads((fresh / runner.MEASUREMENTS_NAME).read_text())
    assert meas["fingerprint"]["onnxruntime_version"] and meas["complete"]
    profile = bundle.profile_from_bundle(fresh)
    assert profile.validation["n"] == 4 and np.isfinite(profile.validation["mape"])


def test_cli_export_bundle_then_from_measurements(tmp_path, tiny_macro, rng, capsys):
    from hwnas.cli import main
    from hwnas.export import load_report
    from hwnas.search.front import FrontMember, ParetoFront
    from hwnas.space import SearchSpace

    space = SearchSpace(tiny_macro)
    run_dir = tmp_path / "search"
    run_dir.mkdir()
    ParetoFront([FrontMember(space.sample(rng), 0.1, 1.0, 0.01)], (1.0, 10.0, 1.0)).save(run_dir / "front.json")
    b = tmp_path / "members"
    assert main(["export", str(run_dir), "--bundle", str(b)]) == 0
    assert "--from-measurements" in capsys.readouterr().out and not (run_dir / "export").exists()
    assert runner.main(["--bundle", str(b), "--threads", "1"]) == 0
    out = tmp_path / "export"
    main(["export", str(run_dir), "--from-measurements", str(b), "--out", str(out)])
    report = load_report(out / "export_report.json")
    assert report["members"][0]["measured_latency_ms"] > 0
    assert report["measured_on"]["fingerprint"]["cpu_model"] and report["measured_on"]["timing"]["threads"] == 1
