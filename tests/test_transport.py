"""Transports: the retry loop, the local transport, and SSH against a real OpenSSH server on 127.0.0.1."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from hwnas.config import MacroConfig
from hwnas.profiling import bundle, profiler, runner, timer, transport
from hwnas.space import SearchSpace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ssh_profile import local_sshd, sshd_missing  # noqa: E402


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """Six tiny networks and a sentinel, 3 rounds of 20 runs: 18 timings in about a second."""
    tiny_macro = MacroConfig(C=4, layers=3, in_channels=1, resolution=8, classes=10)
    space, rng = SearchSpace(tiny_macro), np.random.default_rng(3)
    models = [(profiler.network_candidate(f"net{i}", space.sample(rng)), {}) for i in range(6)]
    sentinel = profiler.network_candidate("sentinel", profiler.sentinel_genotype(tiny_macro))
    out = tmp_path_factory.mktemp("bundle") / "b"
    bundle.write_bundle(out, "small", "test", [("g", sentinel, models)],
                        timer.TimingConfig(runs=20, warmup=1, rounds=3))
    return out


@pytest.fixture
def small_bundle(written, tmp_path) -> Path:
    shutil.copytree(written, tmp_path / "b")
    return tmp_path / "b"


class FlakyTransport:
    """Drops the connection on the first run, after the runner has timed a few models."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def push(self, b: Path) -> None:
        self.calls.append("push")

    def run(self, b: Path, args, progress) -> None:
        self.calls.append("run")
        if self.calls.count("run") == 1:
            with pytest.raises(KeyboardInterrupt):
                runner.run_bundle(b, stop_after=5)
            raise transport.ConnectionDropped("test: connection lost")
        runner.run_bundle(b)

    def pull(self, b: Path) -> Path:
        self.calls.append("pull")
        return b / runner.MEASUREMENTS_NAME


def test_measure_bundle_resumes_after_a_dropped_connection(small_bundle):
    t = FlakyTransport()
    path = transport.measure_bundle(t, small_bundle, retry_wait_s=0)
    assert t.calls == ["push", "run", "push", "run", "pull"]
    meas = json.loads(path.read_text())
    assert [s["timed"] for s in meas["sessions"]] == [5, 13]


def test_measure_bundle_gives_up_after_the_retries(small_bundle):
    class Down(FlakyTransport):
        def run(self, b, args, progress):
            raise transport.ConnectionDropped("host unreachable")

    with pytest.raises(transport.TransportError, match="gave up after 2 attempts"):
        transport.measure_bundle(Down(), small_bundle, retries=1, retry_wait_s=0)


@pytest.mark.parametrize("rc, cls, text", [(255, transport.ConnectionDropped, "connection lost"),
                                           (-9, transport.ConnectionDropped, "connection lost"),
                                           (127, transport.TransportError, "--remote-python"),
                                           (2, transport.TransportError, "runner failed")])
def test_exit_codes_say_what_happened(rc, cls, text):
    with pytest.raises(cls, match=text):
        transport._check_exit(rc, ["last line"], "host")


def test_local_transport_streams_progress_from_a_separate_process(small_bundle):
    seen = []
    transport.measure_bundle(transport.LocalTransport(), small_bundle, progress=lambda d, t, s: seen.append((d, t)))
    assert seen[-1] == (18, 18) and len(seen) >= 18
    assert json.loads((small_bundle / runner.MEASUREMENTS_NAME).read_text())["complete"]


def test_local_transport_reports_a_runner_error_in_one_line(small_bundle):
    (small_bundle / "models" / "0000.onnx").write_bytes(b"x")
    with pytest.raises(transport.TransportError, match="0000.onnx: sha256 differs"):
        transport.measure_bundle(transport.LocalTransport(), small_bundle)


@pytest.mark.skipif(sshd_missing() is not None, reason=f"no local OpenSSH server: {sshd_missing()}")
def test_ssh_measurement_survives_a_killed_connection(small_bundle, tmp_path):
    with local_sshd(tmp_path / "sshd") as (host, options):
        t = transport.SSHTransport(host, remote_python=sys.executable, remote_dir=str(tmp_path / "remote"),
                                   options=options)
        killed = []

        def progress(done: int, total: int, stage: str) -> None:
            if not killed and done >= 4 and t.proc is not None:
                killed.append(done)
                t.proc.kill()  # the ssh client dies: the connection is gone mid-run

        path = transport.measure_bundle(t, small_bundle, progress=progress, retry_wait_s=0.2)
    meas = json.loads(path.read_text())
    records = meas["records"]["g"]
    assert killed and meas["complete"] and len(records) == 18
    assert len({(k, r) for k, r, _, _ in records}) == 18  # every (model, round) once
    assert len(meas["sessions"]) >= 2 and meas["sessions"][-1]["resumed_with"] >= killed[0]
    assert sum(s["timed"] for s in meas["sessions"]) == 18  # nothing finished was timed again
    assert (tmp_path / "remote" / runner.PARTIAL_NAME).exists()  # the device kept its own state


@pytest.mark.skipif(sshd_missing() is not None, reason=f"no local OpenSSH server: {sshd_missing()}")
def test_cli_export_measures_members_over_ssh(tmp_path, tiny_macro, rng):
    from hwnas.cli import main
    from hwnas.export import load_report
    from hwnas.search.front import FrontMember, ParetoFront

    run_dir = tmp_path / "search"
    run_dir.mkdir()
    ParetoFront([FrontMember(SearchSpace(tiny_macro).sample(rng), 0.1, 1.0, 0.01)], (1.0, 10.0, 1.0)).save(
        run_dir / "front.json")
    with local_sshd(tmp_path / "sshd") as (host, options):
        flags = [a for o in options for a in ("--ssh-option", o)]
        rc = main(["export", str(run_dir), "--ssh", host, *flags, "--remote-python", sys.executable,
                   "--remote-dir", str(tmp_path / "remote"), "--out", str(tmp_path / "export")])
    report = load_report(tmp_path / "export" / "export_report.json")
    assert rc in (0, 1) and report["members"][0]["measured_latency_ms"] > 0  # 1: +-10 % of a made-up prediction
    assert (tmp_path / "remote" / runner.MEASUREMENTS_NAME).exists() and report["measured_on"]["fingerprint"]


@pytest.mark.skipif(sshd_missing() is not None, reason=f"no local OpenSSH server: {sshd_missing()}")
def test_cli_profile_over_ssh(tmp_path, tiny_macro):
    from hwnas.cli import main
    from hwnas.profiling.device_profile import DeviceProfile

    macro = tmp_path / "macro.json"
    macro.write_text(json.dumps(tiny_macro.to_dict()))
    out = tmp_path / "remote-box.json"
    with local_sshd(tmp_path / "sshd") as (host, options):
        flags = [a for o in options for a in ("--ssh-option", o)]
        rc = main(["profile", "--device", "remote-box", "--macro", str(macro), "--ssh", host, *flags,
                   "--remote-python", sys.executable, "--remote-dir", str(tmp_path / "remote"),
                   "--n-calibration", "10", "--n-validation", "5", "--runs", "5", "--rounds", "2",
                   "--out", str(out)])
    assert rc == 0
    profile = DeviceProfile.load(out)
    assert profile.name == "remote-box" and profile.validation["n"] == 5
    assert profile.device["cpu_family"] and profile.device["cores"]  # the device's fingerprint, read there
    assert (tmp_path / "remote" / runner.MEASUREMENTS_NAME).exists()
