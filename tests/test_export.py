"""export_front on a tiny config: ONNX written and verified, report rows for every member, failures reported."""
from __future__ import annotations

import hashlib
import json
import os
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch.utils.data import TensorDataset

from hwnas.config import MacroConfig
from hwnas.export import REPORT_NAME, export_front, exporter, format_table, load_report
from hwnas.search.front import FrontMember, ParetoFront
from hwnas.space import SearchSpace


@pytest.fixture
def front(tiny_macro: MacroConfig, rng: np.random.Generator) -> ParetoFront:
    space = SearchSpace(tiny_macro)
    members = [FrontMember(space.sample(rng), 0.1 * (i + 1), 1.0 + i, 0.01) for i in range(2)]
    return ParetoFront(members, (1.0, 10.0, 1.0))


def fake_measure(genotypes) -> np.ndarray:
    return np.array([1.05, 2.5])  # member 0 within 10 % of its prediction (1.0), member 1 not (2.0)


def test_every_member_exported_and_verified(front: ParetoFront, tmp_path) -> None:
    report = export_front(front, tmp_path, measure_fn=fake_measure)
    assert report == load_report(tmp_path / REPORT_NAME)
    assert [r["arch_id"] for r in report["members"]] == [m.arch_id for m in front.members]
    for row in report["members"]:
        assert row["passed"], row["errors"]
        model = onnx.load(str(tmp_path / row["onnx"]))
        onnx.checker.check_model(model)
        assert row["opset"] == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.dim_value  # dynamic batch axis
        assert 0 <= row["max_abs_diff"] <= 1e-4
        assert json.loads((tmp_path / row["arch"]).read_text())["normal"]
    assert report["summary"]["n_passed"] == 2
    assert report["summary"]["latency_within_10pct"] == 0.5
    assert report["members"][1]["latency_ratio"] == pytest.approx(1.25)
    table = format_table(report)
    assert front.members[0].arch_id in table and "2/2 passed" in table


def test_predictions_rescaled_by_the_sentinel_timed_now(front: ParetoFront, tmp_path, tiny_macro: MacroConfig) -> None:
    """The device got 1.25x slower since profiling: rescaled predictions match the measurements again."""
    profile = SimpleNamespace(device={"threads": 1}, validation={"noise_ceiling_within_10pct": 1.0},
                              sentinel={"latency_ms": 0.2}, name="fake", macro=tiny_macro)
    report = export_front(front, tmp_path, profile=profile, measure_fn=lambda gs: np.array([1.25, 2.5]),
                          scale_fn=lambda p: (1.25, 0.25))
    s = report["summary"]
    assert s["latency_within_10pct"] == 0.0 and s["latency_within_10pct_rescaled"] == 1.0
    assert s["sentinel"] == [{"profile": "fake", "resolution": tiny_macro.resolution, "scale": 1.25, "now_ms": 0.25,
                              "profile_ms": 0.2}]
    assert report["members"][1]["predicted_rescaled_ms"] == pytest.approx(2.5)
    assert "x 1.250" in format_table(report)

    def no_sentinel(p):
        raise ValueError("profile 'fake' has no sentinel measurement")

    plain = export_front(front, tmp_path / "b", profile=profile, measure_fn=fake_measure, scale_fn=no_sentinel)
    assert plain["summary"]["sentinel"] is None and plain["summary"]["latency_within_10pct_rescaled"] is None


def test_rescaling_and_noise_now_come_from_the_measurement(front: ParetoFront, tmp_path, tiny_macro: MacroConfig,
                                                         monkeypatch) -> None:
    """The measurement already timed the sentinel before every candidate: no second, separate timing."""
    from hwnas.profiling import profiler

    def measure_genotypes(genotypes, threads, detailed, **kw):
        assert detailed
        ms = np.array([1.25, 2.5])[: len(genotypes)]
        return profiler.Measurement(ms, 0.25, ms, ms * np.array([1.0, 1.2])[: len(genotypes)])

    def separate_timing(p):
        raise AssertionError("the sentinel was timed again")

    monkeypatch.setattr(profiler, "measure_genotypes", measure_genotypes)
    monkeypatch.setattr(profiler, "sentinel_scale", separate_timing)
    monkeypatch.setattr(exporter.time, "sleep", lambda s: None)  # the sentinel is 1.25x: measured again
    sentinel = {"latency_ms": 0.2, "arch_id": profiler.sentinel_genotype(tiny_macro).arch_id}
    profile = SimpleNamespace(device={"threads": 1}, validation={"noise_ceiling_within_10pct": 1.0},
                              sentinel=sentinel, name="fake", macro=tiny_macro)
    report = export_front(front, tmp_path, profile=profile)
    assert report["summary"]["sentinel"][0]["scale"] == pytest.approx(1.25)
    assert report["summary"]["latency_within_10pct_rescaled"] == 1.0
    assert report["summary"]["noise_now_within_10pct"] == 0.5  # member 1's halves differ by 20 %
    assert "even vs odd rounds agree for 50 %" in format_table(report)


