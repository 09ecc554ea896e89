"""Small, fast fixtures shared by the tests."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hwnas.config import MacroConfig
from hwnas.space import Genotype, SearchSpace


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
