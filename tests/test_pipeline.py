"""`hwnas run` plans and the choice of members trained stand-alone (the pipeline itself runs in benchmarks/search.py)."""
from __future__ import annotations

import pytest

from hwnas.pipeline import pick_members


def _evaluated(out) -> list[list[int]]:
    """The encodings of every architecture the tiny run's NSGA-II evaluated (its checkpoint's archive)."""
    import json

    return [e["x"] for e in json.loads((out / "search" / "checkpoint.json").read_text())["archive"]]


def test_trained_members_include_most_accurate_and_fastest() -> None:
    lat = [5.0, 1.0, 3.0, 2.0, 4.0, 6.0]
    err = [0.10, 0.30, 0.20, 0.25, 0.05, 0.12]
    assert pick_members(err, lat, 2) == [1, 4]  # fastest (1.0 ms) and most accurate (error 0.05)
    three = pick_members(err, lat, 3)
    assert len(three) == 3 and {1, 4} <= set(three)
    assert pick_members(err, lat, 10) == list(range(6))


@pytest.mark.parametrize("elastic", [False, True])
def test_hwnas_run_end_to_end_on_a_tiny_plan(tmp_path, tiny_spec, fake_device, monkeypatch, capsys, caplog,
                                             elastic) -> None:
    """`hwnas run --quick` through main() with a tiny plan: every stage's files, a passing report, exit 0; with
    elastic depth and width, the profile covers every width and the exported networks have the chosen widths.
    Without them the run goes through a Dask scheduler (`--scheduler`): the search and the training too (an
    in-process cluster keeps the test fast; `--workers N` starts a process cluster the same code then uses)."""
    import contextlib
    import json
    import logging

    from hwnas.profiling.device_profile import DeviceProfile
    from hwnas.space import Genotype, Network, count_params

    from hwnas import pipeline
    from hwnas.cli import main
    from hwnas.config import MacroConfig, SearchConfig, SupernetConfig

    tiny = pipeline.RunPlan(
        SupernetConfig(data=tiny_spec, macro=MacroConfig(C=4, layers=5, resolution=8), epochs=0, sample_epochs=1,
                       batch_size=16, elastic_depth=elastic, elastic_width=elastic),
        SearchConfig(pop=4, gens=2), train_epochs=1, train_members=1, train_seeds=1, profile_quick=False,
        profile_sizes={"n_calibration": 8, "n_validation": 4, "runs": 2, "rounds": 2, "warmup": 0})
    monkeypatch.setitem(pipeline.PLANS, "quick", tiny)
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="hwnas")
    with contextlib.ExitStack() as stack:
        args = ["run", "--quick", "--out", str(out)]
        if not elastic:
            distributed = pytest.importorskip("dask.distributed")
            # One worker thread: the supernet and torch's global generator would be shared by threads of a process.
            cluster = stack.enter_context(distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                                                   dashboard_address=None))
            args += ["--scheduler", cluster.scheduler_address]
        assert main(args) == 0
    printed = capsys.readouterr().out
    on_dask = [r.getMessage() for r in caplog.records if "Dask" in r.getMessage()]
    assert (any("evaluating through Dask" in m for m in on_dask)
            and any("training 1 runs on Dask" in m for m in on_dask)) != elastic, on_dask
    for name in ("supernet/supernet.pt", "profile-8px.json", "search/front.json", "search/random_front.json",
                 "search/pareto.png", "export/export_report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "export" / "export_report.json").read_text())
    front = json.loads((out / "search" / "front.json").read_text())
    assert report["summary"]["n"] == len(front["members"]) == report["summary"]["n_passed"]
    assert sum(r["trained_epochs"] == 1 for r in report["members"]) == 1  # one member trained stand-alone
    assert all(r["measured_latency_ms"] is not None for r in report["members"])
    assert f"{report['summary']['n']}/{report['summary']['n']} passed all checks" in printed
    assert DeviceProfile.load(out / "profile-8px.json").covers_width(None) == elastic
    members = [Genotype.from_dict(m["arch"]) for m in front["members"]]
    assert all(abs(count_params(Network(g)) / 1e6 - m["params_m"]) < 1e-9 for g, m in zip(members, front["members"]))
    evaluated = _evaluated(out)
    # 32 cell variables, then with elastic depth and width 2 depth and 3 width variables (5 layers)
    assert {len(x) for x in evaluated} == {32 + 5 * elastic}
    if elastic:  # the search drew narrowed networks
        assert any(x[-3:] != [2, 2, 2] for x in evaluated)


def test_run_plans_by_data_set() -> None:
    import pytest

    from hwnas.pipeline import MNIST_PLANS, PLANS, plan_for

    assert plan_for() is PLANS["full"] and plan_for("digits", quick=True) is PLANS["quick"]
    quick = plan_for("fashion-mnist", quick=True)
    assert quick == MNIST_PLANS["quick"] and quick.search.max_params_m == 0.1
    assert plan_for("idx:/data/kmnist", quick=True).supernet.data == "idx:/data/kmnist"
    full = plan_for("fashion-mnist")
    assert full.supernet.all_resolutions == (28,) and full.supernet.macro == quick.supernet.macro.at_resolution(28)
    assert full.train_seeds == 3 and full.search.max_params_m == 0.1
    for bad in ("cifar10:/x", "idx:", "mnist"):
        with pytest.raises(ValueError, match="plans for"):
            plan_for(bad)


def test_hwnas_run_rejects_data_it_has_no_plan_for(tmp_path, monkeypatch, capsys) -> None:
    from hwnas.cli import EXIT_BAD_INPUT, main

    monkeypatch.chdir(tmp_path)
    assert main(["run", "--quick", "--data", "cifar10:/nowhere"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "plans for" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # no output folder made


def test_hwnas_run_rejects_negative_workers(tmp_path, capsys) -> None:
    from hwnas.cli import EXIT_BAD_INPUT, main

    assert main(["run", "--quick", "--workers", "-1", "--out", str(tmp_path / "run")]) == EXIT_BAD_INPUT
    assert "--workers" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_hwnas_run_names_its_folder_after_the_data(tmp_path) -> None:
    import argparse

    from hwnas.cli import _run_out

    def out(**kw):
        return str(_run_out(argparse.Namespace(**{"out": None, "quick": False, "data": "digits", **kw})))

    assert out() == "hwnas-run" and out(quick=True) == "hwnas-run-quick"
    assert out(data="fashion-mnist", quick=True) == "hwnas-run-fashion-mnist-quick"
    assert out(data="idx:/data/kmnist/") == "hwnas-run-kmnist"
    assert out(data="idx:/data/k mnist", out="x") == "x"


def test_hwnas_run_checks_the_scheduler_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    """An unreachable --scheduler is an error at once, not after the supernet's training and the profile."""
    from hwnas.cli import EXIT_BAD_INPUT, main
    from hwnas.export import parallel

    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT_S", 1)
    out = tmp_path / "run"
    assert main(["run", "--quick", "--scheduler", "tcp://127.0.0.1:1", "--out", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "cannot reach the Dask scheduler at 'tcp://127.0.0.1:1'" in err and "Traceback" not in err
    assert not out.exists()  # nothing trained, nothing written
