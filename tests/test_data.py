"""Datasets: kinds, deterministic splits that keep test apart, clear errors for bad input."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hwnas.data import load_dataset


def _npz(tmp_path: Path, x: np.ndarray, y: np.ndarray, name: str = "d.npz") -> str:
    path = tmp_path / name
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


def _rows(ds) -> set[bytes]:
    return {row.numpy().tobytes() for row in ds.tensors[0]}


def test_digits_splits_are_disjoint_deterministic_and_resized() -> None:
    a = load_dataset("digits", resolution=16, seed=0)
    b = load_dataset("digits", resolution=16, seed=0)
    c = load_dataset("digits", resolution=16, seed=1)
    assert a.train.tensors[0].shape[1:] == (1, 16, 16)
    assert (a.in_channels, a.num_classes, a.resolution) == (1, 10, 16)
    assert len(a.train) + len(a.valid) + len(a.test) == 1797
    assert torch.equal(a.test.tensors[0], b.test.tensors[0]) and torch.equal(a.train.tensors[1], b.train.tensors[1])
    assert not torch.equal(a.test.tensors[1], c.test.tensors[1])
    train, valid, test = _rows(a.train), _rows(a.valid), _rows(a.test)
    # digits has a few duplicate images, so allow a handful of coincidental overlaps.
    assert len(train & test) < 5 and len(valid & test) < 5
    # normalised with train-split statistics
    assert abs(float(a.train.tensors[0].mean())) < 1e-4


def test_npz_three_dim_input_and_label_remapping(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((40, 6, 6)).astype(np.float32)
    y = np.repeat([3, 7], 20)
    d = load_dataset(_npz(tmp_path, x, y), resolution=8, seed=0)
    assert d.in_channels == 1 and d.num_classes == 2 and d.train.tensors[0].shape[1:] == (1, 8, 8)
    assert set(torch.cat([d.train.tensors[1], d.valid.tensors[1], d.test.tensors[1]]).tolist()) == {0, 1}


@pytest.mark.parametrize(
    "x_shape, y, match",
    [
        ((10, 2, 3, 4, 5), np.arange(10) % 2, "x must have shape"),
        ((10, 4, 4), np.arange(9) % 2, "9 labels in y for 10 samples"),
        ((10, 4, 4), np.zeros(10, dtype=int), "same label"),
        ((10, 4, 4), np.zeros((10, 2), dtype=int), "y must have shape"),
        ((10, 4, 4), np.linspace(0, 1, 10), "integer class labels"),
    ],
)
def test_npz_bad_contents_are_named(tmp_path: Path, x_shape, y, match) -> None:
    spec = _npz(tmp_path, np.zeros(x_shape, dtype=np.float32), y)
    with pytest.raises(ValueError, match=match):
        load_dataset(spec, resolution=8)


def test_npz_missing_array_and_file(tmp_path: Path) -> None:
    path = tmp_path / "only_x.npz"
    np.savez(path, x=np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match=r"lacks array\(s\) \['y'\]"):
        load_dataset(f"npz:{path}")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")


def test_unknown_spec_and_bad_resolution() -> None:
    with pytest.raises(ValueError, match="unknown dataset spec"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="resolution"):
        load_dataset("digits", resolution=0)


def test_folder_of_class_folders(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray((rng.random((10, 12)) * 255).astype(np.uint8), mode="L").save(tmp_path / cls / f"{i}.png")
    d = load_dataset(f"folder:{tmp_path}", resolution=8)
    assert (d.in_channels, d.num_classes) == (1, 3)  # grey images keep one channel
    assert d.train.tensors[0].shape[1:] == (1, 8, 8)
    (tmp_path / "cat" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.png"):
        load_dataset(f"folder:{tmp_path}", resolution=8)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_dataset(f"folder:{tmp_path / 'missing'}")


def test_cifar10_folder_uses_official_test_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 30), ("test_batch", 10)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with (tmp_path / name).open("wb") as f:
            pickle.dump(batch, f)  # the official CIFAR-10 format, written here only to build a fixture
    d = load_dataset(f"cifar10:{tmp_path}", resolution=8)
    assert d.in_channels == 3 and len(d.test) == 10 and len(d.train) + len(d.valid) == 30
    (tmp_path / "data_batch_2").write_bytes(b"\x80truncated")
    with pytest.raises(ValueError, match="data_batch_2"):
        load_dataset(f"cifar10:{tmp_path}", resolution=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no data_batch"):
        load_dataset(f"cifar10:{tmp_path / 'empty'}", resolution=8)


def test_cifar10_batch_that_holds_code_is_refused(tmp_path: Path) -> None:
    import os
    import pickle

    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Hostile(), b"labels": [0]}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_dataset(f"cifar10:{tmp_path}", resolution=8)


def test_npz_channels_last_is_detected(tmp_path: Path) -> None:
    """(N, H, W, C) with C in {1, 3, 4} is read as C channels, not as H channels of W x C pixels."""
    rng = np.random.default_rng(0)
    first = rng.random((30, 3, 8, 8)).astype(np.float32)
    y = np.arange(30) % 3
    want = load_dataset(_npz(tmp_path, first, y, "first.npz"), resolution=8, seed=0)
    got = load_dataset(_npz(tmp_path, first.transpose(0, 2, 3, 1), y, "last.npz"), resolution=8, seed=0)
    assert got.in_channels == 3
    assert torch.equal(got.train.tensors[0], want.train.tensors[0])
    grey = load_dataset(_npz(tmp_path, first[:, :1].transpose(0, 2, 3, 1), y, "grey.npz"), resolution=8, seed=0)
    assert grey.in_channels == 1
    with pytest.raises(ValueError, match="ambiguous"):  # 4 channels of 4x4 or 4 channels-last of 4x4?
        load_dataset(_npz(tmp_path, rng.random((30, 4, 4, 4)).astype(np.float32), y, "amb.npz"), resolution=8, seed=0)
