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


# --- IDX (MNIST-format) folders ---------------------------------------------------------------------


def _write_idx(path: Path, arr: np.ndarray, magic: int | None = None, cut: int = 0) -> Path:
    """Write `arr` (uint8) as an IDX file (gzip when the name ends .gz); `cut` drops trailing bytes."""
    import gzip

    magic = 0x0800 | arr.ndim if magic is None else magic
    raw = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = (raw + arr.astype(np.uint8).tobytes())[: len(raw) + arr.size - cut]
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _idx_arrays(n: int, seed: int, size: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """`n` images of 3 classes told apart by brightness, labels 0..2 (each class equally often)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3).astype(np.uint8)
    x = np.clip(60 + 60 * y[:, None, None] + rng.integers(0, 30, (n, size, size)), 0, 255).astype(np.uint8)
    return x, y


def _idx_dir(root: Path, gz_test: bool = True, n_train: int = 60, n_test: int = 15) -> Path:
    """A folder with the four MNIST-format files: train plain, test gzipped (or plain)."""
    root.mkdir(parents=True, exist_ok=True)
    x, y = _idx_arrays(n_train, 0)
    _write_idx(root / "train-images-idx3-ubyte", x)
    _write_idx(root / "train-labels-idx1-ubyte", y)
    xt, yt = _idx_arrays(n_test, 1)
    suffix = ".gz" if gz_test else ""
    _write_idx(root / f"t10k-images-idx3-ubyte{suffix}", xt)
    _write_idx(root / f"t10k-labels-idx1-ubyte{suffix}", yt)
    return root


def test_idx_folder_reads_plain_and_gz_and_keeps_the_official_test_split(tmp_path: Path) -> None:
    root = _idx_dir(tmp_path / "d")
    a = load_dataset(f"idx:{root}", resolution=6, seed=0)
    b = load_dataset(f"idx:{root}", resolution=6, seed=1)
    assert (a.in_channels, a.num_classes, a.resolution) == (1, 3, 6)
    assert len(a.test) == 15 and len(a.train) + len(a.valid) == 60 and len(a.valid) == 12
    xt, yt = _idx_arrays(15, 1)
    assert torch.equal(a.test.tensors[1], torch.from_numpy(yt.astype(np.int64)))  # the t10k files, in order
    # the test images are the t10k images (an affine map of them: normalised with train statistics)
    flat_file, flat_test = xt.reshape(15, -1).astype(np.float64), a.test.tensors[0].reshape(15, -1).double().numpy()
    assert np.corrcoef(flat_file.ravel(), flat_test.ravel())[0, 1] > 0.9999
    # validation comes from train, deterministic per seed; the test split never moves
    assert torch.equal(a.valid.tensors[0], load_dataset(f"idx:{root}", resolution=6, seed=0).valid.tensors[0])
    assert not torch.equal(a.valid.tensors[1], b.valid.tensors[1]) or not torch.equal(a.valid.tensors[0], b.valid.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert abs(float(a.train.tensors[0].mean())) < 1e-4
    up = load_dataset(f"idx:{root}", resolution=12, seed=0)
    assert up.train.tensors[0].shape[1:] == (1, 12, 12) and up.train.tensors[0].dtype == torch.float32


def test_idx_accepts_dotted_file_names(tmp_path: Path) -> None:
    root = _idx_dir(tmp_path / "d", gz_test=False)
    for p in root.iterdir():
        p.rename(root / p.name.replace("-idx", ".idx"))  # e.g. train-images.idx3-ubyte
    assert len(load_dataset(f"idx:{root}", resolution=6).test) == 15


def _break_magic(root: Path) -> str:
    _write_idx(root / "train-labels-idx1-ubyte", _idx_arrays(60, 0)[1], magic=0x0D01)  # float type, not ubyte
    return "train-labels-idx1-ubyte.*not an IDX file"


def _truncate(root: Path) -> str:
    _write_idx(root / "train-images-idx3-ubyte", _idx_arrays(60, 0)[0], cut=7)
    return "train-images-idx3-ubyte: truncated"


def _trailing(root: Path) -> str:
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes() + b"\0")
    return "train-images-idx3-ubyte: longer than its header"


def _count_mismatch(root: Path) -> str:
    _write_idx(root / "train-labels-idx1-ubyte", _idx_arrays(59, 0)[1])
    return "60 images but .*train-labels-idx1-ubyte 59 labels"


def _labels_as_images(root: Path) -> str:
    _write_idx(root / "train-images-idx3-ubyte", _idx_arrays(60, 0)[0].reshape(60, 36))  # 2-D: magic 0x0802
    return "train-images-idx3-ubyte is not an IDX file of unsigned bytes with 3 dimension"


def _test_size_differs(root: Path) -> str:
    (root / "t10k-images-idx3-ubyte.gz").unlink()
    _write_idx(root / "t10k-images-idx3-ubyte.gz", _idx_arrays(15, 1, size=5)[0])
    return r"test images .* are \(5, 5\) but train images \(6, 6\)"


def _bad_gzip(root: Path) -> str:
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    return "cannot read .*t10k-labels-idx1-ubyte.gz"


@pytest.mark.parametrize("breaker", [_break_magic, _truncate, _trailing, _count_mismatch, _labels_as_images,
                                     _test_size_differs, _bad_gzip])
def test_idx_bad_files_are_named(tmp_path: Path, breaker) -> None:
    root = _idx_dir(tmp_path / "d")
    match = breaker(root)
    with pytest.raises(ValueError, match=match):
        load_dataset(f"idx:{root}", resolution=6)


def test_idx_missing_files_name_the_file_and_the_package(tmp_path: Path, monkeypatch) -> None:
    from hwnas import data

    root = _idx_dir(tmp_path / "d")
    (root / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="no train-labels-idx1-ubyte"):
        load_dataset(f"idx:{root}")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset(f"idx:{tmp_path / 'absent'}")
    monkeypatch.setitem(data.NAMED_IDX, "fashion-mnist", (tmp_path / "absent", "dataset-fashion-mnist"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_idx_without_test_files_carves_the_test_split_from_train(tmp_path: Path) -> None:
    root = _idx_dir(tmp_path / "d")
    for p in root.glob("t10k-*"):
        p.unlink()
    d = load_dataset(f"idx:{root}", resolution=6)
    assert len(d.train) + len(d.valid) + len(d.test) == 60 and len(d.test) == 12


def test_train_subset_is_stratified_deterministic_and_leaves_valid_and_test_whole(tmp_path: Path) -> None:
    spec = f"idx:{_idx_dir(tmp_path / 'd', n_train=300)}"
    full = load_dataset(spec, resolution=6, seed=0)
    a = load_dataset(spec, resolution=6, seed=0, train_subset=30)
    b = load_dataset(spec, resolution=6, seed=1, train_subset=30)
    assert len(a.train) == 30 and torch.bincount(a.train.tensors[1]).tolist() == [10, 10, 10]
    assert not _rows(a.train) & _rows(a.valid)  # drawn from the train split only
    assert torch.equal(load_dataset(spec, resolution=6, seed=0, train_subset=30).train.tensors[1], a.train.tensors[1])
    assert _rows(a.train) != _rows(b.train)
    assert len(a.valid) == len(full.valid) == 60 and len(a.test) == len(full.test) == 15
    assert torch.equal(a.test.tensors[1], full.test.tensors[1])
    assert len(load_dataset(spec, resolution=6, train_subset=10_000).train) == len(full.train)  # more than exist: all
    assert len(load_dataset("digits", resolution=8, train_subset=100).train) == 100
    with pytest.raises(ValueError, match="train_subset"):
        load_dataset(spec, train_subset=-1)
    with pytest.raises(ValueError, match="number of classes"):
        load_dataset(spec, train_subset=2)


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_files() -> None:
    d = load_dataset("fashion-mnist", resolution=28, seed=0, train_subset=500)
    assert (d.in_channels, d.num_classes, d.resolution) == (1, 10, 28)
    assert len(d.test) == 10_000 and len(d.valid) == 12_000 and len(d.train) == 500
    assert torch.bincount(d.test.tensors[1]).tolist() == [1000] * 10  # the official test set is balanced
    assert torch.bincount(d.train.tensors[1]).tolist() == [50] * 10


def test_train_subset_flag_reaches_the_supernet_config(tmp_path: Path, capsys) -> None:
    from hwnas.cli import build_parser, main
    from hwnas.config import SupernetConfig
    from hwnas.train.supernet import load_data

    args = build_parser().parse_args(["train-supernet", "--out", str(tmp_path), "--train-subset", "40"])
    assert args.train_subset == 40
    cfg = SupernetConfig(data="digits", train_subset=40)
    assert SupernetConfig.from_dict(cfg.to_dict()) == cfg and len(load_data(cfg).train) == 40
    assert SupernetConfig.from_dict({"data": "digits"}).train_subset == 0  # files written before the field
    with pytest.raises(ValueError, match="train_subset"):
        SupernetConfig(train_subset=-3)
    assert main(["train-supernet", "--data", f"idx:{tmp_path / 'none'}", "--out", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err
