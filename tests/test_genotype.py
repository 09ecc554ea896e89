import json

import numpy as np
import pytest

from hwnas.config import MacroConfig
from hwnas.space import GENOTYPE_OPS, Genotype, SearchSpace

NORMAL = [["sep_conv_3x3", 0], ["skip_connect", 1], ["max_pool_3x3", 0], ["dil_conv_5x5", 2],
          ["avg_pool_3x3", 1], ["sep_conv_5x5", 3], ["dil_conv_3x3", 4], ["skip_connect", 0]]


def arch_dict(**overrides):
    d = {"schema_version": 1, "space": "darts-cell", "normal": [list(p) for p in NORMAL],
         "reduce": [list(p) for p in NORMAL], "macro": MacroConfig().to_dict()}
    d.update(overrides)
    return d


def test_round_trip_through_json(tmp_path):
    g = Genotype.from_dict(arch_dict())
    g.save(tmp_path / "a.json")
    assert Genotype.load(tmp_path / "a.json") == g
    assert json.loads((tmp_path / "a.json").read_text())["normal"][0] == ["sep_conv_3x3", 0]


def test_arch_id_ignores_pair_order_within_a_node_but_not_ops():
    g = Genotype.from_dict(arch_dict())
    swapped = [NORMAL[1], NORMAL[0]] + NORMAL[2:]
    assert Genotype.from_dict(arch_dict(normal=swapped)).arch_id == g.arch_id
    other = [["sep_conv_5x5", 0]] + NORMAL[1:]
    assert Genotype.from_dict(arch_dict(normal=other)).arch_id != g.arch_id


@pytest.mark.parametrize(
    "change, message",
    [
        ({"normal": [["conv_7x7", 0]] + NORMAL[1:]}, r"normal\[0\].*unknown op 'conv_7x7'"),
        ({"normal": [["none", 0]] + NORMAL[1:]}, r"unknown op 'none'"),
        ({"reduce": NORMAL[:2] + [["skip_connect", 3]] + NORMAL[3:]}, r"reduce\[2\] \(node 1\).*input 3 out of range"),
        ({"normal": [["skip_connect", 1]] + NORMAL[1:]}, r"normal node 0: both pairs read input 1"),
        ({"normal": NORMAL[:7]}, r"normal: expected 8"),
        ({"schema_version": 2}, r"schema_version: expected 1, got 2"),
        ({"space": "nasbench201"}, r"space: expected 'darts-cell'"),
        ({"macro": {"C": 16}}, r"macro is missing keys"),
        ({"normal": [["skip_connect", "0"]] + NORMAL[1:]}, r"input must be an integer"),
    ],
)
def test_bad_architectures_name_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        Genotype.from_dict(arch_dict(**change))


def test_load_names_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        Genotype.load(bad)
    with pytest.raises(ValueError, match="no such architecture file"):
        Genotype.load(tmp_path / "missing.json")


def test_encode_decode_round_trip_and_sampling_is_valid(rng):
    space = SearchSpace()
    xl, xu = space.bounds()
    for _ in range(200):
        g = space.sample(rng)
        x = space.encode(g)
        assert x.shape == (space.n_var,) and np.all(x >= xl) and np.all(x <= xu)
        assert space.decode(x) == g


def test_decode_names_the_bad_position():
    space = SearchSpace()
    x = space.encode(Genotype.from_dict(arch_dict()))
    x[5] = 9  # input of normal node 1's first pair: allowed 0..2
    with pytest.raises(ValueError, match="position 5 = 9"):
        space.decode(x)
    with pytest.raises(ValueError, match="shape"):
        space.decode(x[:-1])


def test_repair_makes_any_integer_vector_decodable(rng):
    space = SearchSpace()
    xl, xu = space.bounds()
    for _ in range(200):
        x = rng.integers(-3, 10, size=space.n_var)
        g = space.decode(space.repair(x))
        assert all(op in GENOTYPE_OPS for op, _ in g.normal + g.reduce)


def test_elastic_space_chooses_the_resolution_too(rng):
    fixed, space = SearchSpace(), SearchSpace(MacroConfig(), resolutions=[16, 8, 12, 8])
    assert space.resolutions == (8, 12, 16) and space.n_var == fixed.n_var + 1
    xl, xu = space.bounds()
    assert xu[-1] == 2
    seen = set()
    for _ in range(100):
        g = space.sample(rng)
        seen.add(g.macro.resolution)
        assert g.macro == MacroConfig(resolution=g.macro.resolution)
        assert space.decode(space.encode(g)) == g
        assert space.decode(space.repair(rng.integers(-3, 10, size=space.n_var))).macro.resolution in space.resolutions
    assert seen == {8, 12, 16}
    # The resolution is part of the architecture: the same cells at two resolutions are two arch_ids.
    g = fixed.sample(rng)
    x = space.encode(g)
    assert x[-1] == 2 and space.decode(np.r_[x[:-1], 0]).arch_id != g.arch_id
    with pytest.raises(ValueError, match="resolution 16 is not searched"):
        SearchSpace(MacroConfig(), resolutions=[8, 12]).encode(g)


def test_a_fixed_resolution_space_samples_as_before():
    """Adding the elastic option must not change what a plain space draws (profiles' sample sets depend on it)."""
    a = SearchSpace().sample(np.random.default_rng(5))
    b = SearchSpace(MacroConfig(), resolutions=[16]).sample(np.random.default_rng(5))
    assert a == b and SearchSpace().n_var == 32


DEEP = MacroConfig(C=4, layers=8, resolution=8)  # stages of 2, 2 and 2 normal cells


