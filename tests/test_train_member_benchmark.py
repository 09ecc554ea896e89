"""benchmarks/train_member.py: one architecture trained per seed, as train_network trains it."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from hwnas.data import load_dataset
from hwnas.space import SearchSpace
from hwnas.train import train_network

ROOT = Path(__file__).resolve().parents[1]


def test_train_member_reports_each_seed_like_train_network(tiny_spec, tiny_macro, tmp_path, capsys, one_torch_thread):
    spec = importlib.util.spec_from_file_location("train_member", ROOT / "benchmarks" / "train_member.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    genotype = SearchSpace(replace(tiny_macro, classes=3, resolution=4)).sample(np.random.default_rng(0))
    genotype.save(tmp_path / "arch.json")
    out = tmp_path / "member.json"
    assert module.main([str(tmp_path / "arch.json"), "--data", tiny_spec, "--resolution", "8", "--epochs", "1",
                        "--seeds", "0", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out) and report["resolution"] == 8
    at_8 = replace(genotype, macro=replace(genotype.macro, resolution=8))
    data = load_dataset(tiny_spec, 8, seed=0, valid_fraction=0.05)
    assert [r["test_accuracy"] for r in report["runs"]] == [train_network(at_8, data, 1, seed=s)[1] for s in (0, 1)]
    assert report["arch_id"] == at_8.arch_id and report["test_images"] == len(data.test)
