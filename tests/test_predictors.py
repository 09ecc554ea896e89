import numpy as np
import pytest

from hwnas.predictors import BlockSumPredictor, CalibratedPredictor, encode_all
from hwnas.predictors.base import flat_index
from hwnas.predictors.metrics import agreement, noise_ceiling
from hwnas.profiling.blocks import N_PAIRS, op_blocks, pair_block, pair_tables
from hwnas.profiling.blocks import cell_shapes
from hwnas.space import SearchSpace
from hwnas.space.ops import GENOTYPE_OPS


@pytest.fixture
def block_ms(tiny_macro, rng):
    return {b.key: float(rng.uniform(0.001, 0.05)) for b in op_blocks(tiny_macro)}


def slow_blocksum(genotype, block_ms, fixed):
    """The definition: fixed parts plus the block every edge of every cell runs."""
    total = fixed
    for cell in cell_shapes(genotype.macro):
        for op, inp in genotype.reduce if cell.reduction else genotype.normal:
            total += block_ms[pair_block(cell, op, inp).key]
    return total


def test_table_lookup_equals_slow_path(tiny_macro, rng, block_ms):
    space = SearchSpace(tiny_macro)
    gs = [space.sample(rng) for _ in range(20)]
    pred = BlockSumPredictor(pair_tables(tiny_macro, block_ms), 0.1).fit(gs, np.ones(len(gs)))
    want = [slow_blocksum(g, block_ms, 0.1) for g in gs]
    np.testing.assert_allclose(pred.predict(gs), want, rtol=1e-12)


def test_encode_all_matches_search_space_encoding(tiny_macro, rng):
    space = SearchSpace(tiny_macro)
    gs = [space.sample(rng) for _ in range(5)]
    np.testing.assert_array_equal(encode_all(gs), np.stack([space.encode(g) for g in gs]))
    assert flat_index(encode_all(gs)).shape == (5, N_PAIRS)
    with pytest.raises(ValueError, match="shape"):
        flat_index(np.zeros((2, 5), dtype=int))


def test_calibrated_recovers_scaled_blocks_and_op_costs(tiny_macro, rng, block_ms):
    # Ground truth of the calibrated model's form: per-op scale of block time + per-op instance cost + bias.
    space = SearchSpace(tiny_macro)
    table = pair_tables(tiny_macro, block_ms)
    scale = rng.uniform(0.5, 1.5, len(GENOTYPE_OPS))
    cost = rng.uniform(0.0, 0.01, len(GENOTYPE_OPS))
    truth = table * scale[None, :, None] + cost[None, :, None]
    x_all = encode_all([space.sample(rng) for _ in range(300)])
    y_all = 0.2 + truth.ravel()[flat_index(x_all)].sum(1)
    pred = CalibratedPredictor(table, 0.2).fit_encoded(x_all[:200], y_all[:200])
    got = pred.predict_encoded(x_all[200:])
    assert np.max(np.abs(got / y_all[200:] - 1)) < 0.01
    blocksum = BlockSumPredictor(table, 0.2).fit_encoded(x_all[:200], y_all[:200]).predict_encoded(x_all[200:])
    assert np.mean(np.abs(blocksum / y_all[200:] - 1)) > 0.02  # the raw sum is off; calibration fixes it


def test_unfitted_and_bad_params_raise(tiny_macro, block_ms):
    table = pair_tables(tiny_macro, block_ms)
    with pytest.raises(ValueError, match="not fitted"):
        CalibratedPredictor(table, 0.1).predict_encoded(np.zeros((1, 32), dtype=int))
    with pytest.raises(ValueError, match="table_ms"):
        CalibratedPredictor.from_dict({"table_ms": [[1.0]], "intercept_ms": 0.0}, table, 0.1)
    with pytest.raises(ValueError, match="missing|bad"):
        CalibratedPredictor.from_dict({"intercept_ms": 0.0}, table, 0.1)
    with pytest.raises(ValueError, match="need >= 3"):
        CalibratedPredictor(table, 0.1).fit_encoded(np.zeros((2, 32), dtype=int), np.ones(2))