def test_depth_is_validated_and_full_depth_keeps_the_arch_id():
    g = Genotype.from_dict(arch_dict(macro=DEEP.to_dict()))
    assert g.stage_depth == (2, 2, 2) and g.active_cells == (True,) * 8
    same = Genotype(g.normal, g.reduce, DEEP, depth=(2, 2, 2))
    assert same == g and same.depth == () and same.arch_id == g.arch_id and "depth" not in same.to_dict()
    shallow = Genotype(g.normal, g.reduce, DEEP, depth=(1, 0, 2))
    # layers 0 1 [2] 3 4 [5] 6 7: stage 0 keeps cell 0, stage 1 drops cells 3 and 4
    assert shallow.active_cells == (True, False, True, False, False, True, True, True)
    assert shallow.arch_id != g.arch_id
    assert Genotype.from_dict(json.loads(json.dumps(shallow.to_dict()))) == shallow
    for depth, message in [((0, 2, 2), r"depth\[0\] = 0 is outside \[1, 2\]"), ((1, 3, 2), r"depth\[1\] = 3"),
                           ((1, 1), "must give 3 stages"), ("deep", "list of integers")]:
        with pytest.raises(ValueError, match=message):
            Genotype.from_dict(arch_dict(macro=DEEP.to_dict(), depth=depth))


def test_elastic_depth_space_round_trips_and_samples_every_depth(rng):
    space = SearchSpace(MacroConfig(C=4, layers=5, resolution=8), resolutions=[6, 8], depth=True)
    assert space.depth_stages == (1, 2) and space.n_var == space.cell_vars + 1 + 2  # stage 0 has one cell: fixed
    xl, xu = space.bounds()
    assert list(xl[-2:]) == [0, 0] and list(xu[-2:]) == [1, 1]
    seen = set()
    for _ in range(40):
        g = space.sample(rng)
        assert space.decode(space.encode(g)) == g
        seen.add(g.stage_depth)
    assert seen == {(1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)}
    fixed = SearchSpace(MacroConfig(C=4, layers=5, resolution=8))
    shallow = next(g for g in (space.sample(rng) for _ in range(50)) if g.depth and g.macro.resolution == 8)
    with pytest.raises(ValueError, match="keeps at full depth"):
        fixed.encode(shallow)
    assert not SearchSpace(MacroConfig(layers=3), depth=True).elastic_depth  # 3 layers: nothing to drop


def test_width_is_validated_and_full_width_keeps_the_arch_id():
    g = Genotype.from_dict(arch_dict(macro=DEEP.to_dict()))
    assert g.stage_width == (1.0, 1.0, 1.0) and g.cell_channels == (4, 4, 8, 8, 8, 16, 16, 16)
    same = Genotype(g.normal, g.reduce, DEEP, width=(1, 1.0, 1))
    assert same == g and same.width == () and same.arch_id == g.arch_id and "width" not in same.to_dict()
    narrow = Genotype(g.normal, g.reduce, DEEP, width=(0.5, 1.0, 0.75))
    # layers 0 1 [2] 3 4 [5] 6 7: stage 1 starts at the first reduction, stage 2 at the second
    assert narrow.cell_channels == (2, 2, 8, 8, 8, 12, 12, 12) and narrow.arch_id != g.arch_id
    assert Genotype.from_dict(json.loads(json.dumps(narrow.to_dict()))) == narrow
    assert narrow.to_dict()["width"] == [0.5, 1.0, 0.75]
    for width, message in [((0.5, 0.6, 1.0), r"width\[1\] = 0.6 is not one of"), ((1.0, 1.0), "must give 3 stages"),
                           ("wide", "list of numbers"), ((True, 1, 1), "list of numbers")]:
        with pytest.raises(ValueError, match=message):
            Genotype.from_dict(arch_dict(macro=DEEP.to_dict(), width=width))


def test_elastic_width_space_round_trips_and_samples_every_width(rng):
    space = SearchSpace(MacroConfig(C=4, layers=5, resolution=8), resolutions=[6, 8], depth=True, width=True)
    assert space.elastic_width and space.n_var == space.cell_vars + 1 + 2 + 3
    xl, xu = space.bounds()
    assert list(xl[-3:]) == [0, 0, 0] and list(xu[-3:]) == [2, 2, 2]
    seen = set()
    for _ in range(80):
        g = space.sample(rng)
        assert space.decode(space.encode(g)) == g
        seen.update(enumerate(g.stage_width))
    assert seen == {(s, w) for s in range(3) for w in (0.5, 0.75, 1.0)}
    narrow = next(g for g in (space.sample(rng) for _ in range(50)) if g.width)
    with pytest.raises(ValueError, match="keeps every stage at full width"):
        SearchSpace(MacroConfig(C=4, layers=5, resolution=8), resolutions=[6, 8], depth=True).encode(narrow)


def test_sample_distinct_draws_new_ids_outside_exclude(tiny_macro) -> None:
    space = SearchSpace(tiny_macro)
    first = space.sample_distinct(np.random.default_rng(0), 5)
    assert len({g.arch_id for g in first}) == 5
    again = space.sample_distinct(np.random.default_rng(0), 5, exclude={first[0].arch_id})
    assert first[0].arch_id not in {g.arch_id for g in again} and again[:4] == first[1:]


def test_sample_distinct_says_when_the_space_runs_dry(tiny_macro, monkeypatch) -> None:
    space = SearchSpace(tiny_macro)
    one = space.sample(np.random.default_rng(0))
    monkeypatch.setattr(space, "sample", lambda rng: one)
    with pytest.raises(ValueError, match="only 1 of 2"):
        space.sample_distinct(np.random.default_rng(0), 2)
