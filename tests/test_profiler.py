import json
import logging

import numpy as np
import pytest
from torch import nn

from hwnas.config import MacroConfig, ProfileConfig
from hwnas.predictors import create_predictor
from hwnas.profiling import profiler, timer
from hwnas.profiling.device_profile import DeviceProfile
from hwnas.space import SearchSpace, count_params


def small_cfg(tmp_path, macro, **kw):
    base = dict(device="tiny", out=str(tmp_path / "tiny.json"), macro=macro, n_calibration=12, n_validation=6,
                runs=2, warmup=0, rounds=2)
    return ProfileConfig(**{**base, **kw})


def test_profile_device_writes_a_loadable_profile(tmp_path, tiny_macro, fake_device):
    cfg = small_cfg(tmp_path, tiny_macro)
    profile = profiler.profile_device(cfg)
    loaded = DeviceProfile.load(cfg.out, expected_macro=tiny_macro)
    assert loaded.to_dict() == json.loads(json.dumps(profile.to_dict()))
    assert not profiler.sidecar_path(profiler.default_out(cfg)).exists()
    v = loaded.validation
    assert v["n"] == 6 and v["noise_ceiling_within_10pct"] == 1.0  # the fake device is noise-free
    assert loaded.device["threads"] == 1 and loaded.device["graph_optimization_level"] == "ORT_ENABLE_ALL"
    # The fake latency is additive over parameters, so the calibrated predictor should be near exact, at every width.
    from hwnas.predictors import ByMacroPredictor
    from hwnas.space import Network

    plan = profiler.make_plan(cfg)
    assert len({g.width for g in plan.validation}) > 1 and loaded.covers_width()
    truth = [0.01 + 1e-6 * count_params(Network(g)) for g in plan.validation]
    np.testing.assert_allclose(ByMacroPredictor.from_profiles([loaded], "calibrated").predict(plan.validation), truth, rtol=0.02)
    full = [g for g in plan.validation if not g.width]
    np.testing.assert_allclose(create_predictor(loaded, "calibrated").predict(full),
                               [0.01 + 1e-6 * count_params(Network(g)) for g in full], rtol=0.02)


def test_interrupt_then_resume_measures_only_what_is_missing(tmp_path, tiny_macro, fake_device):
    cfg = small_cfg(tmp_path, tiny_macro)
    seen = {"timed": 0}

    def interrupt(advance, total, stage):
        if stage.startswith("round"):
            seen["timed"] += advance
            if seen["timed"] == 25:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profiler.profile_device(cfg, progress=interrupt)
    side = profiler.sidecar_path(profiler.default_out(cfg))
    state = json.loads(side.read_text())
    assert len(state["records"]) == 25 and not (tmp_path / "tiny.json").exists()
    n_jobs = len(profiler.make_plan(cfg).jobs())
    fake_device.clear()
    profiler.profile_device(small_cfg(tmp_path, tiny_macro, resume=True))
    assert len(fake_device) == 2 * (cfg.rounds * n_jobs - 25)  # sentinel + candidate per missing timing
    assert (tmp_path / "tiny.json").exists() and not side.exists()


def test_resume_refuses_other_settings(tmp_path, tiny_macro, fake_device):
    cfg = small_cfg(tmp_path, tiny_macro)
    with pytest.raises(KeyboardInterrupt):
        profiler.profile_device(cfg, progress=lambda a, t, s: (_ for _ in ()).throw(KeyboardInterrupt) if s.startswith("round") else None)
    with pytest.raises(ValueError, match="different settings.*runs"):
        profiler.profile_device(small_cfg(tmp_path, tiny_macro, resume=True, runs=3))


def test_budget_stops_after_two_rounds_and_keeps_state(tmp_path, tiny_macro, fake_device, caplog):
    cfg = small_cfg(tmp_path, tiny_macro, rounds=4, budget_min=1e-9)
    with caplog.at_level(logging.WARNING):
        profile = profiler.profile_device(cfg)
    assert profile.meta["rounds_completed"] == 2 and "budget" in caplog.text
    assert profiler.sidecar_path(profiler.default_out(cfg)).exists()  # --resume can add the other rounds


