"""Supernet training (checkpoint, resume equality, errors), the shared-weight estimate, stand-alone training."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hwnas.config import MacroConfig, SupernetConfig
from hwnas.data import load_dataset
from hwnas.space import Genotype, SearchSpace
from hwnas.train import AccuracyEstimator, load_supernet, sample_genotype, train_network, train_supernet
from hwnas.train.supernet import CHECKPOINT_FILE

CLASSES = 3  # of the tiny_spec data set (conftest)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cfg(tiny_spec: str, tiny_macro: MacroConfig) -> SupernetConfig:
    return SupernetConfig(data=tiny_spec, macro=tiny_macro, epochs=1, sample_epochs=1, batch_size=16)


def _model_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / CHECKPOINT_FILE, weights_only=True)["model"]


@pytest.mark.parametrize("extra_resolutions, elastic_width", [((), False), ((4,), False), ((4,), True)])
def test_resume_after_interruption_equals_uninterrupted_run(cfg: SupernetConfig, tmp_path: Path,
                                                           extra_resolutions: tuple[int, ...], elastic_width: bool) -> None:
    cfg = replace(cfg, resolutions=extra_resolutions, elastic_width=elastic_width)
    straight = train_supernet(cfg, tmp_path / "straight")

    def interrupt(done: int, total: int, info: dict) -> None:
        if info["epoch"] == 2:  # the first step of epoch 2: epoch 1's checkpoint is on disk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_supernet(cfg, tmp_path / "resumed", progress=interrupt)
    meta = json.loads((tmp_path / "resumed" / "supernet.json").read_text())
    assert len(meta["history"]) == 1 and not meta["complete"]
    resumed = train_supernet(cfg, tmp_path / "resumed", resume=True)

    a, b = _model_state(straight), _model_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (straight / "genotype.json").read_text() == (resumed / "genotype.json").read_text()
    assert json.loads((resumed / "supernet.json").read_text())["complete"]
    Genotype.load(resumed / "genotype.json")  # a valid architecture file


def test_existing_run_needs_resume_and_same_config(cfg: SupernetConfig, tmp_path: Path) -> None:
    out = train_supernet(replace(cfg, sample_epochs=0), tmp_path / "run")
    with pytest.raises(ValueError, match="--resume"):
        train_supernet(replace(cfg, sample_epochs=0), out)
    with pytest.raises(ValueError, match="batch_size"):
        train_supernet(replace(cfg, sample_epochs=0, batch_size=8), out, resume=True)


def test_load_supernet_errors_name_the_problem(cfg: SupernetConfig, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="supernet.json"):
        load_supernet(tmp_path / "nothing")
    out = train_supernet(replace(cfg, epochs=0), tmp_path / "run")
    supernet, loaded_cfg = load_supernet(out)
    assert loaded_cfg.macro.classes == CLASSES and not supernet.training
    (out / CHECKPOINT_FILE).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="supernet.pt"):
        load_supernet(out)
    (out / "supernet.json").write_text('{"schema_version": 99}')
    with pytest.raises(ValueError, match="schema_version"):
        load_supernet(out)


def test_single_path_supernet_learns_digits(tmp_path: Path) -> None:
    """Uniform single-path training switches every edge's op from step to step; the supernet must still learn
    (channel-aligned candidate ops): before, it stayed near chance (train accuracy ~0.13 here, 0.39 after the quick
    plan's 30 epochs) and its shared-weight estimates were useless to the search."""
    macro = MacroConfig(C=4, layers=3, in_channels=1, resolution=8, classes=10)
    cfg = SupernetConfig(data="digits", macro=macro, epochs=0, sample_epochs=8, batch_size=32, train_subset=300)
    supernet, cfg = load_supernet(train_supernet(cfg, tmp_path / "run"))
    history = json.loads((tmp_path / "run" / "supernet.json").read_text())["history"]
    assert np.mean([r["train_acc"] for r in history[-2:]]) > 0.45  # broken: ~0.15; fixed: ~0.65
    genotypes = [SearchSpace(macro).sample(np.random.default_rng(i)) for i in range(3)]
    est = AccuracyEstimator(supernet, load_dataset("digits", 8, cfg.seed))
    assert est.error(genotypes).min() < 0.6  # 10 classes: chance is 0.9


def test_estimate_is_cached_order_free_and_leaves_the_supernet_intact(cfg: SupernetConfig, tmp_path: Path) -> None:
    supernet, cfg = load_supernet(train_supernet(replace(cfg, epochs=0), tmp_path / "run"))
    data = load_dataset(cfg.data, cfg.macro.resolution, cfg.seed)
    space = SearchSpace(cfg.macro)
    genotypes = [space.sample(np.random.default_rng(i)) for i in range(3)]
    before = {k: v.clone() for k, v in supernet.state_dict().items()}

    est = AccuracyEstimator(supernet, data, calib_batches=1, batch_size=8)
    errors = est.error(genotypes)
    assert errors.shape == (3,) and np.all((errors >= 0) & (errors <= 1))
    assert np.array_equal(est.error(genotypes[:1]), errors[:1]) and len(est._cache) == 3
    # A fresh estimator in the opposite order gives the same numbers: no statistics leak between genotypes.
    reverse = AccuracyEstimator(supernet, data, calib_batches=1, batch_size=8).error(genotypes[::-1])
    assert np.array_equal(reverse[::-1], errors)
    after = supernet.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert all(m.momentum == 0.1 for m in supernet.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_estimator_rejects_a_dataset_of_another_shape(cfg: SupernetConfig, tmp_path: Path) -> None:
    supernet, _ = load_supernet(train_supernet(replace(cfg, epochs=0), tmp_path / "run"))
    with pytest.raises(ValueError, match="does not fit"):
        AccuracyEstimator(supernet, load_dataset("digits", resolution=8))


def test_alpha_biased_sampling_follows_the_alphas(cfg: SupernetConfig, tmp_path: Path) -> None:
    supernet, _ = load_supernet(train_supernet(replace(cfg, epochs=0), tmp_path / "run"))
    with torch.no_grad():
        for alphas in supernet.arch_parameters():
            alphas.zero_()
            alphas[:, 5] = 10.0  # sep_conv_5x5 dominates every edge
    rng = np.random.default_rng(0)
    ops = [op for _ in range(10) for op, _ in sample_genotype(supernet, "alpha", rng).normal]
    assert ops.count("sep_conv_5x5") / len(ops) > 0.9
    uniform = [op for _ in range(10) for op, _ in sample_genotype(supernet, "uniform", rng).normal]
    assert uniform.count("sep_conv_5x5") / len(uniform) < 0.5


def test_train_network_learns_and_is_seeded(tiny_spec: str, tiny_macro: MacroConfig) -> None:
    data = load_dataset(tiny_spec, resolution=8)
    g = SearchSpace(replace(tiny_macro, classes=CLASSES)).sample(np.random.default_rng(0))
    net, acc = train_network(g, data, epochs=25, seed=0, batch_size=16)
    assert acc >= 0.9  # brightness classes are trivially separable
    _, acc_again = train_network(g, data, epochs=25, seed=0, batch_size=16)
    assert acc_again == acc
    with pytest.raises(ValueError, match="does not fit"):
        train_network(SearchSpace(tiny_macro).sample(np.random.default_rng(0)), data, epochs=1)


def test_threads_training_at_once_keep_their_seeded_initialisation(tiny_spec: str, tiny_macro: MacroConfig,
                                                                    monkeypatch) -> None:
    """Two threads of one process (a multi-threaded Dask worker) share torch's global generator: each network
    still starts from its own seed's weights, as when trained alone."""
    import threading
    import time

    from hwnas.train import standalone

    data = load_dataset(tiny_spec, resolution=8)
    g = SearchSpace(replace(tiny_macro, classes=CLASSES)).sample(np.random.default_rng(0))
    network = standalone.Network
    alone = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        alone[seed] = network(g).state_dict()
    built: dict[str, dict] = {}

    class Stop(Exception):
        pass

    def slow_network(genotype):
        time.sleep(0.2)  # widens the window between seeding and drawing the weights
        built[threading.current_thread().name] = network(genotype).state_dict()
        raise Stop  # the initial weights are all this test needs

    def first_weights(seed: int) -> None:
        with pytest.raises(Stop):
            train_network(g, data, epochs=1, seed=seed)

    monkeypatch.setattr(standalone, "Network", slow_network)
    threads = [threading.Thread(target=first_weights, args=(seed,), name=f"seed{seed}") for seed in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in (0, 1):
        assert all(torch.equal(built[f"seed{seed}"][k], alone[seed][k]) for k in alone[seed]), seed


def test_elastic_supernet_trains_and_estimates_every_resolution(cfg: SupernetConfig, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from hwnas.space.supernet import Supernet
    from hwnas.train import load_elastic_data

    seen: list[int] = []
    forward = Supernet.forward
    monkeypatch.setattr(Supernet, "forward", lambda self, x, *a: (seen.append(x.shape[-1]), forward(self, x, *a))[1])
    cfg = replace(cfg, epochs=0, sample_epochs=2, resolutions=(4,))
    assert cfg.all_resolutions == (4, 8)
    supernet, cfg = load_supernet(train_supernet(cfg, tmp_path / "run"))
    assert set(seen) == {4, 8}  # single-path steps switch input resolution
    assert SupernetConfig.from_dict(cfg.to_dict()) == cfg  # the JSON list comes back as the tuple

    est = AccuracyEstimator(supernet, load_elastic_data(cfg), calib_batches=1, batch_size=8)
    space = SearchSpace(cfg.macro, resolutions=cfg.all_resolutions)
    g8 = replace(space.sample(np.random.default_rng(0)), macro=cfg.macro)
    g4 = replace(g8, macro=cfg.macro.at_resolution(4))
    errors = est.error([g8, g4])
    assert np.all((errors >= 0) & (errors <= 1)) and len(est._cache) == 2
    with pytest.raises(ValueError, match="no data at resolution 6"):
        est.error([replace(g8, macro=cfg.macro.at_resolution(6))])
    with pytest.raises(ValueError, match="need sample_epochs > 0"):
        replace(cfg, epochs=1, sample_epochs=0)


def test_elastic_depth_supernet_drops_cells_and_estimates_each_depth(cfg: SupernetConfig, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from hwnas.space.supernet import Supernet

    seen: list[tuple[bool, ...] | None] = []
    forward = Supernet.forward
    monkeypatch.setattr(Supernet, "forward", lambda self, x, w=None, active=None, *rest: (
        seen.append(active and tuple(active)), forward(self, x, w, active, *rest))[1])
    macro = MacroConfig(C=4, layers=5, in_channels=1, resolution=8, classes=CLASSES)
    cfg = replace(cfg, macro=macro, epochs=1, sample_epochs=2, elastic_depth=True)
    supernet, cfg = load_supernet(train_supernet(cfg, tmp_path / "run"))
    assert cfg.elastic_depth and SupernetConfig.from_dict(cfg.to_dict()) == cfg
    train_steps = [a for a in seen if a is not None]
    assert None in seen  # the bilevel epoch runs every cell
    assert set(train_steps) > {(True, True, False, True, False)} and len(set(train_steps)) >= 3
    space = SearchSpace(macro, depth=True)
    g = space.sample(np.random.default_rng(0))
    full, shallow = (Genotype(g.normal, g.reduce, macro, depth=d) for d in ((1, 1, 1), (1, 0, 0)))
    seen.clear()
    est = AccuracyEstimator(supernet, load_dataset(cfg.data, 8, cfg.seed), calib_batches=1, batch_size=8)
    errors = est.error([full, shallow])
    assert np.all((errors >= 0) & (errors <= 1)) and len(est._cache) == 2
    assert (True, True, False, True, False) in seen and None not in seen  # recalibration and evaluation both drop cells
    with pytest.raises(ValueError, match="elastic depth is trained by single-path steps only"):
        replace(cfg, sample_epochs=0)


def test_elastic_width_supernet_narrows_stages_and_estimates_each_width(cfg: SupernetConfig, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from hwnas.space.supernet import Supernet

    seen: list[tuple[int, ...] | None] = []
    forward = Supernet.forward
    monkeypatch.setattr(Supernet, "forward", lambda self, x, w=None, active=None, channels=None: (
        seen.append(channels and tuple(channels)), forward(self, x, w, active, channels))[1])
    macro = MacroConfig(C=4, layers=5, in_channels=1, resolution=8, classes=CLASSES)
    cfg = replace(cfg, macro=macro, epochs=1, sample_epochs=2, elastic_width=True)
    supernet, cfg = load_supernet(train_supernet(cfg, tmp_path / "run"))
    assert cfg.elastic_width and SupernetConfig.from_dict(cfg.to_dict()) == cfg
    assert None in seen  # the bilevel epoch runs at full width
    assert len({c for c in seen if c is not None}) >= 3  # single-path steps draw widths
    g = SearchSpace(macro, width=True).sample(np.random.default_rng(0))
    wide, narrow = (Genotype(g.normal, g.reduce, macro, width=w) for w in ((), (0.5, 0.75, 0.5)))
    seen.clear()
    est = AccuracyEstimator(supernet, load_dataset(cfg.data, 8, cfg.seed), calib_batches=1, batch_size=8)
    errors = est.error([wide, narrow])
    assert np.all((errors >= 0) & (errors <= 1)) and len(est._cache) == 2
    assert narrow.cell_channels in seen  # recalibration and evaluation both run narrow
    with pytest.raises(ValueError, match="elastic width is trained by single-path steps only"):
        replace(cfg, sample_epochs=0)


def test_sandwich_steps_train_the_largest_and_smallest_sub_networks_too(cfg: SupernetConfig, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from hwnas.space.supernet import Supernet

    seen: list[tuple] = []
    forward = Supernet.forward
    monkeypatch.setattr(Supernet, "forward", lambda self, x, w=None, active=None, channels=None: (
        seen.append((x.shape[-1], active and tuple(active), channels and tuple(channels))),
        forward(self, x, w, active, channels))[1])
    macro = MacroConfig(C=4, layers=5, in_channels=1, resolution=8, classes=CLASSES)
    cfg = replace(cfg, macro=macro, epochs=0, sample_epochs=1, resolutions=(4,), elastic_depth=True,
                  elastic_width=True, sandwich=True, distill=True)
    train_supernet(cfg, tmp_path / "run")
    steps = [seen[i:i + 3] for i in range(0, len(seen), 3)]
    assert len(seen) % 3 == 0 and len(steps) > 1
    assert all(big == (8, None, None) for big, _, _ in steps)
    assert all(small == (4, (True, True, False, True, False), (2, 4, 4, 8, 8)) for _, small, _ in steps)
    with pytest.raises(ValueError, match="distill needs sandwich"):
        replace(cfg, sandwich=False)
