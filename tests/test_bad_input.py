"""Every input file kind, damaged every way we could think of: a clean error naming the file, never a traceback.

Each kind is checked at its library loader and through `hwnas.cli.main`. The corruptions are shared with
benchmarks/faults.py (hwnas.testing.corrupt), which runs the same list in subprocesses and prints a table.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from hwnas.cli import main
from hwnas.config import MacroConfig, SupernetConfig
from hwnas.jsonio import MAX_DEPTH, nesting_depth, parse_json
from hwnas.testing import corrupt

CLEAN = (ValueError, OSError)  # FileNotFoundError and friends are OSError subclasses
BOUNDARY = "needs the cli error boundary (robust-cli)"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> corrupt.World:
    """One tiny trained supernet, its profile, an architecture, a search run (front + checkpoint): valid files."""
    return corrupt.build_world(tmp_path_factory.mktemp("world"))


def _load_or_error(loader: Callable[[], Any], must_fail: bool, names: str) -> None:
    """The loader succeeds (when allowed) or raises a clean error whose message names the file."""
    try:
        loader()
    except CLEAN as err:
        assert names in str(err), f"error does not name {names}: {err}"
        return
    assert not must_fail, "loaded a file that should have been refused"


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of `hwnas ARGV`; an exception escaping main fails the test (it would be a traceback)."""
    try:
        rc = main(argv)
    except SystemExit as stop:
        rc = stop.code if isinstance(stop.code, int) else 2
    except OSError:  # the boundary in cli.main turns these into one line
        pytest.xfail(BOUNDARY)
    return rc, capsys.readouterr().err


# -- the strict JSON reader itself ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("  \n", "empty"), ('{"a": 1', "truncated or corrupt"), ("[NaN]", "NaN"),
    ('{"x": Infinity}', "Infinity"), ('{"x": -Infinity}', "Infinity"), ("[1e999]", "out of range"),
    ("[" + "9" * 50 + "]", "out of range"), ("[" * 10000 + "]" * 10000, "nested 10000 levels"),
    ('{"a":' * 5000 + "1" + "}" * 5000, "nested 5000 levels"),
])
def test_parse_json_refuses_what_hwnas_never_writes(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_json(text, "some/file.json")
    assert "some/file.json" in str(err.value)


def test_parse_json_keeps_what_hwnas_writes() -> None:
    big = 2**127 + 5  # PCG64 generator states in search checkpoints are 128-bit
    deep = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)  # inside the outer object: MAX_DEPTH levels
    assert parse_json(f'{{"s": "[[{{", "n": {big}, "f": 1e308, "d": {deep}}}', "x") == \
        {"s": "[[{", "n": big, "f": 1e308, "d": parse_json(deep, "x")}
    assert nesting_depth('["]]]", {"a": [1]}]') == 3


# -- JSON file kinds ---------------------------------------------------------------------------------------
JSON_CASES = [(kind, name) for kind in corrupt.JSON_KINDS for name in corrupt.JSON_CORRUPTIONS]


@pytest.mark.parametrize("kind, corruption", JSON_CASES)
def test_json_files_give_a_clean_error_from_the_loader(world: corrupt.World, tmp_path: Path, kind: str,
                                                       corruption: str) -> None:
    case = corrupt.json_case(world, kind, corruption, tmp_path)
    if case is None:
        pytest.skip(f"{corruption} does not apply to {kind}")
    _load_or_error(case.load, case.must_fail, case.names)


@pytest.mark.parametrize("kind, corruption", [c for c in JSON_CASES if corrupt.KIND_CLI[c[0]] and c[1] in corrupt.CLI_SAMPLE])
def test_json_files_give_one_line_through_the_cli(world: corrupt.World, tmp_path: Path, capsys, kind: str,
                                                  corruption: str) -> None:
    case = corrupt.json_case(world, kind, corruption, tmp_path)
    if case is None or case.argv is None:
        pytest.skip(f"{corruption} of {kind}: no command reads it without starting slow work")
    rc, err = _cli(case.argv, capsys)
    assert "Traceback" not in err
    if case.must_fail:
        assert rc != 0, err
        assert case.names in err, err


# -- the supernet checkpoint (torch file) --------------------------------------------------------------------
@pytest.mark.parametrize("corruption", list(corrupt.CHECKPOINT_CORRUPTIONS))
def test_supernet_checkpoint_gives_a_clean_error(world: corrupt.World, tmp_path: Path, capsys, corruption: str) -> None:
    case = corrupt.checkpoint_case(world, corruption, tmp_path)
    _load_or_error(case.load, True, case.names)
    rc, err = _cli(case.argv, capsys)
    assert rc != 0 and "Traceback" not in err and case.names in err, err


def test_a_kill_after_the_last_checkpoint_still_completes_the_meta(world: corrupt.World, tmp_path: Path) -> None:
    import json

    from hwnas.train import load_supernet, train_supernet

    run = tmp_path / "sn"
    shutil.copytree(world.supernet, run)
    meta = json.loads((run / "supernet.json").read_text())
    meta["complete"] = False  # as if killed between supernet.pt and supernet.json of the last epoch
    (run / "supernet.json").write_text(json.dumps(meta))
    train_supernet(SupernetConfig.from_dict(meta["config"]), run, resume=True)
    assert json.loads((run / "supernet.json").read_text())["complete"] is True
    load_supernet(run)


# -- datasets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("corruption", list(corrupt.DATASET_CORRUPTIONS))
def test_datasets_give_a_clean_error(tmp_path: Path, capsys, corruption: str) -> None:
    from hwnas.data import load_dataset

    spec, names = corrupt.DATASET_CORRUPTIONS[corruption](tmp_path)
    _load_or_error(lambda: load_dataset(spec, 8), True, names)
    rc, err = _cli(corrupt.train_argv(spec, tmp_path / "out"), capsys)
    assert rc != 0 and "Traceback" not in err and names in err, err


def test_hostile_macro_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="above the limit"):
        MacroConfig.from_dict({"C": 10**18, "layers": 5, "in_channels": 1, "resolution": 16, "classes": 10})
    with pytest.raises(ValueError, match="wrong type"):
        SupernetConfig.from_dict({"w_lr": "0.05"})
