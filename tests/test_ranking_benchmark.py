"""benchmarks/ranking.py: cell sets, macro flags and a tiny end-to-end run (digits, seconds)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from hwnas.space.genotype import SearchSpace

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ranking():
    spec = importlib.util.spec_from_file_location("ranking_benchmark", ROOT / "benchmarks" / "ranking.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_cells_are_distinct_valid_and_start_weak(ranking, tiny_macro):
    cells, kinds = ranking.random_cells(10, 3, tiny_macro)
    assert len({g.arch_id for g in cells}) == 10
    assert kinds == ["weak"] * 3 + ["random"] * 7
    assert all(op in ranking.FREE_OPS for op, _ in cells[0].normal + cells[0].reduce)  # all pools/skips
    space = SearchSpace(tiny_macro)
    for g in cells:
        assert space.decode(space.encode(g)) == g
    assert [g.arch_id for g in ranking.random_cells(10, 3, tiny_macro)[0]] == [g.arch_id for g in cells]
    with pytest.raises(ValueError):
        ranking.random_cells(2, 3, tiny_macro)


def test_spanning_cells_unchanged(ranking, tiny_macro):
    cells = ranking.spanning_cells(4, tiny_macro)
    assert all(op in ranking.FREE_OPS for op, _ in cells[0].normal + cells[0].reduce)
    assert all(op in ranking.CONV_OPS for op, _ in cells[-1].normal + cells[-1].reduce)


def test_macro_flags(ranking):
    p = ranking.argparse.Namespace(C=8, layers=5, resolution=None)
    m = ranking.macro_from_args(p)
    assert (m.C, m.layers, m.resolution) == (8, 5, ranking.SMALL.resolution)
    assert ranking.macro_from_args(ranking.argparse.Namespace(C=None, layers=None, resolution=None)) == ranking.SMALL


def test_flops_positive_and_grow_with_convs(ranking, tiny_macro):
    cells = ranking.spanning_cells(3, tiny_macro)
    assert 0 < ranking.flops(cells[0]) < ranking.flops(cells[-1])


def test_tiny_single_path_run_with_cache(ranking, tmp_path):
    cache, out = tmp_path / "gt.json", tmp_path / "r.json"
    argv = ["--cell-set", "random", "--cells", "3", "--weak", "1", "--seeds", "2", "--gt-epochs", "1",
            "--bilevel-epochs", "0", "--sample-epochs", "1", "--track-every", "0", "--train-subset", "300",
            "--gt-cache", str(cache), "--out", str(out)]
    assert ranking.main(argv) == 0
    r = json.loads(out.read_text())["ranking"]
    assert r["cells"] == 3 and r["derived"] is None and r["train_images"] == 300
    assert list(r["per_epoch"]) == ["epoch_1"]
    assert len(r["per_cell"]) == 3 and r["per_cell"][0]["kind"] == "weak"
    runs = json.loads(cache.read_text())["runs"]
    assert len(runs) == 6 and all(k.endswith(":digits:train300") for k in runs)
    assert set(r["target_split_half"]) == {"kendall_min", "met", "rule"}


def test_few_shot_estimates_every_cell_with_its_resolutions_supernet(ranking, tmp_path):
    out = tmp_path / "r.json"
    argv = ["--cell-set", "elastic", "--cells", "4", "--resolutions", "6", "--resolution", "8", "--seeds", "2",
            "--gt-epochs", "1", "--bilevel-epochs", "0", "--sample-epochs", "1", "--track-every", "0",
            "--train-subset", "300", "--few-shot", "--out", str(out)]
    assert ranking.main(argv) == 0
    r = json.loads(out.read_text())["ranking"]
    assert r["few_shot"] and {c["resolution"] for c in r["per_cell"]} <= {6, 8}
    # every cell got an estimate (an unfilled slot would read 100 % accuracy)
    assert all(0.0 < c["estimated_acc"] < 1.0 for c in r["per_cell"])


def test_few_shot_needs_an_elastic_single_path_set(ranking):
    with pytest.raises(SystemExit):
        ranking.main(["--cell-set", "random", "--few-shot"])


def test_ground_truth_on_a_local_cluster_equals_in_process(ranking, tiny_spec, tiny_macro, tmp_path,
                                                          one_torch_thread):
    """--workers trains the ground truth on a Dask LocalCluster: the same accuracies and losses, cached run by run."""
    from dataclasses import replace

    import numpy as np

    from hwnas.data import load_dataset

    pytest.importorskip("dask.distributed")
    macro = replace(tiny_macro, classes=3)  # the tiny_spec data set has 3 classes
    data = load_dataset(tiny_spec, resolution=macro.resolution)
    cells, _ = ranking.random_cells(2, 0, macro)
    local = ranking.ground_truth(cells, data, 1, 2)
    cache = tmp_path / "gt.json"
    # Worker processes of one torch thread, like this test's: the runs match bit for bit.
    remote = ranking.ground_truth(cells, data, 1, 2, cache=cache, workers=2)
    assert remote["acc"].tolist() == local["acc"].tolist()
    np.testing.assert_allclose(remote["loss"], local["loss"], rtol=1e-6)
    assert len(json.loads(cache.read_text())["runs"]) == 4
    # Everything cached: a rerun needs no cluster at all (an unreachable address is never contacted).
    again = ranking.ground_truth(cells, data, 1, 2, cache=cache, scheduler="tcp://127.0.0.1:1")
    assert again["acc"].tolist() == local["acc"].tolist()