def test_failing_member_is_reported_not_dropped(front: ParetoFront, tmp_path, tiny_macro: MacroConfig) -> None:
    def train(genotype, data, epochs, seed):
        if genotype.arch_id == front.members[1].arch_id:
            raise RuntimeError("diverged")
        from hwnas.space import Network
        return Network(genotype), 0.9

    x = torch.rand(4, tiny_macro.in_channels, tiny_macro.resolution, tiny_macro.resolution)
    data = SimpleNamespace(test=TensorDataset(x, torch.zeros(4, dtype=torch.long)))
    report = export_front(front, tmp_path, train_epochs=1, data=data, train_fn=train, measure_fn=fake_measure)
    ok, bad = report["members"]
    assert ok["passed"] and ok["test_accuracy"] == 0.9 and ok["trained_epochs"] == 1
    assert not bad["passed"] and "diverged" in bad["errors"][0]
    assert bad["measured_latency_ms"] == 2.5  # still measured and listed
    assert report["summary"]["n_passed"] == 1 and report["summary"]["best_test_accuracy"] == 0.9
    assert "FAIL" in format_table(report)


def test_several_training_seeds_report_the_mean_and_export_the_first_run(front: ParetoFront, tmp_path,
                                                                         tiny_macro: MacroConfig) -> None:
    from hwnas.profiling.onnx_io import verify_onnx
    from hwnas.space import Network

    calls, nets = [], {}

    def train(genotype, data, epochs, seed):
        calls.append((genotype.arch_id, seed))
        torch.manual_seed(100 + seed)
        nets[(genotype.arch_id, seed)] = net = Network(genotype)  # distinct weights per seed
        return net, {3: 0.8, 4: 0.9, 5: 1.0}[seed]

    x = torch.rand(4, tiny_macro.in_channels, tiny_macro.resolution, tiny_macro.resolution)
    data = SimpleNamespace(test=TensorDataset(x, torch.zeros(4, dtype=torch.long)))
    trained = front.members[0].arch_id
    events = []
    report = export_front(front, tmp_path, train_epochs=2, data=data, train_fn=train, measure_fn=fake_measure,
                          seed=3, train_seeds=3, train_ids={trained}, progress=lambda *e: events.append(e))
    assert calls == [(trained, 3), (trained, 4), (trained, 5)]
    assert [e for e in events if e[0] == "train"] == [("train", 1, 3), ("train", 2, 3), ("train", 3, 3)]
    row, untrained = report["members"]
    assert row["test_accuracy_seeds"] == [0.8, 0.9, 1.0] and row["test_accuracy"] == pytest.approx(0.9)
    assert untrained["test_accuracy"] is None and "test_accuracy_seeds" not in untrained
    assert report["train_seeds"] == 3 and report["summary"]["best_test_accuracy"] == pytest.approx(0.9)
    # the ONNX file is the first (seed 3) run's network, not a later one
    assert verify_onnx(tmp_path / row["onnx"], nets[(trained, 3)], x[:2]) < 1e-4
    assert verify_onnx(tmp_path / row["onnx"], nets[(trained, 5)], x[:2]) > 1e-4
    assert "mean of 3 stand-alone runs" in format_table(report)
    with pytest.raises(ValueError, match="train_seeds"):
        export_front(front, tmp_path, train_seeds=0)


def test_cli_rejects_zero_training_seeds(front: ParetoFront, tmp_path, capsys) -> None:
    from hwnas.cli import main

    front.save(tmp_path / "front.json")
    assert main(["export", str(tmp_path), "--train-seeds", "0", "--out", str(tmp_path / "x")]) != 0
    assert "--train-seeds must be >= 1, got 0" in capsys.readouterr().err


