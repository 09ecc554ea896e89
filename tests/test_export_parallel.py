"""Stand-alone training of export members on a Dask LocalCluster: same results as training in process."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from hwnas.config import MacroConfig
from hwnas.data import load_dataset
from hwnas.export import export_front
from hwnas.export.parallel import wants_dask
from hwnas.search.front import FrontMember, ParetoFront
from hwnas.space import SearchSpace
from hwnas.train import train_network

pytest.importorskip("dask.distributed")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the one-thread Dask workers, so the runs match bit for bit
    yield
    torch.set_num_threads(threads)


def test_wants_dask() -> None:
    assert not wants_dask(0, None) and not wants_dask(1, None)
    assert wants_dask(2, None) and wants_dask(0, "tcp://127.0.0.1:8786")


def test_members_train_on_a_local_cluster_like_in_process(tiny_spec: str, tiny_macro: MacroConfig, tmp_path) -> None:
    macro = replace(tiny_macro, classes=3)  # the tiny_spec data set has 3 classes
    space = SearchSpace(macro)
    rng = np.random.default_rng(0)
    front = ParetoFront([FrontMember(space.sample(rng), 0.1 * (i + 1), 1.0 + i, 0.01) for i in range(2)],
                        (1.0, 10.0, 1.0))
    data = load_dataset(tiny_spec, resolution=macro.resolution)
    seen = []
    report = export_front(front, tmp_path, train_epochs=1, data=data, measure=False, seed=1, train_seeds=2,
                          workers=2, progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert ("train", 4, 4) in seen  # 2 members x 2 seeds trained on the cluster
    for member, row in zip(front.members, report["members"]):
        local = [train_network(member.genotype, data, 1, seed=s)[1] for s in (1, 2)]
        assert row["test_accuracy_seeds"] == local and row["trained_epochs"] == 1
        assert row["checker"] and not row["errors"]


def test_a_resumed_parallel_export_trains_only_the_members_left(tiny_macro: MacroConfig, tmp_path,
                                                                 monkeypatch) -> None:
    from hwnas.export import exporter

    space = SearchSpace(tiny_macro)
    rng = np.random.default_rng(0)
    front = ParetoFront([FrontMember(space.sample(rng), 0.1 * (i + 1), 1.0 + i, 0.01) for i in range(2)],
                        (1.0, 10.0, 1.0))
    planned = []

    def fake_pretrained(genotypes, splits_for, epochs, seeds, train, workers, scheduler, progress=None):
        planned.append([g.arch_id for g in genotypes])
        return lambda genotype, splits, run_epochs, seed: (exporter.Network(genotype), 0.5)

    monkeypatch.setattr(exporter, "pretrained", fake_pretrained)
    real, killed = exporter._export_member, []

    def dies_on_the_second(rank, *args, **kwargs):
        if rank == 1 and not killed:
            killed.append(rank)
            raise KeyboardInterrupt
        return real(rank, *args, **kwargs)

    monkeypatch.setattr(exporter, "_export_member", dies_on_the_second)
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    x = torch.rand(4, tiny_macro.in_channels, tiny_macro.resolution, tiny_macro.resolution)
    data = SimpleNamespace(test=TensorDataset(x, torch.zeros(4, dtype=torch.long)))  # what the ONNX check reads
    with pytest.raises(KeyboardInterrupt):
        export_front(front, tmp_path, train_epochs=1, data=data, measure=False, workers=2)
    export_front(front, tmp_path, train_epochs=1, data=data, measure=False, workers=2)
    assert planned == [[m.arch_id for m in front.members], [front.members[1].arch_id]]