def test_round_trip_through_dict(tiny_macro, rng, block_ms):
    space = SearchSpace(tiny_macro)
    x = encode_all([space.sample(rng) for _ in range(30)])
    y = rng.uniform(0.2, 0.4, 30)
    table = pair_tables(tiny_macro, block_ms)
    pred = CalibratedPredictor(table, 0.1).fit_encoded(x, y)
    back = CalibratedPredictor.from_dict(pred.to_dict(), table, 0.1)
    np.testing.assert_allclose(back.predict_encoded(x), pred.predict_encoded(x), rtol=1e-5)


def test_metrics():
    m = np.array([1.0, 2.0, 3.0, 4.0])
    figs = agreement(m * np.array([1.0, 1.04, 1.08, 1.2]), m)
    assert figs["within_5pct"] == 0.5 and figs["within_10pct"] == 0.75
    assert figs["spearman"] == pytest.approx(1.0) and figs["kendall"] == pytest.approx(1.0)
    assert figs["mape"] == pytest.approx(100 * (0 + 0.04 + 0.08 + 0.2) / 4)
    nc = noise_ceiling(m, m * np.array([1.0, 1.2, 1.0, 0.95]))
    assert nc["noise_ceiling_within_10pct"] == 0.75


def test_by_macro_predictor_routes_each_genotype_to_its_resolution(tiny_macro, rng, block_ms):
    from dataclasses import replace

    from hwnas.predictors import ByMacroPredictor

    small = tiny_macro.at_resolution(4)
    small_ms = {b.key: float(rng.uniform(0.001, 0.01)) for b in op_blocks(small)}
    preds = {tiny_macro: BlockSumPredictor(pair_tables(tiny_macro, block_ms), 0.1).fit([], []),
             small: BlockSumPredictor(pair_tables(small, small_ms), 0.05).fit([], [])}
    space = SearchSpace(tiny_macro, resolutions=[4, 8])
    gs = [space.sample(rng) for _ in range(30)]
    got = ByMacroPredictor(preds).predict(gs)
    want = [slow_blocksum(g, block_ms if g.macro == tiny_macro else small_ms, 0.1 if g.macro == tiny_macro else 0.05)
            for g in gs]
    assert {g.macro.resolution for g in gs} == {4, 8}
    np.testing.assert_allclose(got, want, rtol=1e-12)
    with pytest.raises(ValueError, match="no latency profile for macro.*resolutions \\[4, 8\\]"):
        ByMacroPredictor(preds).predict([replace(gs[0], macro=tiny_macro.at_resolution(6))])


def test_fit_on_networks_of_every_depth_recovers_the_scale(rng):
    """Networks that drop cells are fitted with the block tables of the cells they keep."""
    from hwnas.config import MacroConfig
    from hwnas.predictors import ScaledBlockSumPredictor
    from hwnas.profiling.blocks import depth_tables

    macro = MacroConfig(C=4, layers=5, in_channels=1, resolution=8, classes=10)
    blocks = {"overhead_ms": 0.01, "ops_ms": {b.key: float(rng.uniform(0.001, 0.05)) for b in op_blocks(macro)},
              "fixed_ms": {n: float(rng.uniform(0.001, 0.01)) for n in ("stem", "head", *(f"cell{i}.pre{k}" for i in range(5) for k in (0, 1)))}}
    space = SearchSpace(macro, depth=True)
    gs = [space.sample(rng) for _ in range(60)]
    tables = depth_tables(macro, blocks, [g.depth for g in gs])
    truth = {d: ScaledBlockSumPredictor(*t) for d, t in tables.items()}
    y = np.array([truth[g.depth].fixed_ms + 0.002 + 1.3 * slow_blocksum_table(truth[g.depth].block_table, g) for g in gs])
    pred = ScaledBlockSumPredictor(*tables[()]).fit(gs[:40], y[:40], depth_tables=tables)
    assert pred.coef_[0] == pytest.approx(1.3, rel=1e-3)
    held = [pred.with_blocks(tables[g.depth].table, tables[g.depth].fixed_ms, g.depth).predict([g])[0] for g in gs[40:]]
    np.testing.assert_allclose(held, y[40:], rtol=1e-3)
    assert {g.depth for g in gs} >= {(), (1, 0, 0)}
    with pytest.raises(ValueError, match="need their block table"):
        ScaledBlockSumPredictor(*tables[()]).fit(gs, y)