def test_tolerance_violation_fails_the_member(front: ParetoFront, tmp_path) -> None:
    one = ParetoFront(front.members[:1], front.reference_point)
    report = export_front(one, tmp_path, measure_fn=lambda gs: np.ones(1), tolerance=-1.0)
    (row,) = report["members"]
    assert not row["passed"] and "max |onnxruntime - torch|" in row["errors"][0]


def test_measurement_failure_keeps_the_export(front: ParetoFront, tmp_path) -> None:
    def broken(genotypes):
        raise RuntimeError("no onnxruntime session")

    one = ParetoFront(front.members[:1], front.reference_point)
    report = export_front(one, tmp_path, measure_fn=broken)
    assert report["summary"]["measure_error"].endswith("no onnxruntime session")
    assert all(r["onnx"] and r["max_abs_diff"] is not None and not r["passed"] for r in report["members"])


def test_real_measurement_of_one_member(front: ParetoFront, tmp_path) -> None:
    pytest.importorskip("hwnas.profiling.profiler")
    one = ParetoFront(front.members[:1], front.reference_point)
    report = export_front(one, tmp_path, threads=1)
    assert report["members"][0]["measured_latency_ms"] > 0, report["members"][0]["errors"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_dir(front: ParetoFront, tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(ValueError, match="cannot write"):
        export_front(front, locked / "export", measure_fn=fake_measure)


def test_out_dir_that_is_a_file(front: ParetoFront, tmp_path) -> None:
    blocker = tmp_path / "export"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot write"):
        export_front(front, blocker, measure_fn=fake_measure)
    assert blocker.read_text() == "not a folder"  # nothing lost


def test_a_drifted_device_is_measured_again_and_the_closest_attempt_kept(front: ParetoFront, tmp_path,
                                                                         tiny_macro: MacroConfig, monkeypatch) -> None:
    """Sentinel 1.5x its profiled latency: wait, measure again, keep the attempt taken in the profiled state."""
    from hwnas.profiling import profiler

    sentinels = iter([0.3, 0.21, 0.5])  # 1.5x, then 1.05x (within 10 %: no third attempt)
    slept = []

    def measure_genotypes(genotypes, threads, detailed, **kw):
        sent = next(sentinels)
        ms = np.array([1.0, 2.0])[: len(genotypes)] * sent / 0.2
        return profiler.Measurement(ms, sent, ms, ms)

    monkeypatch.setattr(profiler, "measure_genotypes", measure_genotypes)
    monkeypatch.setattr(exporter.time, "sleep", slept.append)
    sentinel = {"latency_ms": 0.2, "arch_id": profiler.sentinel_genotype(tiny_macro).arch_id}
    profile = SimpleNamespace(device={"threads": 1}, validation={"noise_ceiling_within_10pct": 1.0},
                              sentinel=sentinel, name="fake", macro=tiny_macro)
    report = export_front(front, tmp_path, profile=profile)
    assert slept == [exporter.DRIFT_WAIT_S]
    assert [r["measured_latency_ms"] for r in report["members"]] == pytest.approx([1.05, 2.1])
    assert report["summary"]["sentinel"][0]["attempts"] == [1.5, 1.05]
    assert report["summary"]["sentinel"][0]["scale"] == pytest.approx(1.05)



def test_a_later_macro_without_repeatable_sentinel_keeps_the_earlier_rescaling(tiny_macro: MacroConfig, rng,
                                                                               tmp_path) -> None:
    """Macro A rescales, macro B's sentinel cannot be timed: A's rows keep their rescaling, the table prints."""
    small = tiny_macro.at_resolution(4)
    space, small_space = SearchSpace(tiny_macro), SearchSpace(small)
    members = [FrontMember(space.sample(rng), 0.1, 1.0, 0.01), FrontMember(small_space.sample(rng), 0.2, 0.5, 0.01)]
    front = ParetoFront(members, (1.0, 10.0, 1.0))
    profiles = [SimpleNamespace(device={"threads": 1}, validation={"noise_ceiling_within_10pct": 1.0},
                                sentinel={"latency_ms": 0.2}, name=f"p{m.resolution}", macro=m) for m in (tiny_macro, small)]

    def scale(p):
        if p.macro == small:
            raise ValueError("profile has no repeatable sentinel")
        return 1.25, 0.25

    report = export_front(front, tmp_path, profile=profiles, measure_fn=lambda gs: np.array([1.25, 0.6]), scale_fn=scale)
    s = report["summary"]
    assert s["sentinel"] == [{"profile": "p8", "resolution": 8, "scale": 1.25, "now_ms": 0.25, "profile_ms": 0.2}]
    assert report["members"][0]["latency_ratio_rescaled"] == pytest.approx(1.0)
    assert "latency_ratio_rescaled" not in report["members"][1]
    table = format_table(report)  # was a TypeError: the summary's sentinel list was None
    assert "x 1.250 (8px)" in table
def test_a_rerun_keeps_the_members_an_interrupted_export_finished(front: ParetoFront, tmp_path, monkeypatch,
                                                                   caplog) -> None:
    calls, killed = [], []
    real = exporter._export_member

    def dies_on_the_second(rank, *args, **kwargs):
        if rank == 1 and not killed:
            killed.append(rank)
            raise KeyboardInterrupt  # the kill, after member 0 was exported
        calls.append(rank)
        return real(rank, *args, **kwargs)

    monkeypatch.setattr(exporter, "_export_member", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        export_front(front, tmp_path, measure_fn=fake_measure)
    assert (tmp_path / exporter.PARTIAL_NAME).exists()
    calls.clear()
    calls.append("resumed")
    with caplog.at_level("INFO", logger="hwnas.export.exporter"):
        report = export_front(front, tmp_path, measure_fn=fake_measure)
    assert calls == ["resumed", 1]  # member 0 was not exported again
    assert f"resuming {tmp_path}: 1 members already exported" in caplog.text  # said before any work
    assert report["summary"]["n_passed"] == 2 and not (tmp_path / exporter.PARTIAL_NAME).exists()
    assert report == export_front(front, tmp_path / "again", measure_fn=fake_measure)


def test_an_export_killed_while_measuring_times_only_what_is_left(front: ParetoFront, tmp_path, monkeypatch,
                                                                   count_timed_rounds) -> None:
    from hwnas.profiling import timer

    real = timer.run_round

    def dies_in_round_two(cands, r, *args, **kwargs):
        if r == 2:
            raise KeyboardInterrupt  # the kill, after two rounds of timings were kept
        return real(cands, r, *args, **kwargs)

    monkeypatch.setattr(timer, "run_round", dies_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        export_front(front, tmp_path, threads=1)
    assert list(tmp_path.glob("measure-*.partial.json"))

    retimed = count_timed_rounds()
    report = export_front(front, tmp_path, threads=1)
    assert all(m["measured_latency_ms"] > 0 for m in report["members"]), report["members"]
    assert retimed and min(retimed) >= 2  # rounds 0 and 1 were not timed again
    assert not list(tmp_path.glob("measure-*"))


def test_an_error_while_measuring_is_not_taken_for_a_stale_partial_file(front: ParetoFront, tmp_path, monkeypatch) -> None:
    from hwnas.profiling import profiler

    calls = []

    def fails(group, **kwargs):
        calls.append(kwargs["resume"])
        raise ValueError("the runner broke")

    monkeypatch.setattr(profiler, "measure_genotypes", fails)
    group = [m.genotype for m in front.members]
    digest = hashlib.sha1(json.dumps([g.arch_id for g in group]).encode()).hexdigest()[:12]
    (tmp_path / f"measure-{digest}-0.partial.json").write_text("{}")  # this group's partial state exists
    with pytest.raises(ValueError, match="the runner broke"):
        exporter._measure_kept(group, 0, tmp_path)
    assert calls == [True]  # not retried from scratch: only unusable partial state is


def test_a_partial_file_from_other_settings_is_replaced(front: ParetoFront, tmp_path, monkeypatch) -> None:
    from hwnas.profiling import profiler

    calls = []

    def stale_then_fine(group, **kwargs):
        calls.append(kwargs["resume"])
        if kwargs["resume"]:
            raise profiler.UnusablePartialState("started with different settings")
        return "measured"

    monkeypatch.setattr(profiler, "measure_genotypes", stale_then_fine)
    assert exporter._measure_kept([m.genotype for m in front.members], 0, tmp_path) == "measured"
    assert calls == [True, False]
