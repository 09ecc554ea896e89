"""`hwnas run` plans and the choice of members trained stand-alone (the pipeline itself runs in benchmarks/search.py)."""
from __future__ import annotations

from hwnas.pipeline import pick_members


def test_trained_members_include_most_accurate_and_fastest() -> None:
    lat = [5.0, 1.0, 3.0, 2.0, 4.0, 6.0]
    err = [0.10, 0.30, 0.20, 0.25, 0.05, 0.12]
    assert pick_members(err, lat, 2) == [1, 4]  # fastest (1.0 ms) and most accurate (error 0.05)
    three = pick_members(err, lat, 3)
    assert len(three) == 3 and {1, 4} <= set(three)
    assert pick_members(err, lat, 10) == list(range(6))


