"""Small, fast fixtures shared by the tests."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hwnas.config import MacroConfig
from hwnas.profiling import profiler, timer
from hwnas.space import Genotype, SearchSpace, count_params


@pytest.fixture
def tiny_macro() -> MacroConfig:
    """A macro small enough that a supernet forward takes milliseconds."""
    return MacroConfig(C=4, layers=3, in_channels=1, resolution=8, classes=10)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def genotype(tiny_macro: MacroConfig, rng: np.random.Generator) -> Genotype:
    """A random valid genotype at the tiny macro."""
    return SearchSpace(tiny_macro).sample(rng)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def fake_device(monkeypatch):
    """No export, no onnxruntime: a model's 'latency' is a linear function of its parameter count."""
    calls = []

    def fake_bytes(module: nn.Module, shape, opset=17) -> bytes:
        return repr(0.01 + 1e-6 * count_params(module)).encode()

    def fake_time(model: bytes, shape, cfg) -> np.ndarray:
        calls.append(model)
        return np.full(cfg.runs, float(model.decode()))

    def fake_pair(first, second, cfg) -> tuple[np.ndarray, np.ndarray]:
        return timer.time_model(first.model, first.input_shape, cfg), timer.time_model(second.model, second.input_shape, cfg)

    monkeypatch.setattr(profiler, "onnx_bytes", fake_bytes)
    monkeypatch.setattr(timer, "time_model", fake_time)
    monkeypatch.setattr(timer, "time_pair", fake_pair)  # through time_model, so tests may patch that alone
    return calls


@pytest.fixture
def tiny_spec(tmp_path) -> str:
    """60 8x8 grey images in 3 classes told apart by brightness: learnable in a few steps."""
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3  # 3 classes
    x = (y[:, None, None] + 0.3 * rng.standard_normal((60, 8, 8))).astype(np.float32)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


@pytest.fixture
def one_torch_thread():
    """One torch thread: on a shared 2-core machine, two spinning threads make tiny steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def count_timed_rounds(monkeypatch):
    """Call it to make timer.run_round record, from then on, each round it really times (not one kept before)."""
    real = timer.run_round

    def start() -> list[int]:
        rounds: list[int] = []

        def counting(cands, r, *args, done=None, **kwargs):
            rounds.extend(r for c in cands if done is None or not done(c.key, r))
            return real(cands, r, *args, done=done, **kwargs)

        monkeypatch.setattr(timer, "run_round", counting)
        return rounds

    return start
