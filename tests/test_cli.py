"""Every subcommand driven through `hwnas.cli.main`: its happy path on tiny inputs and its error exits.

Errors must be one line on stderr with the documented exit code and no traceback (unless --debug).
"""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from hwnas import cli
from hwnas.cli import (EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_OS_ERROR, main)
from hwnas.config import MacroConfig
from hwnas.space import Genotype


def one_error_line(capsys, code: int, got: int, *needles: str) -> str:
    """Assert exit code `code`, a single 'hwnas CMD: error/interrupted' line naming `needles`, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hwnas ")]
    assert got == code, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def arch(tmp_path: Path, genotype) -> Path:
    path = tmp_path / "arch.json"
    genotype.save(path)
    return path


def synthetic_profile(macro: MacroConfig, fingerprint: dict | None = None):
    """A profile from made-up timing records (no timing)."""
    import numpy as np

    from hwnas.config import ProfileConfig
    from hwnas.profiling import profiler
    from hwnas.profiling.fingerprint import device_fingerprint

    plan = profiler.make_plan(ProfileConfig(device="synthetic", macro=macro, n_calibration=10, n_validation=5, rounds=2))
    rng = np.random.default_rng(0)
    records = [(key, r, float(rng.uniform(0.01, 0.05)), 1.0) for r in range(2) for key, _ in plan.jobs()]
    return profiler.profile_from_records(plan, records, fingerprint or device_fingerprint())


def train_args(out: Path, spec: str, *extra: str) -> list[str]:
    return ["train-supernet", "--out", str(out), "--data", spec, "--C", "4", "--layers", "3", "--resolution", "8",
            "--epochs", "0", "--sample-epochs", "1", "--batch-size", "16", *extra]


def test_info_prints_json(capsys) -> None:
    assert main(["info"]) == EXIT_OK
    info = json.loads(capsys.readouterr().out)
    assert {"hwnas", "kernel_backends", "device", "versions"} <= set(info)


def test_every_subcommand_on_tiny_inputs(tmp_path: Path, tiny_spec: str, fake_device, capsys) -> None:
    """train-supernet -> profile --quick -> search -> export DIR -> export --arch -> predict -> measure."""
    from hwnas.train import load_supernet

    sn = tmp_path / "sn"
    assert main(train_args(sn, tiny_spec)) == EXIT_OK
    assert (sn / "supernet.pt").is_file() and "supernet:" in capsys.readouterr().out
    macro = load_supernet(sn)[1].macro
    (tmp_path / "macro.json").write_text(json.dumps(macro.to_dict()))
    profile = tmp_path / "p.json"
    assert main(["profile", "--device", "tiny", "--quick", "--macro", str(tmp_path / "macro.json"),
                 "--out", str(profile)]) == EXIT_OK
    validation = json.loads(capsys.readouterr().out)["validation"]
    assert validation["n"] == 30  # --quick's validation set
    assert set(validation["mape_per_stage_width"]) <= {f"stage{s}@{w}" for s in range(3) for w in ("0.5", "0.75", "1")}
    assert len(validation["mape_per_stage_width"]) >= 6  # held-out networks of (nearly) every stage width

    out = tmp_path / "search"
    assert main(["search", "--supernet", str(sn), "--profile", str(profile), "--pop", "4", "--gens", "2",
                 "--out", str(out)]) == EXIT_OK
    assert "Pareto members" in capsys.readouterr().out
    assert main(["export", str(out), "--out", str(tmp_path / "export")]) == EXIT_OK
    report = json.loads((tmp_path / "export" / "export_report.json").read_text())
    first = tmp_path / "export" / report["members"][0]["arch"]
    assert main(["export", "--arch", str(first), "--out", str(tmp_path / "one.onnx")]) == EXIT_OK
    assert (tmp_path / "one.onnx").is_file()
    capsys.readouterr()
    assert main(["predict", "--profile", str(profile), str(first)]) == EXIT_OK
    predicted = json.loads(capsys.readouterr().out)["latency_ms"][str(first)]
    assert predicted == pytest.approx(report["members"][0]["predicted_latency_ms"], abs=1e-4)
    narrow = tmp_path / "narrow.json"
    g = Genotype.load(first)
    Genotype(g.normal, g.reduce, g.macro, width=(0.5, 0.75, 0.5)).save(narrow)
    assert main(["predict", "--profile", str(profile), str(narrow)]) == EXIT_OK
    assert 0 < json.loads(capsys.readouterr().out)["latency_ms"][str(narrow)] < predicted  # profiles cover widths
    assert main(["measure", str(first), "--rounds", "2", "--runs", "3"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["latency_ms"][str(first)] > 0

    # An earlier search is not overwritten without --resume: one line, bad input, before any loading.
    assert main(["search", "--supernet", str(sn), "--profile", str(profile), "--out", str(out)]) == EXIT_BAD_INPUT
    one_error_line(capsys, EXIT_BAD_INPUT, EXIT_BAD_INPUT, "--resume")


def test_bad_architecture_paths_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["predict", str(tmp_path)]) == EXIT_BAD_INPUT
    one_error_line(capsys, EXIT_BAD_INPUT, EXIT_BAD_INPUT, str(tmp_path), "folder")
    code = main(["measure", str(tmp_path / "missing.json")])
    one_error_line(capsys, EXIT_BAD_INPUT, code, "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"normal": [')
    code = main(["export", "--arch", str(broken), "--out", str(tmp_path / "m.onnx")])
    one_error_line(capsys, EXIT_BAD_INPUT, code, "broken.json", "JSON")


def test_outputs_that_cannot_be_written_fail_before_work(tmp_path: Path, arch: Path, tiny_spec: str, capsys,
                                                         monkeypatch) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    # export --arch --out under a file or onto a folder
    code = main(["export", "--arch", str(arch), "--out", str(blocker / "m.onnx")])
    one_error_line(capsys, EXIT_OS_ERROR, code, str(blocker))
    code = main(["export", "--arch", str(arch), "--out", str(tmp_path)])
    one_error_line(capsys, EXIT_OS_ERROR, code, str(tmp_path), "folder")

    # train-supernet --out a file: refused before the data is loaded
    import hwnas.train as train

    monkeypatch.setattr(train, "train_supernet", lambda *a, **k: pytest.fail("trained despite a bad --out"))
    code = main(train_args(blocker, tiny_spec))
    one_error_line(capsys, EXIT_OS_ERROR, code, str(blocker), "file")

    # profile --out under a file / a folder: refused before any timing
    from hwnas.profiling import profiler

    monkeypatch.setattr(profiler, "profile_device", lambda *a, **k: pytest.fail("profiled despite a bad --out"))
    code = main(["profile", "--out", str(blocker / "p.json")])
    one_error_line(capsys, EXIT_OS_ERROR, code, str(blocker))
    code = main(["profile", "--out", str(tmp_path)])
    one_error_line(capsys, EXIT_OS_ERROR, code, str(tmp_path))

    # search and run --out under a file
    code = main(["search", "--supernet", "x", "--profile", "p.json", "--out", str(blocker / "s")])
    one_error_line(capsys, EXIT_OS_ERROR, code, str(blocker))
    code = main(["run", "--out", str(blocker / "r")])
    one_error_line(capsys, EXIT_OS_ERROR, code, str(blocker))


def test_bad_numbers_are_refused_up_front(tmp_path: Path, arch: Path, capsys, monkeypatch) -> None:
    from hwnas.profiling import profiler

    monkeypatch.setattr(profiler, "profile_device", lambda *a, **k: pytest.fail("profiled despite --seed -1"))
    code = main(["profile", "--seed", "-1", "--out", str(tmp_path / "p.json")])
    one_error_line(capsys, EXIT_BAD_INPUT, code, "--seed", "-1")
    (tmp_path / "run").mkdir()
    code = main(["export", str(tmp_path / "run"), "--threads", "0"])
    one_error_line(capsys, EXIT_BAD_INPUT, code, "--threads must be >= 1")
    code = main(["measure", str(arch), "--threads", "0"])
    one_error_line(capsys, EXIT_BAD_INPUT, code, "--threads")
    code = main(["export", str(tmp_path / "no-such-run")])
    one_error_line(capsys, EXIT_BAD_INPUT, code, "no-such-run")


def test_a_profile_whose_sentinel_is_not_an_object(tmp_path: Path, arch: Path, capsys) -> None:
    profile = synthetic_profile(MacroConfig(C=4, layers=3, in_channels=1, resolution=8, classes=10))
    data = profile.to_dict()
    data["sentinel"] = "fast"
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    code = main(["predict", "--profile", str(path), str(arch)])
    one_error_line(capsys, EXIT_BAD_INPUT, code, str(path), "sentinel")


def test_a_foreign_profile_is_reported_once(tmp_path: Path, arch: Path, capsys) -> None:
    from hwnas.profiling.fingerprint import device_fingerprint

    other = {**device_fingerprint(), "cpu_model": "Some Other CPU 9000", "machine": "riscv64"}
    profile = synthetic_profile(MacroConfig(C=4, layers=3, in_channels=1, resolution=8, classes=10), other)
    path = tmp_path / "p.json"
    profile.save(path)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["predict", "--profile", str(path), str(arch), str(arch)]) == EXIT_OK
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if str(path) in line]
    said += [str(w.message) for w in caught if str(path) in str(w.message)]  # a Python warning would print too
    assert len(said) == 1, said


def test_os_errors_name_the_path_and_the_reason(tmp_path: Path, arch: Path, capsys, monkeypatch) -> None:
    from hwnas.profiling import onnx_io

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_io, "export_onnx", full_disk)
    code = main(["export", "--arch", str(arch), "--out", str(tmp_path / "m.onnx")])
    one_error_line(capsys, EXIT_OS_ERROR, code, "No space left on device", str(tmp_path / "m.onnx"))

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "m.onnx"))

    monkeypatch.setattr(onnx_io, "export_onnx", denied)
    code = main(["export", "--arch", str(arch), "--out", str(tmp_path / "m.onnx")])
    one_error_line(capsys, EXIT_OS_ERROR, code, "Permission denied", str(tmp_path / "m.onnx"))


def test_unexpected_errors_hint_at_debug(tmp_path: Path, arch: Path, capsys, monkeypatch) -> None:
    from hwnas.profiling import onnx_io

    def bug(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(onnx_io, "export_onnx", bug)
    argv = ["export", "--arch", str(arch), "--out", str(tmp_path / "m.onnx")]
    one_error_line(capsys, EXIT_INTERNAL, main(argv), "KeyError", "--debug")
    with pytest.raises(KeyError):
        main(["--debug", *argv])
    with pytest.raises(KeyError):
        main([*argv, "--debug"])


@pytest.mark.parametrize("command", ["train-supernet", "profile", "measure", "search", "export"])
def test_ctrl_c_says_what_was_saved(command: str, tmp_path: Path, arch: Path, tiny_spec: str, capsys,
                                    monkeypatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    import hwnas.export as export
    import hwnas.train as train
    from hwnas.profiling import profiler
    from hwnas.search import session

    monkeypatch.setattr(train, "train_supernet", interrupt)
    monkeypatch.setattr(profiler, "profile_device", interrupt)
    monkeypatch.setattr(profiler, "measure_genotypes", interrupt)
    monkeypatch.setattr(session, "build_problem", interrupt)
    monkeypatch.setattr(export, "cli_export_dir", interrupt)
    out = tmp_path / "out"
    argv = {
        "train-supernet": train_args(out, tiny_spec),
        "profile": ["profile", "--out", str(out / "p.json")],
        "measure": ["measure", str(arch), "--partial", str(out / "m.partial.json")],
        "search": ["search", "--supernet", "sn", "--profile", "p.json", "--out", str(out), "--resume"],
        "export": ["export", str(tmp_path), "--out", str(out)],
    }[command]
    line = one_error_line(capsys, EXIT_INTERRUPTED, main(argv), "interrupted")
    if command == "export":
        assert str(out) in line
    else:
        assert "nothing was saved" in line  # interrupted before anything finished

    # With a checkpoint on disk the message points at it and at --resume.
    from hwnas.profiling.profiler import sidecar_path

    saved = {"train-supernet": out / "supernet.pt", "profile": sidecar_path(out / "p.json"),
             "search": out / "checkpoint.json", "measure": out / "m.partial.json"}.get(command)
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text("{}")
        line = one_error_line(capsys, EXIT_INTERRUPTED, main(argv), str(saved), "--resume")


def test_exit_codes_are_documented(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for code in (cli.EXIT_CHECKS_FAILED, EXIT_BAD_INPUT, EXIT_OS_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED):
        assert f"\n  {code} " in out


def test_measure_resumes_from_its_partial_file(tmp_path: Path, arch: Path, capsys, monkeypatch,
                                               count_timed_rounds) -> None:
    from hwnas.profiling import timer

    partial = tmp_path / "m.partial.json"
    argv = ["measure", str(arch), "--rounds", "3", "--runs", "3", "--partial", str(partial)]
    real, taken = timer.run_round, []

    def die_in_round_two(cands, r, *args, **kwargs):
        if r == 2:
            raise KeyboardInterrupt
        taken.append(r)
        return real(cands, r, *args, **kwargs)

    monkeypatch.setattr(timer, "run_round", die_in_round_two)
    one_error_line(capsys, EXIT_INTERRUPTED, main(argv), str(partial), "--resume")
    assert partial.is_file() and taken == [0, 1]

    retimed = count_timed_rounds()
    assert main([*argv, "--resume"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["latency_ms"][str(arch)] > 0
    assert retimed == [2]  # only the round that had not finished is timed again
    assert not partial.exists()

    assert main(["measure", str(arch), "--resume"]) == EXIT_BAD_INPUT
    one_error_line(capsys, EXIT_BAD_INPUT, EXIT_BAD_INPUT, "--partial")
