import json
from dataclasses import replace

import numpy as np
import pytest

from hwnas.config import ProfileConfig
from hwnas.profiling import profiler, sentinel_check, timer
from hwnas.profiling.device_profile import DeviceProfile
from hwnas.profiling.fingerprint import device_fingerprint
from hwnas.space import SearchSpace


@pytest.fixture
def made(tmp_path, tiny_macro, fake_device):
    """A profile of the fake device (latency = a function of the parameter count), saved to disk."""
    cfg = ProfileConfig(device="tiny", out=str(tmp_path / "tiny.json"), macro=tiny_macro, n_calibration=12,
                        n_validation=6, runs=2, warmup=0, rounds=2)
    return profiler.profile_device(cfg), cfg.out


def with_sentinel_ms(profile: DeviceProfile, ms: float) -> DeviceProfile:
    return replace(profile, sentinel={**profile.sentinel, "latency_ms": ms})


def other_device(profile: DeviceProfile) -> DeviceProfile:
    here = device_fingerprint()
    return replace(profile, device={**profile.device, "cpu_model": "ARM Cortex-A72", "machine": "aarch64",
                                    "cores": here["cores"] + 2})


def test_this_machine_passes(made):
    profile, _ = made
    check = sentinel_check.check_sentinel(profile)
    assert check.ok and check.ratio == pytest.approx(1.0) and check.attempts == (pytest.approx(1.0),)


@pytest.mark.parametrize("stored_over_here", [1.15, 0.85, 4.0, 0.25])
def test_a_profile_of_a_faster_or_slower_machine_is_caught(made, stored_over_here):
    """The profile's stored sentinel is 1.15x / 0.85x / 4x / 0.25x what this machine measures: off, every time."""
    profile, _ = made
    now = sentinel_check.measure_sentinel(profile)
    check = sentinel_check.check_sentinel(with_sentinel_ms(profile, now * stored_over_here))
    assert not check.ok and len(check.attempts) == sentinel_check.ATTEMPTS
    assert check.ratio == pytest.approx(1 / stored_over_here)


@pytest.mark.parametrize("slower", [1.15, 1 / 1.15, 4.0])
def test_a_machine_slower_or_faster_than_profiled_is_caught_through_the_timer(made, monkeypatch, slower):
    profile, _ = made
    fast = timer.time_model
    monkeypatch.setattr(timer, "time_model", lambda model, shape, cfg: slower * fast(model, shape, cfg))
    check = sentinel_check.check_sentinel(profile)
    assert not check.ok and check.ratio == pytest.approx(slower)
    assert f"{check.measured_ms:.4g} ms here vs {check.profiled_ms:.4g} ms" in check.message()


def test_tolerance_follows_the_profiles_own_noise_within_bounds(made):
    profile, _ = made
    assert sentinel_check.tolerance(profile) == sentinel_check.MIN_TOLERANCE  # the fake device is noise-free

    def noisy(spread: float) -> DeviceProfile:
        vs = [{**e, "latency_ms_a": e["latency_ms_b"] * (1 + spread * (i % 2))} for i, e in enumerate(profile.validation_set * 5)]
        return replace(profile, validation_set=vs)

    assert sentinel_check.tolerance(noisy(0.08)) == pytest.approx(0.08)
    assert sentinel_check.tolerance(noisy(0.5)) == sentinel_check.MAX_TOLERANCE
    assert sentinel_check.tolerance(replace(profile, validation_set=[])) == sentinel_check.MAX_TOLERANCE


def test_a_burst_during_the_first_attempt_is_retried():
    profile = DeviceProfile(name="p", device={}, macro=None, validation={}, sentinel={"latency_ms": 1.0})
    times = iter([1.5, 1.02])
    check = sentinel_check.check_sentinel(profile, measure=lambda p: next(times))
    assert check.ok and check.attempts == (1.5, 1.02)


