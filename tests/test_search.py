"""The search problem (encoding, repair, constraints, cache) and the runner (checkpoint/resume, random baseline)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pymoo.core.population import Population

from hwnas.config import MacroConfig, SearchConfig
from hwnas.search import HWNASProblem, ParamsCounter, SpaceRepair, search
from hwnas.search.problem import canonical
from hwnas.space import Genotype, Network, SearchSpace, count_params

# Fake objectives: latency grows with op cost, error falls with it plus an arch-specific wobble, so the
# three objectives conflict the way the real ones do. Module level, so Dask workers can unpickle them.
COST = {"max_pool_3x3": 0.3, "avg_pool_3x3": 0.3, "skip_connect": 0.1, "sep_conv_3x3": 1.0,
        "sep_conv_5x5": 1.6, "dil_conv_3x3": 0.8, "dil_conv_5x5": 1.2}


def fake_latency(genotypes: list[Genotype]) -> np.ndarray:
    return np.array([3 * sum(COST[o] for o, _ in g.normal) + 2 * sum(COST[o] for o, _ in g.reduce) + 0.5
                     for g in genotypes])


def fake_error(genotypes: list[Genotype]) -> np.ndarray:
    wobble = np.array([int(g.arch_id[:4], 16) / 0xFFFF for g in genotypes])
    return 1.0 / (1.0 + 0.1 * fake_latency(genotypes)) + 0.05 * wobble


class Stop(Exception):
    """Raised from the progress callback to simulate an interruption."""


def make_problem(macro: MacroConfig, width: bool = False, **budgets: float) -> HWNASProblem:
    return HWNASProblem(SearchSpace(macro, width=width), fake_error, fake_latency, **budgets)


def test_params_counter_matches_built_network(tiny_macro: MacroConfig, rng: np.random.Generator) -> None:
    space = SearchSpace(tiny_macro)
    gs = [space.sample(rng) for _ in range(8)]
    want = np.array([count_params(Network(g)) for g in gs]) / 1e6
    np.testing.assert_allclose(ParamsCounter(tiny_macro)(gs), want, rtol=0, atol=1e-12)


def test_repair_makes_any_real_matrix_decode(tiny_macro: MacroConfig, rng: np.random.Generator) -> None:
    space = SearchSpace(tiny_macro)
    problem = make_problem(tiny_macro)
    X = rng.uniform(-3, 10, size=(200, space.n_var))  # out of bounds, fractional, clashing inputs
    fixed = SpaceRepair(space).do(problem, Population.new(X=X)).get("X")
    for x in fixed:
        g = space.decode(x)  # raises if invalid
        np.testing.assert_array_equal(canonical(space.encode(g)), x)


def test_equal_architectures_get_equal_vectors(tiny_macro: MacroConfig, genotype: Genotype) -> None:
    space = SearchSpace(tiny_macro)
    x = space.encode(genotype)
    swapped = x.copy()
    swapped[0:4] = np.r_[x[2:4], x[0:2]]  # the two pairs of node 0 exchanged: same architecture
    assert space.decode(swapped).arch_id == genotype.arch_id
    np.testing.assert_array_equal(canonical(swapped), canonical(x))


def test_every_offspring_decodes_and_is_cached(tiny_macro: MacroConfig) -> None:
    calls: list[int] = []
    seen: list[Genotype] = []

    def error(gs: list[Genotype]) -> np.ndarray:
        calls.append(len(gs))
        seen.extend(gs)
        return fake_error(gs)

    problem = HWNASProblem(SearchSpace(tiny_macro), error, fake_latency)
    front = search(problem, SearchConfig(pop=12, gens=8, seed=1))
    ids = [g.arch_id for g in seen]
    assert len(ids) == len(set(ids)), "an architecture was evaluated twice despite the cache"
    assert front.n_evaluations == len(ids) > 12 * 4  # offspring were produced, every one decoded
    assert len(front.history) == 8
    assert [h["gen"] for h in front.history] == list(range(1, 9))
    hv = [h["hypervolume"] for h in front.history]
    assert all(b >= a for a, b in zip(hv, hv[1:])), "the archive front's hypervolume cannot shrink"


def test_objective_functions_are_checked(tiny_macro: MacroConfig) -> None:
    problem = HWNASProblem(SearchSpace(tiny_macro), lambda gs: np.full(len(gs), 1.5), fake_latency)
    with pytest.raises(ValueError, match="error_fn"):
        problem.evaluate(np.atleast_2d(SearchSpace(tiny_macro).encode(SearchSpace(tiny_macro).sample(np.random.default_rng(0)))))
    problem = HWNASProblem(SearchSpace(tiny_macro), fake_error, lambda gs: np.ones(len(gs) + 1))
    with pytest.raises(ValueError, match="latency_fn returned"):
        search(problem, SearchConfig(pop=4, gens=1))


def test_constraints_are_budget_violations(tiny_macro: MacroConfig, rng: np.random.Generator) -> None:
    space = SearchSpace(tiny_macro)
    problem = make_problem(tiny_macro, max_latency_ms=30.0, max_params_m=0.009)
    assert problem.n_ieq_constr == 2
    gs = [space.sample(rng) for _ in range(5)]
    F, G = problem.evaluate(np.stack([space.encode(g) for g in gs]), return_values_of=["F", "G"])
    np.testing.assert_allclose(G[:, 0], F[:, 1] - 30.0)
    np.testing.assert_allclose(G[:, 1], F[:, 2] - 0.009)
    front = search(problem, SearchConfig(pop=10, gens=5, max_latency_ms=30.0, max_params_m=0.009))
    assert front.feasible and front.members
    assert all(m.latency_ms <= 30.0 and m.params_m <= 0.009 and m.violation == 0 for m in front.members)


def test_impossible_budget_returns_least_violating(tiny_macro: MacroConfig) -> None:
    problem = make_problem(tiny_macro, max_latency_ms=0.01)
    front = search(problem, SearchConfig(pop=8, gens=3, max_latency_ms=0.01))
    assert not front.feasible and front.hypervolume == 0.0
    assert 0 < len(front.members) <= 5
    fastest = min(problem.cache.values(), key=lambda f: f[1])[1]
    assert min(m.violation for m in front.members) == pytest.approx(fastest - 0.01)


@pytest.mark.parametrize("algorithm, width", [("nsga2", False), ("random", False), ("nsga2", True)])
def test_resume_gives_the_uninterrupted_front(tiny_macro: MacroConfig, tmp_path, algorithm: str, width: bool) -> None:
    cfg = SearchConfig(pop=10, gens=7, seed=3, algorithm=algorithm, max_params_m=0.012)
    full = search(make_problem(tiny_macro, width, max_params_m=0.012), cfg)
    if width:  # the search chose widths, and they survive the resume
        assert len({m.genotype.width for m in full.members}) > 1
    ckpt = tmp_path / "checkpoint.json"

    def interrupt(info: dict) -> None:
        if info["gen"] == 3:
            raise Stop

    with pytest.raises(Stop):
        search(make_problem(tiny_macro, width, max_params_m=0.012), cfg, checkpoint=ckpt, progress=interrupt)
    saved = json.loads(ckpt.read_text())
    assert saved["generation"] == 3 and "rng" in saved
    resumed = search(make_problem(tiny_macro, width, max_params_m=0.012), cfg, resume=ckpt, checkpoint=ckpt)
    assert resumed.to_dict() == full.to_dict()


def test_resume_refuses_other_settings(tiny_macro: MacroConfig, tmp_path) -> None:
    ckpt = tmp_path / "checkpoint.json"
    search(make_problem(tiny_macro), SearchConfig(pop=6, gens=2, seed=0), checkpoint=ckpt)
    with pytest.raises(ValueError, match="seed"):
        search(make_problem(tiny_macro), SearchConfig(pop=6, gens=3, seed=1), resume=ckpt)
    with pytest.raises(ValueError, match="macro"):
        other = MacroConfig(C=4, layers=3, in_channels=1, resolution=8, classes=5)
        search(make_problem(other), SearchConfig(pop=6, gens=3, seed=0), resume=ckpt)
    ckpt.write_text(ckpt.read_text()[:50])
    with pytest.raises(ValueError, match="not valid JSON"):
        search(make_problem(tiny_macro), SearchConfig(pop=6, gens=3, seed=0), resume=ckpt)


def test_nsga2_and_random_spend_the_same_evaluations(tiny_macro: MacroConfig) -> None:
    cfg = SearchConfig(pop=10, gens=4, seed=0)
    problem, asked = make_problem(tiny_macro), []
    objectives = problem.objectives
    problem.objectives = lambda gs: (asked.extend(g.arch_id for g in gs), objectives(gs))[1]
    nsga = search(problem, cfg)
    rand = search(make_problem(tiny_macro), SearchConfig(pop=10, gens=4, seed=0, algorithm="random"))
    assert rand.n_evaluations == 40
    assert len(asked) == 40  # NSGA-II asks for exactly pop x gens evaluations, like random search
    # ... of which repeats of earlier architectures are cache hits: the front counts each architecture once.
    assert nsga.n_evaluations == len(set(asked)) == problem.n_computed
    assert nsga.reference_point == rand.reference_point


def test_dask_scheduler_gives_the_serial_front(tiny_macro: MacroConfig) -> None:
    distributed = pytest.importorskip("dask.distributed")
    serial = search(make_problem(tiny_macro), SearchConfig(pop=6, gens=2, seed=0))
    # An in-process cluster keeps the test fast; `--scheduler` reaches a real one the same way.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        cfg = SearchConfig(pop=6, gens=2, seed=0, scheduler=cluster.scheduler_address)
        problem = make_problem(tiny_macro)
        parallel = search(problem, cfg)
    assert problem.n_computed == parallel.n_evaluations
    a, b = parallel.to_dict(), serial.to_dict()
    assert a.pop("config")["search"]["scheduler"] == cluster.scheduler_address
    b.pop("config")
    assert a == b


def test_search_config_validates() -> None:
    with pytest.raises(ValueError, match="algorithm"):
        SearchConfig(algorithm="bayes")
    with pytest.raises(ValueError, match="max_latency_ms"):
        SearchConfig(max_latency_ms=-1.0)
    with pytest.raises(ValueError, match="unknown keys"):
        SearchConfig.from_dict({"population": 3})


def test_run_search_writes_files_and_guards_the_folder(tiny_macro: MacroConfig, tmp_path) -> None:
    from hwnas.search.front import ParetoFront
    from hwnas.search.session import prepare_out_dir, run_search

    cfg = SearchConfig(pop=6, gens=2, seed=0)
    out = tmp_path / "search"
    front, baseline = run_search(make_problem(tiny_macro), cfg, out, compare_random=True, provenance={"profile": "p.json"})
    for name in ("front.json", "front.csv", "pareto.png", "random_front.json", "checkpoint.json"):
        assert (out / name).is_file(), name
    assert ParetoFront.load(out / "front.json").to_dict() == front.to_dict()
    assert front.config["profile"] == "p.json" and baseline.n_evaluations == 12
    with pytest.raises(ValueError, match="--resume"):
        prepare_out_dir(out, resume=False)  # an earlier search is never overwritten silently
    again, _ = run_search(make_problem(tiny_macro), cfg, out, resume=True, provenance={"profile": "p.json"})
    assert again.to_dict() == front.to_dict()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot write"):
        prepare_out_dir(blocker, resume=False)


def test_elastic_search_on_a_supernet_with_one_profile_per_resolution(tiny_macro: MacroConfig, tiny_spec: str,
                                                                       fake_device, tmp_path, monkeypatch) -> None:
    """Supernet trained at 8 and 4 px + a profile for each: the search picks resolutions, export follows them."""
    from dataclasses import replace

    from hwnas.profiling import timer

    # The fake device of conftest, made slower on larger inputs so that the profiles of two resolutions differ.
    fake_time = timer.time_model
    monkeypatch.setattr(timer, "time_model", lambda model, shape, cfg: fake_time(model, shape, cfg) * (1 + shape[-1]))

    from hwnas.config import ProfileConfig, SupernetConfig
    from hwnas.export import export_front
    from hwnas.predictors import create_predictor
    from hwnas.profiling import profiler
    from hwnas.search.session import build_problem
    from hwnas.train import load_elastic_data, load_supernet, train_supernet

    sn_dir = train_supernet(SupernetConfig(data=tiny_spec, macro=tiny_macro, epochs=0, sample_epochs=1, batch_size=16,
                                           resolutions=(4,)), tmp_path / "supernet")
    _, sn_cfg = load_supernet(sn_dir)
    paths = {}
    for res in (8, 4, 6):
        macro = sn_cfg.macro.at_resolution(res)
        paths[res] = tmp_path / f"p{res}.json"
        profiler.profile_device(ProfileConfig(device=f"tiny{res}", out=str(paths[res]), macro=macro, n_calibration=8,
                                              n_validation=4, runs=2, warmup=0, rounds=2))
    problem = build_problem(sn_dir, [paths[8], paths[4]], SearchConfig(pop=8, gens=2))
    assert problem.space.resolutions == (4, 8)
    front = search(problem, SearchConfig(pop=8, gens=3, seed=0))
    gs = [replace(front.members[0].genotype, macro=sn_cfg.macro.at_resolution(r)) for r in (4, 8)]
    for g, row in zip(gs, problem.objectives(gs)):  # each resolution's latency comes from its own profile
        own = profiler.DeviceProfile.load(paths[g.macro.resolution])
        assert row[1] == pytest.approx(create_predictor(own).predict([g])[0])
    assert problem.objectives(gs)[0, 1] < 0.9 * problem.objectives(gs)[1, 1]
    assert {m.genotype.macro.resolution for m in front.members} <= {4, 8}

    with pytest.raises(ValueError, match="measured for macro"):
        build_problem(sn_dir, [paths[4]], SearchConfig(pop=8, gens=2))  # one profile must be the supernet's macro
    with pytest.raises(ValueError, match="trained at resolutions \\[4, 8\\]"):
        build_problem(sn_dir, [paths[8], paths[6]], SearchConfig(pop=8, gens=2))

    profiles = [profiler.DeviceProfile.load(paths[r]) for r in (8, 4)]
    report = export_front(front, tmp_path / "export", profile=profiles, data=load_elastic_data(sn_cfg),
                          measure_fn=lambda gs: np.array([m.latency_ms for m in front.members]),
                          scale_fn=lambda p: (2.0 if p.macro.resolution == 4 else 1.0, 0.1))
    assert report["summary"]["n_passed"] == len(front.members)
    assert {s["resolution"]: s["scale"] for s in report["summary"]["sentinel"]} == {
        r: (2.0 if r == 4 else 1.0) for r in {m.genotype.macro.resolution for m in front.members}}
    for row, member in zip(report["members"], front.members):
        want = 2.0 if member.genotype.macro.resolution == 4 else 1.0
        assert row["predicted_rescaled_ms"] == pytest.approx(want * member.latency_ms)


def test_resume_refuses_another_supernet_or_profile(tiny_macro: MacroConfig, tmp_path) -> None:
    """The checkpoint holds the sha256 of the supernet weights and of each profile; a changed one is named."""
    from hwnas.search.session import run_search

    sn, profile = tmp_path / "sn", tmp_path / "p8.json"
    sn.mkdir()
    (sn / "supernet.pt").write_bytes(b"weights")
    profile.write_text('{"latency": 1}')
    provenance = {"supernet": str(sn), "profile": [str(profile)]}
    cfg, out = SearchConfig(pop=6, gens=2, seed=0), tmp_path / "search"
    with pytest.raises(Stop):
        run_search(make_problem(tiny_macro), cfg, out, provenance=provenance, progress=lambda info: stop(info, 1))
    saved = json.loads((out / "checkpoint.json").read_text())["inputs_sha256"]
    assert set(saved) == {"supernet supernet.pt", "profile p8.json"}

    profile.write_text('{"latency": 2}')  # re-profiled since
    with pytest.raises(ValueError, match="profile p8.json changed"):
        run_search(make_problem(tiny_macro), cfg, out, resume=True, provenance=provenance)
    profile.write_text('{"latency": 1}')
    (sn / "supernet.pt").write_bytes(b"retrained")
    with pytest.raises(ValueError, match="supernet supernet.pt changed"):
        run_search(make_problem(tiny_macro), cfg, out, resume=True, provenance=provenance)
    (sn / "supernet.pt").write_bytes(b"weights")
    other = tmp_path / "p6.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match="profile p6.json"):
        run_search(make_problem(tiny_macro), cfg, out, resume=True, provenance={**provenance, "profile": [str(other)]})
    front, _ = run_search(make_problem(tiny_macro), cfg, out, resume=True, provenance=provenance)  # the same files
    assert front.n_evaluations == 12


def stop(info: dict, at: int) -> None:
    if info["gen"] >= at:
        raise Stop
