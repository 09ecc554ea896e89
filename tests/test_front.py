"""ParetoFront: selection, hypervolume, front.json round trip and schema errors, csv, plot."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from hwnas.config import MacroConfig
from hwnas.search.front import FrontMember, ParetoFront, hypervolume, non_dominated, plot_fronts
from hwnas.space import SearchSpace


@pytest.fixture
def front(tiny_macro: MacroConfig, rng: np.random.Generator) -> ParetoFront:
    space = SearchSpace(tiny_macro)
    genotypes = [space.sample(rng) for _ in range(6)]
    F = np.array([[0.10, 5.0, 0.02], [0.20, 3.0, 0.01], [0.30, 1.0, 0.03],
                  [0.25, 4.0, 0.03],  # dominated by the second
                  [0.40, 6.0, 0.05],  # dominated by all
                  [0.05, 9.0, 0.04]])
    return ParetoFront.from_evaluations(genotypes, F, np.zeros(6), (1.0, 10.0, 0.1),
                                        history=[{"gen": 1, "hypervolume": 0.5}], config={"search": {"seed": 0}})


def test_selection_keeps_non_dominated_sorted_by_error(front: ParetoFront) -> None:
    assert [m.error for m in front.members] == [0.05, 0.10, 0.20, 0.30]
    assert front.feasible and front.n_evaluations == 0
    np.testing.assert_array_equal(np.sort(non_dominated(np.array([[1, 1], [2, 2], [0, 3]]))), [0, 2])


def test_hypervolume_at_a_fixed_reference_point() -> None:
    assert hypervolume(np.array([[0.5, 0.5, 0.5]]), (1, 1, 1)) == pytest.approx(0.125)
    # the same point in other units, the reference scaled alike: the same share of the box
    assert hypervolume(np.array([[0.5, 5.0, 0.05]]), (1, 10, 0.1)) == pytest.approx(0.125)
    # two boxes overlapping in [0.5,1]x[0.5,1]x[0,1]... : 0.5*1*1 + 1*0.5*1 - 0.5*0.5*1
    assert hypervolume(np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]), (1, 1, 1)) == pytest.approx(0.75)
    assert hypervolume(np.array([[2.0, 0.1, 0.1]]), (1, 1, 1)) == 0.0  # outside the box adds nothing


def test_least_violating_when_nothing_is_feasible(tiny_macro: MacroConfig, rng: np.random.Generator) -> None:
    space = SearchSpace(tiny_macro)
    gs = [space.sample(rng) for _ in range(8)]
    violation = np.array([5, 4, 3, 2, 1, 6, 7, 8], dtype=float)
    f = ParetoFront.from_evaluations(gs, np.tile([0.1, 1.0, 0.01], (8, 1)), violation, (1, 2, 1))
    assert not f.feasible and f.hypervolume == 0.0
    assert sorted(m.violation for m in f.members) == [1, 2, 3, 4, 5]


def test_round_trip(front: ParetoFront, tmp_path) -> None:
    path = front.save(tmp_path / "front.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["objectives"] == ["error", "latency_ms", "params_m"]
    assert data["hypervolume"] == pytest.approx(front.hypervolume) and data["hypervolume"] > 0
    assert {"arch", "arch_id", "error", "latency_ms", "params_m"} <= set(data["members"][0])
    again = ParetoFront.load(path)
    assert again.to_dict() == front.to_dict()
    assert [m.genotype for m in again.members] == [m.genotype for m in front.members]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=2), "schema_version"),
    (lambda d: d.update(objectives=["error"]), "objectives"),
    (lambda d: d.update(reference_point=[1, 2]), "reference_point"),
    (lambda d: d["members"][1].update(latency_ms="fast"), r"members\[1\]\.latency_ms"),
    (lambda d: d["members"][0].update(error=1.5), r"members\[0\]\.error"),
    (lambda d: d["members"][0].update(arch_id="0" * 16), "does not match"),
    (lambda d: d["members"][2]["arch"]["normal"][0].__setitem__(0, "conv_9x9"), r"members\[2\]\.arch.*unknown op"),
    (lambda d: d.pop("members"), "members"),
])
def test_schema_errors_name_the_file_and_field(front: ParetoFront, tmp_path, edit, message: str) -> None:
    data = front.to_dict()
    edit(data)
    path = tmp_path / "front.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as err:
        ParetoFront.load(path)
    assert str(path) in str(err.value)


def test_unreadable_files(tmp_path) -> None:
    with pytest.raises(ValueError, match="no such front file"):
        ParetoFront.load(tmp_path / "missing.json")
    bad = tmp_path / "front.json"
    bad.write_text('{"schema_version": 1, "memb')
    with pytest.raises(ValueError, match="not valid JSON"):
        ParetoFront.load(bad)


def test_csv_and_plot(front: ParetoFront, tmp_path) -> None:
    rows = list(csv.DictReader(front.save_csv(tmp_path / "front.csv").open()))
    assert [r["arch_id"] for r in rows] == [m.arch_id for m in front.members]
    assert float(rows[0]["accuracy"]) == pytest.approx(1 - front.members[0].error)
    assert json.loads(rows[0]["normal"]) == front.members[0].genotype.to_dict()["normal"]
    assert int(rows[0]["resolution"]) == front.members[0].genotype.macro.resolution
    assert json.loads(rows[0]["depth"]) == list(front.members[0].genotype.stage_depth)
    assert json.loads(rows[0]["width"]) == list(front.members[0].genotype.stage_width)
    png = plot_fronts(front, tmp_path / "pareto.png", baseline=front)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_member_objectives(front: ParetoFront) -> None:
    m: FrontMember = front.members[0]
    np.testing.assert_array_equal(m.objectives, [m.error, m.latency_ms, m.params_m])