def test_sample_sets_are_disjoint_and_exclude_the_sentinel(tiny_macro):
    cal, val = profiler.sample_sets(tiny_macro, 30, 20, seed=1)
    ids = [g.arch_id for g in cal + val]
    assert len(set(ids)) == 50 and profiler.sentinel_genotype(tiny_macro).arch_id not in ids


def test_measure_genotypes_real_onnxruntime(tiny_macro, rng):
    gs = [SearchSpace(tiny_macro).sample(rng) for _ in range(2)]
    m = profiler.measure_genotypes(gs, rounds=2, runs=3, warmup=1, detailed=True)
    assert m.ms.shape == m.ms_a.shape == m.ms_b.shape == (2,) and np.all(m.ms > 0) and m.sentinel_ms > 0
    # The median over all rounds lies between the medians over the even and over the odd rounds.
    assert np.all(np.minimum(m.ms_a, m.ms_b) - 1e-12 <= m.ms) and np.all(m.ms <= np.maximum(m.ms_a, m.ms_b) + 1e-12)
    other = SearchSpace(MacroConfig(C=4, layers=3, resolution=6)).sample(rng)
    with pytest.raises(ValueError, match="one macro"):
        profiler.measure_genotypes([gs[0], other])


def test_cli_export_single_architecture(tmp_path, genotype, capsys):
    from hwnas.cli import main

    arch = tmp_path / "arch.json"
    genotype.save(arch)
    assert main(["export", "--arch", str(arch), "--out", str(tmp_path / "m.onnx")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (tmp_path / "m.onnx").exists() and report["max_abs_diff"] <= 1e-4
    assert main(["export"]) == 2  # neither DIR nor --arch/--out
    assert "--arch" in capsys.readouterr().err


def test_resume_rejects_a_malformed_sidecar(tmp_path, tiny_macro, fake_device):
    cfg = small_cfg(tmp_path, tiny_macro, resume=True)
    side = profiler.sidecar_path(profiler.default_out(cfg))
    version = profiler.SIDECAR_SCHEMA_VERSION
    side.write_text(json.dumps({"schema_version": version, "config": cfg.measurement_key(), "records": [["a", 0]]}))
    with pytest.raises(ValueError, match="malformed") as err:
        profiler.profile_device(cfg)
    assert str(side) in str(err.value)
    # Records of the earlier methodology (sentinel timed before, not interleaved) are not mixed into a profile.
    side.write_text(json.dumps({"schema_version": 1, "config": cfg.measurement_key(), "records": []}))
    with pytest.raises(ValueError, match="not a partial profile of this hwnas version"):
        profiler.profile_device(cfg)
    side.write_text("{\"schema_version\": 1, \"rec")
    with pytest.raises(ValueError, match="truncated"):
        profiler.profile_device(cfg)


def test_sentinel_scale_ignores_runs_of_slow_sessions(tmp_path, tiny_macro, fake_device, monkeypatch):
    cfg = small_cfg(tmp_path, tiny_macro)
    profile = profiler.profile_device(cfg)
    # most sessions land ~1.9x slow (seen on shared hosts); the fast level is the device's speed
    calls = iter(range(10**6))
    fast = timer.time_model
    monkeypatch.setattr(timer, "time_model",
                        lambda model, shape, c: (1.0 if next(calls) % 3 == 0 else 1.9) * fast(model, shape, c))
    scale, _ = profiler.sentinel_scale(profile)
    assert scale == pytest.approx(1.0)


def test_predict_rescale_follows_the_sentinel_measured_now(tmp_path, tiny_macro, fake_device, monkeypatch, rng, capsys):
    from hwnas.cli import main

    cfg = small_cfg(tmp_path, tiny_macro)
    profile = profiler.profile_device(cfg)
    scale, now = profiler.sentinel_scale(profile)
    assert scale == pytest.approx(1.0) and now == pytest.approx(profile.sentinel["latency_ms"])
    # the device got 1.5x slower since profiling: every session now takes 1.5x as long
    slow = timer.time_model
    monkeypatch.setattr(timer, "time_model", lambda model, shape, c: 1.5 * slow(model, shape, c))
    arch = tmp_path / "arch.json"
    SearchSpace(tiny_macro).sample(rng).save(arch)
    assert main(["predict", "--profile", cfg.out, str(arch)]) == 2  # 1.5x off: refused without the override
    assert "ratio 1.50" in capsys.readouterr().err
    assert main(["predict", "--profile", cfg.out, "--trust-profile", str(arch)]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["predict", "--profile", cfg.out, "--rescale", str(arch)]) == 0
    scaled = json.loads(capsys.readouterr().out)
    assert scaled["scale"] == pytest.approx(1.5, rel=1e-3)
    assert scaled["latency_ms"][str(arch)] == pytest.approx(1.5 * plain["latency_ms"][str(arch)], abs=2e-4)  # 4 decimals
    foreign = DeviceProfile.from_dict({**profile.to_dict(), "sentinel": {}})
    with pytest.raises(ValueError, match="no sentinel"):
        profiler.sentinel_scale(foreign)


def test_sidecar_journal_keeps_every_timing_a_kill_leaves(tmp_path):
    """Records reach the journal as they finish; a resumed sidecar sees them all, and a torn last line is dropped."""
    path, key = tmp_path / "p.json.partial.json", {"seed": 0}
    side = profiler._Sidecar(path, key, resume=False)
    for i in range(5):
        side.add((f"k{i}", 0, 1.0 + i, 2.0), elapsed=float(i))
    # SIGKILL: no save, no compaction; the write that was in flight left half a line
    with open(profiler.journal_path(path), "a") as f:
        f.write('["k5", 0, 1.')
    again = profiler._Sidecar(path, key, resume=True)
    assert [r[0] for r in again.records] == [f"k{i}" for i in range(5)] and again.elapsed_before == 4.0
    assert not profiler.journal_path(path).exists()  # folded into the JSON file on resuming
    with pytest.raises(ValueError, match="different settings"):
        profiler._Sidecar(path, {"seed": 1}, resume=True)
    profiler.journal_path(path).write_text('["a", 0, 1.0, 2.0, 1.0]\nnot json\n["b", 0, 1.0, 2.0, 1.0]\n')
    with pytest.raises(ValueError, match="line 2"):
        profiler._Sidecar(path, key, resume=True)


def test_measure_resumed_after_a_kill_times_only_what_is_left(tmp_path, tiny_macro, fake_device, monkeypatch):
    gs = [SearchSpace(tiny_macro).sample(np.random.default_rng(i)) for i in range(3)]
    kw = dict(rounds=2, runs=3, warmup=0, partial=tmp_path / "m.partial.json")
    want = profiler.measure_genotypes(gs, rounds=2, runs=3, warmup=0)
    fake_device.clear()
    real = timer.time_pair

    def dies_after_four(first, second, cfg):
        if len(fake_device) >= 8:  # two time_model calls per pair
            raise KeyboardInterrupt  # stands for the kill: nothing after this point runs
        return real(first, second, cfg)

    monkeypatch.setattr(timer, "time_pair", dies_after_four)
    with pytest.raises(KeyboardInterrupt):
        profiler.measure_genotypes(gs, **kw)
    monkeypatch.setattr(timer, "time_pair", real)
    fake_device.clear()
    got = profiler.measure_genotypes(gs, resume=True, **kw)
    assert len(fake_device) == 2 * (2 * 3 - 4)  # the 4 finished pairs were not timed again
    np.testing.assert_allclose(got, want)
    assert not (tmp_path / "m.partial.json").exists()


def test_width_round_trips_through_the_profile_and_refit(tmp_path, tiny_macro, fake_device):
    """Calibration and validation networks of every width are stored with it, read back with it and refitted."""
    from hwnas.predictors import ByMacroPredictor
    from hwnas.space import Network

    cfg = small_cfg(tmp_path, tiny_macro, n_calibration=20, n_validation=12)
    plan = profiler.make_plan(cfg)
    profiler.profile_device(cfg)
    profile = DeviceProfile.load(cfg.out)
    assert profile.widths == (0.5, 0.75, 1.0) and profile.covers_width() and profile.blocks["width_fixed_ms"]
    for entries, nets in ((profile.calibration, plan.calibration), (profile.validation_set, plan.validation)):
        assert [e["width"] for e in entries] == [list(g.stage_width) for g in nets]
        back = [profiler.entry_genotype(tiny_macro, e) for e in entries]
        assert [g.arch_id for g in back] == [e["arch_id"] for e in entries] == [g.arch_id for g in nets]
    assert len({tuple(e["width"]) for e in profile.validation_set}) > 3
    # The validation shows the error at every stage width, each within reach of the overall figure.
    per_width = profile.validation["per_width"]
    assert {(r["stage"], r["width"]) for r in per_width} == {(s, w) for s in range(3) for w in (0.5, 0.75, 1.0)}
    assert sum(r["n"] for r in per_width if r["stage"] == 0) == profile.validation["n"]
    assert all(r["mape"] < 2.0 for r in per_width)  # the fake device is additive: near exact at every width
    again = profiler.refit_profile(profile)
    assert again.validation["mape"] == pytest.approx(profile.validation["mape"], rel=1e-6)
    assert again.validation["per_width"] == pytest.approx(per_width)
    truth = [0.01 + 1e-6 * count_params(Network(g)) for g in plan.validation]
    np.testing.assert_allclose(ByMacroPredictor.from_profiles([again]).predict(plan.validation), truth, rtol=0.02)


def test_refit_refuses_widths_its_blocks_lack(tmp_path, tiny_macro, fake_device):
    cfg = small_cfg(tmp_path, tiny_macro)
    data = profiler.profile_device(cfg).to_dict()
    data["blocks"]["width_choices"] = [1.0]  # as if the blocks were measured without elastic width
    with pytest.raises(ValueError, match="profile 'tiny'.*cover stage widths \\[1.0\\] only; re-profile with elastic width"):
        profiler.refit_profile(DeviceProfile.from_dict(data))
    data["blocks"]["width_choices"] = [0.6, 1.0]
    with pytest.raises(ValueError, match="blocks.width_choices"):
        DeviceProfile.from_dict(data)


def test_profile_without_elastic_width_plans_and_stores_full_width_only(tmp_path, tiny_macro, fake_device):
    from hwnas.profiling import default_profile_path
    from hwnas.profiling.bundle import profile_config_of

    cfg = small_cfg(tmp_path, tiny_macro, elastic_width=False)
    plan = profiler.make_plan(cfg)
    assert all(not g.width for g in plan.calibration + plan.validation)
    assert all("/" not in n for n in plan.fixed)
    profile = profiler.profile_device(cfg)
    assert profile.widths == (1.0,) and "per_width" not in profile.validation
    assert {tuple(e["width"]) for e in profile.calibration} == {(1.0, 1.0, 1.0)}
    assert default_profile_path(tiny_macro, tmp_path) == tmp_path / "tiny.json"
    assert default_profile_path(tiny_macro, tmp_path, elastic_width=True) is None
    profiler.profile_device(small_cfg(tmp_path, tiny_macro, out=str(tmp_path / "wide.json")))
    assert default_profile_path(tiny_macro, tmp_path, elastic_width=True) == tmp_path / "wide.json"
    # A bundle written before elastic width planned full width only, and is read back so.
    key = {k: v for k, v in cfg.measurement_key().items() if k != "elastic_width"}
    assert not profile_config_of({"profile": {"device": "d", "config": key}}).elastic_width


def test_sample_sets_cover_every_width_when_asked(tiny_macro):
    cal, val = profiler.sample_sets(tiny_macro, 30, 20, seed=1, width=True)
    assert len({g.arch_id for g in cal + val}) == 50
    assert {w for g in cal + val for w in g.stage_width} == {0.5, 0.75, 1.0}
    assert all(not g.width for g in sum(profiler.sample_sets(tiny_macro, 30, 20, seed=1), []))