def test_validate_refuses_unless_trusted_and_skips_another_device(made, monkeypatch, caplog):
    profile, _ = made
    off = with_sentinel_ms(profile, profile.sentinel["latency_ms"] / 1.3)
    with pytest.raises(ValueError, match=r"ratio 1\.30.*--trust-profile"):
        sentinel_check.validate_here(off)
    monkeypatch.setattr(timer, "time_model", lambda *a: pytest.fail("timed although trusted / another device's"))
    match, check = sentinel_check.validate_here(off, trust=True)
    assert check is None and "--trust-profile" in caplog.text
    match, check = sentinel_check.validate_here(other_device(off))
    assert match.other and check is None


def test_sentinel_scale_times_the_stored_sentinel_arch(made, fake_device, rng):
    """Issue 18: sentinel_scale regenerated the sentinel from a seed instead of reading profile.sentinel.arch."""
    profile, _ = made
    g = SearchSpace(profile.macro).sample(rng)  # not the seeded sentinel
    stored = replace(profile, sentinel={"arch": g.to_dict(), "arch_id": g.arch_id, "latency_ms": 1.0})
    fake_device.clear()
    scale, now = profiler.sentinel_scale(stored)
    want = profiler.onnx_bytes(profiler.Network(g), None)
    assert want in fake_device  # the stored network was timed
    assert now == pytest.approx(float(want.decode())) and scale == pytest.approx(now)


def test_sentinel_scale_times_the_sentinel_interleaved_like_the_profile(made, monkeypatch):
    """Issue 18: timed alone in fresh sessions, the sentinel ran faster than in the profile's interleaved rounds."""
    profile, _ = made
    alone = timer.time_model
    # interleaved with a partner the sentinel runs as profiled; alone in a fresh session it runs 0.7x as long
    monkeypatch.setattr(timer, "time_pair", lambda a, b, cfg: (alone(a.model, a.input_shape, cfg),
                                                                alone(b.model, b.input_shape, cfg)))
    monkeypatch.setattr(timer, "time_model", lambda model, shape, cfg: 0.7 * alone(model, shape, cfg))
    scale, _ = profiler.sentinel_scale(profile)
    assert scale == pytest.approx(1.0)


def test_export_does_not_measure_against_another_devices_profile(made, tmp_path, monkeypatch):
    from hwnas.export import export_front
    from hwnas.search.front import FrontMember, ParetoFront

    profile, _ = made
    g = SearchSpace(profile.macro).sample(np.random.default_rng(1))
    front = ParetoFront([FrontMember(g, 0.5, 1.0, 0.01)], reference_point=(1.0, 10.0, 1.0))
    monkeypatch.setattr(profiler, "measure_genotypes", lambda *a, **k: pytest.fail("measured against another device"))
    report = export_front(front, tmp_path / "exp", profile=other_device(profile))
    note = report["summary"]["not_measured"]
    assert note.startswith("not measured here: profile is for device") and "ARM Cortex-A72" in note
    assert report["members"][0]["measured_latency_ms"] is None


def test_pipeline_measures_its_own_profile_when_the_shipped_sentinel_is_off(made, tmp_path, monkeypatch):
    from hwnas import pipeline

    profile, path = made
    shipped = tmp_path / "shipped.json"
    measured = []
    monkeypatch.setattr("hwnas.profiling.default_profile_path", lambda macro, **kw: shipped)
    monkeypatch.setattr(profiler, "profile_device", lambda cfg, progress=None: measured.append(cfg.out))
    out = tmp_path / "run"
    out.mkdir()
    with_sentinel_ms(profile, profile.sentinel["latency_ms"] / 4).save(shipped)  # profiled on a 4x faster host
    got = pipeline._profile_for(profile.macro, out, pipeline.PLANS["quick"], None)
    assert measured == [str(out / "profile-8px.json")] and got == out / "profile-8px.json"
    profile.save(shipped)  # now the shipped one is this machine's speed: used, and the choice kept for a resume
    out2 = tmp_path / "run2"
    out2.mkdir()
    assert pipeline._profile_for(profile.macro, out2, pipeline.PLANS["quick"], None) == shipped
    assert json.loads((out2 / "profile-8px.shipped.json").read_text())["sentinel_check"]["ok"] is True
    assert len(measured) == 1


