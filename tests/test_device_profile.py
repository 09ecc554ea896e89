import json
import warnings

import numpy as np
import pytest

import hwnas.jsonio

from hwnas.config import MacroConfig, ProfileConfig
from hwnas.predictors import create_predictor
from hwnas.profiling import default_profile_path, profiler
from hwnas.profiling.device_profile import DeviceProfile
from hwnas.profiling.fingerprint import device_fingerprint


def synthetic_profile(macro, fingerprint=None, seed=0) -> DeviceProfile:
    """A profile assembled from made-up timing records (no timing): latency grows with the model size key."""
    cfg = ProfileConfig(device="synthetic", macro=macro, n_calibration=10, n_validation=5, rounds=2, seed=seed)
    plan = profiler.make_plan(cfg)
    rng = np.random.default_rng(seed)
    records = [(key, r, float(rng.uniform(0.01, 0.05)), 1.0) for r in range(2) for key, _ in plan.jobs()]
    return profiler.profile_from_records(plan, records, fingerprint or device_fingerprint())


@pytest.fixture(scope="module")
def profile_text(tmp_path_factory) -> str:
    """One synthetic profile for the whole module (at the conftest tiny macro)."""
    path = tmp_path_factory.mktemp("profile") / "p.json"
    synthetic_profile(MacroConfig(C=4, layers=3, in_channels=1, resolution=8, classes=10)).save(path)
    return path.read_text()


@pytest.fixture
def saved(tmp_path, tiny_macro, profile_text):
    path = tmp_path / "p.json"
    path.write_text(profile_text)
    return path


def test_round_trip_keeps_everything(saved, tiny_macro):
    profile = DeviceProfile.load(saved, expected_macro=tiny_macro)
    again = saved.parent / "again.json"
    profile.save(again)
    assert json.loads(again.read_text()) == json.loads(saved.read_text())
    data = json.loads(saved.read_text())
    assert data["schema_version"] == 1 and data["space"]["macro"] == tiny_macro.to_dict()
    for key in ("n", "mape", "within_5pct", "within_10pct", "spearman", "kendall", "noise_ceiling_within_10pct"):
        assert key in data["validation"]
    for key in ("cpu_model", "cores", "onnxruntime_version", "provider", "threads", "graph_optimization_level"):
        assert key in data["device"]
    assert profile.matches_this_device()
    assert create_predictor(profile).name == profile.default_predictor


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda text: text[: len(text) // 2], "truncated or corrupt"),
        (lambda text: "", "empty"),
        (lambda text: "\x00\xff garbage", "invalid JSON"),
        (lambda text: json.dumps({"schema_version": 1, "space": "darts-cell", "normal": []}), "not a device profile"),
        (lambda text: json.dumps([1, 2]), "not a device profile"),
        (lambda text: text.replace('"schema_version": 1', '"schema_version": 99', 1), "schema_version 99"),
        (lambda text: text.replace('"darts-cell"', '"other-space"', 1), "space 'other-space'"),
        (lambda text: text.replace('"default_predictor": "', '"default_predictor": "x', 1), "default_predictor"),
    ],
)
def test_bad_files_raise_value_error_naming_the_file(saved, mutate, message):
    saved.write_text(mutate(saved.read_text()))
    with pytest.raises(ValueError, match=message) as err:
        DeviceProfile.load(saved)
    assert str(saved) in str(err.value)


def test_missing_file_and_other_macro(saved, tmp_path, tiny_macro):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        DeviceProfile.load(tmp_path / "nope.json")
    other = MacroConfig(C=8, layers=3, resolution=8)
    with pytest.raises(ValueError, match="measured for macro") as err:
        DeviceProfile.load(saved, expected_macro=other)
    assert str(saved) in str(err.value)


def test_other_device_warns(tmp_path, tiny_macro):
    path = tmp_path / "elsewhere.json"
    synthetic_profile(tiny_macro, {**device_fingerprint(), "cpu_model": "Some Other CPU", "cores": 64}).save(path)
    with pytest.warns(UserWarning, match="another device.*cpu_model"):
        profile = DeviceProfile.load(path)
    assert not profile.matches_this_device()