def slow_blocksum_table(table, genotype):
    """Sum of a genotype's entries in a summed (pair, op, input) table."""
    return float(table.ravel()[flat_index(encode_all([genotype]))].sum())


def test_shared_factorized_reduce_counts_extra_stride2_skips_per_input_and_is_fitted(tiny_macro, rng, block_ms):
    from hwnas.predictors.base import shared_factorized_reduce
    from hwnas.space import Genotype

    normal = [("sep_conv_3x3", 0), ("sep_conv_3x3", 1)] * 4
    # reduce cell: skip_connect reads input 0 in nodes 0, 1, 2 and input 1 in nodes 0 and 3 -> 2 + 1 extra
    reduce = [("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 0), ("max_pool_3x3", 2),
              ("skip_connect", 0), ("avg_pool_3x3", 3), ("skip_connect", 1), ("sep_conv_3x3", 4)]
    g = Genotype(tuple(normal), tuple(reduce), tiny_macro)
    assert shared_factorized_reduce(encode_all([g])).tolist() == [2 * 3]  # both reduce cells
    space = SearchSpace(tiny_macro)
    gs = [space.sample(rng) for _ in range(120)]
    table = pair_tables(tiny_macro, block_ms)
    x = encode_all(gs)
    truth = BlockSumPredictor(table, 0.1).fit([], [])
    y = truth.predict_encoded(x) - 0.004 * shared_factorized_reduce(x)
    pred = CalibratedPredictor(table, 0.1).fit_encoded(x[:80], y[:80])
    assert pred.shared_fr_ms_ == pytest.approx(-0.004, rel=0.05)
    np.testing.assert_allclose(pred.predict_encoded(x[80:]), y[80:], rtol=0.01)
    again = CalibratedPredictor.from_dict(pred.to_dict(), table, 0.1)
    np.testing.assert_allclose(again.predict_encoded(x[80:]), pred.predict_encoded(x[80:]), rtol=1e-6)


def test_op_costs_are_counted_per_instance_across_depths(rng):
    """A per-op cost is paid once per kept cell running the op: the calibrated fit must see 1 to 3 normal cells."""
    from hwnas.config import MacroConfig
    from hwnas.profiling.blocks import cell_shapes, pair_counts
    from hwnas.profiling.profiler import fit_predictors

    macro = MacroConfig(C=4, layers=5, in_channels=1, resolution=8, classes=10)
    blocks = {"overhead_ms": 0.01, "ops_ms": {b.key: float(rng.uniform(0.001, 0.05)) for b in op_blocks(macro)},
              "fixed_ms": {n: 0.005 for n in ("stem", "head", *(f"cell{i}.pre{k}" for i in range(5) for k in (0, 1)))}}
    cost = dict(zip(GENOTYPE_OPS, rng.uniform(0.005, 0.03, len(GENOTYPE_OPS))))  # per op instance

    def truth(g) -> float:
        ms = blocks["overhead_ms"] + blocks["fixed_ms"]["stem"] + blocks["fixed_ms"]["head"]
        for cell in cell_shapes(macro):
            if g.active_cells[cell.index]:
                ms += 2 * 0.005
                for op, inp in g.reduce if cell.reduction else g.normal:
                    ms += blocks["ops_ms"][pair_block(cell, op, inp).key] + cost[op]
        return ms

    space = SearchSpace(macro, depth=True)
    gs = [space.sample(rng) for _ in range(90)]
    assert {sum(g.stage_depth) for g in gs} == {1, 2, 3}  # normal cells kept
    y = np.array([truth(g) for g in gs])
    fitted, _, validation = fit_predictors(macro, blocks, gs[:60], y[:60], gs[60:], y[60:], y[60:])
    # The model has the truth's form (scale 1 per op, one cost per instance): it must be exact at every depth.
    assert validation["per_predictor"]["calibrated"]["mape"] < 0.2
    coef = np.asarray(fitted["calibrated"]["coef"])
    np.testing.assert_allclose(coef[len(GENOTYPE_OPS):], [cost[o] for o in GENOTYPE_OPS], rtol=0.05)
    assert pair_counts(macro).tolist() == [3] * 8 + [2] * 8
    # Loaded back and moved to another depth, it still charges each dropped op instance.
    from dataclasses import replace

    from hwnas.profiling.blocks import depth_tables

    tables = depth_tables(macro, blocks, [(1, 0, 0)])
    pred = CalibratedPredictor.from_dict(fitted["calibrated"], *tables[()])
    shallow_pred = pred.with_blocks(tables[(1, 0, 0)].table, tables[(1, 0, 0)].fixed_ms, (1, 0, 0), tables[(1, 0, 0)].counts)
    full, shallow = replace(gs[0], depth=()), replace(gs[0], depth=(1, 0, 0))
    got = pred.predict([full])[0] - shallow_pred.predict([shallow])[0]
    assert got == pytest.approx(truth(full) - truth(shallow), rel=0.02)


def width_blocks(macro, rng, elastic_width=True):
    """A blocks section with made-up timings of every block and fixed part a profile of `macro` times."""
    from hwnas.profiling.blocks import blocks_section, fixed_blocks
    from hwnas.profiling.profiler import sentinel_genotype

    fixed = {n: float(rng.uniform(0.001, 0.01)) for n in fixed_blocks(macro, sentinel_genotype(macro), elastic_width)}
    ops = {b.key: float(rng.uniform(0.001, 0.05)) for b in op_blocks(macro, elastic_width)}
    return blocks_section(0.01, fixed, ops, elastic_width)


def slow_latency(genotype, blocks):
    """The definition at any depth and width: overhead, that width's fixed parts and blocks of the kept cells."""
    from hwnas.profiling.blocks import fixed_block_kept, fixed_names

    macro, active = genotype.macro, genotype.active_cells
    all_fixed = {**blocks["fixed_ms"], **blocks["width_fixed_ms"]}
    total = blocks["overhead_ms"] + sum(all_fixed[n] for p, n in fixed_names(macro, genotype.width).items()
                                        if fixed_block_kept(p, active))
    for cell in cell_shapes(macro, genotype.width):
        if active[cell.index]:
            for op, inp in genotype.reduce if cell.reduction else genotype.normal:
                total += blocks["ops_ms"][pair_block(cell, op, inp).key]
    return total


def test_prediction_at_a_width_is_the_sum_of_that_widths_blocks_and_the_fit_carries_over(rng):
    """Each (depth, width) gets its own tables from the same blocks; the fitted coefficients apply to all of them."""
    from hwnas.config import MacroConfig
    from hwnas.predictors import ScaledBlockSumPredictor
    from hwnas.profiling.blocks import FULL_SHAPE, shape_tables

    macro = MacroConfig(C=4, layers=5, in_channels=1, resolution=8, classes=10)
    blocks = width_blocks(macro, rng)
    gs = [SearchSpace(macro, depth=True, width=True).sample(rng) for _ in range(60)]
    assert len({g.width for g in gs}) > 10 and len({g.depth for g in gs}) > 1
    tables = shape_tables(macro, blocks, [g.shape_key for g in gs])
    full = BlockSumPredictor(*tables[FULL_SHAPE]).fit([], [])
    for g in gs:
        t = tables[g.shape_key]
        moved = full.with_blocks(t.table, t.fixed_ms, g.depth, t.counts, width=g.width)
        assert moved.shape_key == g.shape_key
        assert moved.predict([g])[0] == pytest.approx(slow_latency(g, blocks), rel=1e-12)
    narrow = next(g for g in gs if g.width)
    with pytest.raises(ValueError, match=r"covers depth full, width full, .* width \["):
        full.predict([narrow])
    # A scale fitted on networks of every shape is recovered, and predicts held-out shapes exactly.
    y = np.array([0.002 + tables[g.shape_key].fixed_ms + 1.3 * (slow_latency(g, blocks) - tables[g.shape_key].fixed_ms)
                  for g in gs])
    pred = ScaledBlockSumPredictor(*tables[FULL_SHAPE]).fit(gs[:40], y[:40], tables=tables)
    assert pred.coef_[0] == pytest.approx(1.3, rel=1e-3)
    held = [pred.with_blocks(*tables[g.shape_key][:2], g.depth, width=g.width).predict([g])[0] for g in gs[40:]]
    np.testing.assert_allclose(held, y[40:], rtol=1e-3)
    with pytest.raises(ValueError, match="need their block table"):
        ScaledBlockSumPredictor(*tables[FULL_SHAPE]).fit([narrow], [1.0])


def test_blocks_without_widths_refuse_a_width_clearly(tiny_macro, rng):
    from hwnas.profiling.blocks import shape_table, shape_tables

    blocks = width_blocks(tiny_macro, rng, elastic_width=False)
    assert blocks["width_choices"] == [1.0] and not blocks["width_fixed_ms"]
    shape_table(tiny_macro, blocks, (), (1.0, 1.0, 1.0))  # full width spelled out is fine
    for old in (blocks, {k: v for k, v in blocks.items() if k not in ("width_choices", "width_fixed_ms")}):
        with pytest.raises(ValueError, match=r"stage widths \[1.0\] only.*re-profile with elastic width"):
            shape_tables(tiny_macro, old, [((), (0.5, 1.0, 1.0))])


def test_shipped_profiles_say_they_lack_widths_and_refuse_them_by_name():
    """Every shipped profile predates elastic width: full width predicts as before, a narrowed network is a
    ValueError that names the profile and says to re-profile."""
    import json
    from dataclasses import replace
    from pathlib import Path

    from hwnas.predictors import ByMacroPredictor, create_predictor, profile_covers_width
    from hwnas.profiling.device_profile import DeviceProfile

    paths = sorted((Path(__file__).resolve().parents[1] / "profiles").glob("*.json"))
    assert paths
    for path in paths:
        profile = DeviceProfile.from_dict(json.loads(path.read_text()))  # from_dict: no other-device warning
        assert profile.widths == (1.0,) and not profile.covers_width() and not profile_covers_width(profile)
        assert profile.covers_width(()) and profile.covers_width([1.0, 1.0, 1.0])
        g = SearchSpace(profile.macro).sample(np.random.default_rng(0))
        assert create_predictor(profile, width=(1.0, 1.0, 1.0)).predict([g])[0] == create_predictor(profile).predict([g])[0]
        with pytest.raises(ValueError, match=f"profile '{profile.name}' was measured without elastic width.*"
                                             "re-profile with elastic width"):
            create_predictor(profile, width=(1.0, 0.5, 1.0))
        with pytest.raises(ValueError, match=f"profile '{profile.name}'.*re-profile"):
            ByMacroPredictor.from_profiles([profile]).predict([g, replace(g, width=(0.75, 0.75, 0.75))])