def test_cli_predict_refuses_an_off_profile_and_another_provider(made, tmp_path, rng, capsys):
    from hwnas.cli import main

    profile, path = made
    arch = tmp_path / "arch.json"
    SearchSpace(profile.macro).sample(rng).save(arch)
    off = tmp_path / "off.json"
    with_sentinel_ms(profile, profile.sentinel["latency_ms"] * 1.2).save(off)
    assert main(["predict", "--profile", str(off), str(arch)]) == 2
    err = capsys.readouterr().err
    assert "ms here vs" in err and "ratio 0.83" in err
    assert main(["predict", "--profile", str(off), "--trust-profile", str(arch)]) == 0
    capsys.readouterr()
    assert main(["predict", "--profile", path, "--provider", "CUDAExecutionProvider", str(arch)]) == 2
    assert "measured with another" in capsys.readouterr().err


def test_unavailable_provider_is_a_clear_error_listing_the_available(tmp_path, rng, tiny_macro, capsys):
    import onnxruntime as ort

    from hwnas.cli import main

    with pytest.raises(ValueError, match="not available.*available: .*CPUExecutionProvider"):
        timer.check_provider("NoSuchExecutionProvider")
    arch = tmp_path / "arch.json"
    SearchSpace(tiny_macro).sample(rng).save(arch)
    assert main(["measure", "--provider", "NoSuchExecutionProvider", str(arch)]) == 2
    err = capsys.readouterr().err
    assert "NoSuchExecutionProvider" in err and all(p in err for p in ort.get_available_providers())
    assert main(["profile", "--provider", "CPUExecutionProvider", "--provider-option", "oops", "--out",
                 str(tmp_path / "p.json")]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_provider_options_are_recorded_and_normalised():
    cfg = timer.TimingConfig(provider_options={"b": 2, "a": "x"})
    assert cfg.provider_options == (("a", "x"), ("b", "2")) and hash(cfg)
    assert cfg.to_dict()["provider_options"] == {"a": "x", "b": "2"}
    assert timer.TimingConfig(**cfg.to_dict()) == cfg  # what a profile stores reads back


def test_profile_records_provider_and_options_and_predictions_require_them(tiny_macro):
    cfg = ProfileConfig(device="p", macro=tiny_macro, n_calibration=10, n_validation=5, rounds=2,
                        provider="CPUExecutionProvider", provider_options={"arena": "0"})
    plan = profiler.make_plan(cfg)
    records = [(key, r, 0.01 + 0.001 * i, 1.0) for r in range(2) for i, (key, _) in enumerate(plan.jobs())]
    profile = profiler.profile_from_records(plan, records, device_fingerprint())
    assert profile.device["provider"] == "CPUExecutionProvider" and profile.device["provider_options"] == {"arena": "0"}
    assert sentinel_check.profile_timing(profile).provider_options == (("arena", "0"),)
    sentinel_check.require_settings([profile], "CPUExecutionProvider", {"arena": "0"})
    with pytest.raises(ValueError, match="provider options"):
        sentinel_check.require_settings([profile], "CPUExecutionProvider", {"arena": "1"})
    other = replace(profile, name="q", device={**profile.device, "provider": "XnnpackExecutionProvider"})
    with pytest.raises(ValueError, match="different execution providers"):
        sentinel_check.require_settings([profile, other])


def test_search_validation_loads_checks_and_refuses_an_off_profile(made, tmp_path):
    """What `hwnas search` runs before building the problem."""
    profile, path = made
    assert [p.name for p in sentinel_check.validate_profiles([path])] == ["tiny"]
    off = tmp_path / "off.json"
    with_sentinel_ms(profile, profile.sentinel["latency_ms"] * 0.8).save(off)
    with pytest.raises(ValueError, match=r"ratio 1\.25"):
        sentinel_check.validate_profiles([path, str(off)])
    assert len(sentinel_check.validate_profiles([str(off)], trust=True)) == 1
    with pytest.raises(ValueError, match="measured with another"):
        sentinel_check.validate_profiles([path], provider="XnnpackExecutionProvider")
