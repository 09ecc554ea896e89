import numpy as np
import pytest
from torch import nn

from hwnas.profiling import timer
from hwnas.profiling.onnx_io import onnx_bytes


def test_timing_config_rejects_bad_values():
    with pytest.raises(ValueError, match="optimization_level"):
        timer.TimingConfig(optimization_level="max")
    with pytest.raises(ValueError, match="runs"):
        timer.TimingConfig(runs=0)
    with pytest.raises(ValueError, match="warmup"):
        timer.TimingConfig(warmup=-1)
    with pytest.raises(ValueError, match="interleave"):
        timer.TimingConfig(interleave=-1)


def test_session_options_are_explicit():
    so = timer.session_options(timer.TimingConfig(threads=1, optimization_level="basic"))
    import onnxruntime as ort

    assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def test_time_model_returns_one_time_per_run():
    model = onnx_bytes(nn.Conv2d(2, 2, 3, padding=1), (1, 2, 4, 4))
    times = timer.time_model(model, (1, 2, 4, 4), timer.TimingConfig(runs=5, warmup=1))
    assert times.shape == (5,) and np.all(times > 0)


def test_combine_follows_drift_seen_by_the_sentinel():
    # Rounds 1 and 2 run on a machine 2x slower: candidate and sentinel both double, the corrected latency does not.
    records = [("a", 0, 1.0, 0.5), ("a", 1, 2.0, 1.0), ("a", 2, 2.0, 1.0)]
    ref = np.median([0.5, 1.0, 1.0])
    corrected = timer.combine(records, window=0, how="median")
    assert corrected["a"] == pytest.approx(1.0 * ref / 0.5)
    assert timer.sentinel_median(records, window=0) == pytest.approx(ref)
    raw = timer.combine([(k, r, t, float("nan")) for k, r, t, _ in records], how="median")
    assert raw["a"] == pytest.approx(2.0)


def test_combine_min_rejects_a_disturbed_round_and_window_smooths_sentinel_noise():
    # One sentinel timing is disturbed (3x); with a window its neighbours set the level, so nothing moves.
    records = [("a", 0, 1.0, 1.0), ("b", 0, 2.0, 3.0), ("a", 1, 1.5, 1.0), ("b", 1, 2.0, 1.0)]
    got = timer.combine(records, window=1, how="min")
    assert got == {"a": pytest.approx(1.0), "b": pytest.approx(2.0)}
    assert timer.combine(records, window=1, rounds=[1]) == {"a": pytest.approx(1.5), "b": pytest.approx(2.0)}
    with pytest.raises(ValueError, match="how"):
        timer.combine(records, how="mean")


def test_run_round_interleaves_skips_done_and_reports(monkeypatch):
    calls = []
    monkeypatch.setattr(timer, "time_model", lambda model, shape, cfg: calls.append(model) or np.array([float(len(model))]))
    cands = [timer.Candidate(k, k.encode() * 2, (1,)) for k in ("a", "bb", "ccc", "dddd")]
    sentinel = timer.Candidate("s", b"s", (1,))
    seen = []
    cfg = timer.TimingConfig(interleave=0)  # the sentinel timed before each candidate, in its own session
    recs = timer.run_round(cands, 3, cfg, sentinel, done=lambda k, r: k == "bb", on_record=seen.append)
    assert sorted(r[0] for r in recs) == ["a", "ccc", "dddd"] and recs == seen
    assert calls[0::2] == [b"s"] * 3  # a sentinel timing before every candidate
    assert all(r[1] == 3 and r[2] == 2 * len(r[0]) and r[3] == 1.0 for r in recs)
    # The order is shuffled per round, reproducibly.
    again = timer.run_round(cands, 3, cfg, sentinel, done=lambda k, r: k == "bb")
    assert [r[0] for r in again] == [r[0] for r in recs]


def test_time_pair_alternates_blocks_of_runs_in_live_sessions(monkeypatch):
    order = []

    def ready(model, shape, cfg):
        order.append(("open", model))
        return lambda: order.append(model)

    monkeypatch.setattr(timer, "_ready_session", ready)
    a, b = timer.Candidate("s", b"s", (1,)), timer.Candidate("c", b"c", (1,))
    ts, tc = timer.time_pair(a, b, timer.TimingConfig(runs=7, interleave=3))
    assert ts.shape == tc.shape == (7,)
    # Both sessions are open before timing starts; then blocks of 3, 3, 1 runs alternate.
    assert order == [("open", b"s"), ("open", b"c")] + [b"s"] * 3 + [b"c"] * 3 + [b"s"] * 3 + [b"c"] * 3 + [b"s", b"c"]


def test_time_pair_runs_real_sessions():
    model = onnx_bytes(nn.Conv2d(2, 2, 3, padding=1), (1, 2, 4, 4))
    cand = timer.Candidate("m", model, (1, 2, 4, 4))
    ts, tc = timer.time_pair(cand, cand, timer.TimingConfig(runs=6, warmup=1, interleave=2))
    assert ts.shape == tc.shape == (6,) and np.all(ts > 0) and np.all(tc > 0)


def test_paired_combine_cancels_a_burst_shorter_than_the_window():
    # Record 2 of "b" ran in a 1.8x burst that slowed its interleaved sentinel alike. The moving-minimum level
    # (window 2) does not see a burst this short; the paired correction, by the record's own sentinel, does.
    records = [("a", 0, 1.0, 1.0), ("b", 0, 3.6, 1.8), ("c", 0, 1.5, 1.0), ("a", 1, 1.0, 1.0)]
    assert timer.combine(records, window=2)["b"] == pytest.approx(3.6)
    paired = timer.combine(records, window=2, paired=True)
    assert paired == {"a": pytest.approx(1.0), "b": pytest.approx(2.0), "c": pytest.approx(1.5)}
    a, b = timer.split_halves(records, 1.0, rounds=2, window=2, paired=True)
    assert a["b"] == pytest.approx(2.0) and b == {"a": pytest.approx(1.0)}


def test_run_round_pairs_sentinel_and_candidate_when_interleaving(monkeypatch):
    seen = []
    monkeypatch.setattr(timer, "time_pair", lambda s, c, cfg: seen.append((s.key, c.key)) or (np.array([1.0]), np.array([2.0])))
    monkeypatch.setattr(timer, "time_model", lambda *a: pytest.fail("interleaved rounds must not time models alone"))
    cands = [timer.Candidate(k, b"m", (1,)) for k in ("a", "b")]
    recs = timer.run_round(cands, 0, timer.TimingConfig(interleave=10), timer.Candidate("s", b"s", (1,)))
    assert sorted(seen) == [("s", "a"), ("s", "b")] and all(r[2:] == (2.0, 1.0) for r in recs)


def test_measure_models_needs_a_sentinel_when_configured():
    with pytest.raises(ValueError, match="sentinel"):
        timer.measure_models([], timer.TimingConfig(sentinel=True), None)


def test_node_times_names_the_exported_nodes():
    model = onnx_bytes(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()), (1, 2, 4, 4))
    times = timer.node_times(model, (1, 2, 4, 4), timer.TimingConfig(warmup=1), runs=2)
    assert times and all(t >= 0 for t in times.values())
    # Conv + ReLU are fused into one node named after the graph output, plus a layout reorder.
    assert any(name.startswith("logits") for name in times)