def test_save_is_atomic(saved, tiny_macro, monkeypatch):
    before = saved.read_text()
    profile = DeviceProfile.load(saved)

    def interrupted_fsync(*args, **kwargs):
        raise KeyboardInterrupt  # interrupted after the temp file is written, before the rename

    monkeypatch.setattr(hwnas.jsonio.os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        profile.save(saved)
    assert saved.read_text() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temp file left behind


def test_default_profile_path_finds_the_matching_profile(tmp_path, tiny_macro):
    assert default_profile_path(tiny_macro, tmp_path) is None
    (tmp_path / "broken.json").write_text("{")
    synthetic_profile(tiny_macro, {**device_fingerprint(), "cores": 999}).save(tmp_path / "a_other_device.json")
    assert default_profile_path(tiny_macro, tmp_path) is None
    synthetic_profile(tiny_macro).save(tmp_path / "b_here.json")
    assert default_profile_path(tiny_macro, tmp_path) == tmp_path / "b_here.json"
    assert default_profile_path(MacroConfig(C=8, layers=3, resolution=8), tmp_path) is None
    assert default_profile_path(tiny_macro, tmp_path / "missing") is None


def test_cli_predict_uses_the_profile(saved, tmp_path, tiny_macro, rng, capsys):
    from hwnas.cli import main
    from hwnas.space import SearchSpace

    g = SearchSpace(tiny_macro).sample(rng)
    arch = tmp_path / "arch.json"
    g.save(arch)
    assert main(["predict", "--profile", str(saved), "--trust-profile", str(arch)]) == 0  # made-up timings
    out = json.loads(capsys.readouterr().out)
    want = create_predictor(DeviceProfile.load(saved)).predict([g])[0]
    assert out["latency_ms"][str(arch)] == pytest.approx(want, abs=1e-4)
    saved.write_text("{")
    assert main(["predict", "--profile", str(saved), str(arch)]) == 2
    assert str(saved) in capsys.readouterr().err


def test_cli_predict_routes_each_resolution_to_its_profile(saved, tmp_path, tiny_macro, rng, capsys):
    from dataclasses import replace

    from hwnas.cli import main
    from hwnas.space import SearchSpace

    small = tmp_path / "p4.json"
    synthetic_profile(tiny_macro.at_resolution(4), seed=1).save(small)
    g8 = SearchSpace(tiny_macro).sample(rng)
    g4 = replace(g8, macro=tiny_macro.at_resolution(4))
    archs = [tmp_path / "a8.json", tmp_path / "a4.json"]
    g8.save(archs[0])
    g4.save(archs[1])
    assert main(["predict", "--profile", str(saved), "--profile", str(small), "--trust-profile", *map(str, archs)]) == 0
    out = json.loads(capsys.readouterr().out)
    for g, arch, prof in ((g8, archs[0], saved), (g4, archs[1], small)):
        want = create_predictor(DeviceProfile.load(prof)).predict([g])[0]
        assert out["latency_ms"][str(arch)] == pytest.approx(want, abs=1e-4)
    assert [p["resolution"] for p in out["profiles"]] == [8, 4]
    assert main(["predict", "--profile", str(saved), str(archs[1])]) == 2
    assert "is not the macro of any --profile" in capsys.readouterr().err


def test_shipped_profiles_load_and_use_the_current_timing():
    from hwnas.profiling import PROFILES_DIR
    from hwnas.profiling.timer import TimingConfig
    from hwnas.space.genotype import MIN_STAGE_DEPTH, stage_depths

    paths = sorted(PROFILES_DIR.glob("*.json"))
    assert paths, f"no profiles shipped in {PROFILES_DIR}"
    for path in paths:
        profile = DeviceProfile.load(path)
        timing = TimingConfig(**profile.device["timing"])
        # Export re-measures with interleaved, paired timing; a profile timed otherwise would be compared
        # with a different methodology than the one that built it.
        assert timing.paired and timing.combine == "median", f"{path.name} was timed with the earlier methodology"
        assert 0 < profile.validation["mape"] < 10 and profile.validation["n"] >= 30, path.name
        # `hwnas run` searches depth too: its predictions for networks that drop cells must be fitted and validated.
        depths = {tuple(e.get("depth", ())) for e in profile.calibration + profile.validation_set}
        n_depths = int(np.prod([hi - lo + 1 for lo, hi in zip(MIN_STAGE_DEPTH, stage_depths(profile.macro))]))
        assert len(depths) == n_depths, f"{path.name} holds networks of depths {sorted(depths)}, not every elastic depth"


def test_reduced_depth_predictions_drop_the_cells_and_keep_the_fit():
    """A profile of the full macro predicts every elastic depth: the dropped cells' blocks and preprocessing go."""
    from hwnas.predictors import ByMacroPredictor, profile_tables
    from hwnas.profiling.blocks import cell_shapes, pair_block
    from hwnas.space.genotype import Genotype, SearchSpace

    macro = MacroConfig(C=4, layers=5, in_channels=1, resolution=8, classes=10)
    profile = synthetic_profile(macro)
    assert len({tuple(e["depth"]) for e in profile.calibration + profile.validation_set}) > 1  # fitted on every depth
    ops, fixed = profile.blocks["ops_ms"], profile.blocks["fixed_ms"]
    g = SearchSpace(macro).sample(np.random.default_rng(1))
    shallow = Genotype(g.normal, g.reduce, macro, depth=(1, 0, 1))  # drops cell 2

    def blocks_ms(active):
        return sum(ops[pair_block(c, op, inp).key] for c in cell_shapes(macro) if active[c.index]
                   for op, inp in (g.reduce if c.reduction else g.normal))

    want = profile.blocks["overhead_ms"] + sum(v for k, v in fixed.items() if not k.startswith("cell2.")) + blocks_ms(shallow.active_cells)
    assert create_predictor(profile, "blocksum", depth=shallow.depth).predict([shallow])[0] == pytest.approx(want)
    assert profile_tables(profile, (1, 1, 1))[1] == pytest.approx(profile_tables(profile)[1])
    # The fitted scale carries over: full minus shallow is the dropped cell's fixed parts plus its scaled blocks.
    full_pred, shallow_pred = create_predictor(profile, "scaled"), create_predictor(profile, "scaled", depth=(1, 0, 1))
    dropped = fixed["cell2.pre0"] + fixed["cell2.pre1"] + full_pred.coef_[0] * (blocks_ms((True,) * 5) - blocks_ms(shallow.active_cells))
    # (abs: the profile stores the full table rounded to 1e-7 ms per entry)
    assert full_pred.predict([g])[0] - shallow_pred.predict([shallow])[0] == pytest.approx(dropped, abs=1e-5)
    calibrated = create_predictor(profile, "calibrated")
    same = calibrated.with_blocks(calibrated.block_table, calibrated.fixed_ms, ())
    assert same.predict([g])[0] == pytest.approx(calibrated.predict([g])[0], abs=1e-5)  # stored table = coef x blocks
    with pytest.raises(ValueError, match="covers depth full"):
        calibrated.predict([shallow])
    routed = ByMacroPredictor.from_profiles([profile]).predict([g, shallow])
    np.testing.assert_allclose(routed, [create_predictor(profile).predict([g])[0], create_predictor(profile, depth=(1, 0, 1)).predict([shallow])[0]])
    with pytest.raises(ValueError, match=r"depth\[1\] = 2"):
        create_predictor(profile, depth=(1, 2, 1))


def test_refit_reproduces_the_fit_from_the_stored_measurements(tmp_path):
    """`hwnas profile --refit`: the same records give the same predictors and validation, without timing."""
    from hwnas.cli import main
    from hwnas.profiling.profiler import refit_profile

    profile = synthetic_profile(MacroConfig(C=4, layers=5, in_channels=1, resolution=8, classes=10))
    again = refit_profile(profile)
    assert again.default_predictor == profile.default_predictor
    assert again.validation["mape"] == pytest.approx(profile.validation["mape"], rel=1e-6)
    for name, params in profile.predictors.items():
        np.testing.assert_allclose(again.predictors[name]["table_ms"], params["table_ms"], atol=1e-6)
    path = tmp_path / "p.json"
    profile.save(path)
    assert main(["profile", "--refit", str(path), "--out", str(tmp_path / "q.json")]) == 0
    assert DeviceProfile.load(tmp_path / "q.json").meta["refitted"]
    broken = profile.to_dict()
    broken["calibration"][0].pop("latency_ms")
    (tmp_path / "b.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="stored measurements are incomplete"):
        refit_profile(DeviceProfile.load(tmp_path / "b.json"))
