"""Datasets (digits, cifar10 folder, image folder, .npz) as deterministic train / search-validation / test splits.

Nothing is downloaded: `digits` ships inside scikit-learn, the other kinds read files the user points at.
The test split is held out from training and search; only stand-alone evaluation reads it.
"""
from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


@dataclass
class DataSplits:
    """Normalised (N, C, H, W) float tensors and int64 labels for the three splits."""

    train: TensorDataset
    valid: TensorDataset
    test: TensorDataset
    in_channels: int
    num_classes: int
    resolution: int


class MultiResolutionData(Mapping[int, DataSplits]):
    """One dataset's splits (the same samples in each) at several input resolutions, each loaded on first use."""

    def __init__(self, spec: str, resolutions: Iterable[int], seed: int = 0, valid_fraction: float = 0.2,
                 test_fraction: float = 0.2) -> None:
        self.resolutions = tuple(sorted(set(resolutions)))
        self._args = (spec, seed, valid_fraction, test_fraction)
        self._loaded: dict[int, DataSplits] = {}

    def __getitem__(self, resolution: int) -> DataSplits:
        if resolution not in self.resolutions:
            raise KeyError(resolution)
        if resolution not in self._loaded:
            spec, seed, valid, test = self._args
            self._loaded[resolution] = load_dataset(spec, resolution, seed, valid, test)
        return self._loaded[resolution]

    def __iter__(self) -> Iterator[int]:
        return iter(self.resolutions)

    def __len__(self) -> int:
        return len(self.resolutions)


def splits_at(data: DataSplits | Mapping[int, DataSplits], resolution: int) -> DataSplits:
    """The splits at `resolution` from one DataSplits or a resolution -> DataSplits mapping; ValueError if absent."""
    if isinstance(data, Mapping):
        if resolution in data:
            return data[resolution]
        have = list(data)
    else:
        have = [getattr(data, "resolution", resolution)]
        if have[0] == resolution:
            return data
    raise ValueError(f"no data at resolution {resolution}; the dataset was prepared at {have}")


def load_dataset(
    spec: str = "digits",
    resolution: int = 16,
    seed: int = 0,
    valid_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> DataSplits:
    """Load `spec` ("digits", "cifar10:PATH", "folder:PATH", "npz:PATH") resized to `resolution`, split by `seed`."""
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    kind, _, arg = spec.partition(":")
    fixed_test: tuple[np.ndarray, np.ndarray] | None = None
    if kind == "digits" and not arg:
        x, y = _load_digits()
    elif kind == "cifar10" and arg:
        x, y, fixed_test = _load_cifar10(Path(arg))
    elif kind == "folder" and arg:
        x, y = _load_folder(Path(arg), resolution)
    elif kind == "npz" and arg:
        x, y = _load_npz(Path(arg))
    else:
        raise ValueError(f"unknown dataset spec {spec!r}; expected digits, cifar10:PATH, folder:PATH or npz:PATH")
    y, num_classes = _check_labels(spec, x, y if fixed_test is None else np.concatenate([y, fixed_test[1]]))
    if fixed_test is not None:  # labels were remapped together so train and test share class indices
        y, y_test = y[: len(x)], y[len(x) :]
        fixed_test = (fixed_test[0], y_test)

    train_idx, valid_idx, test_idx = _split_indices(y, seed, valid_fraction, 0.0 if fixed_test else test_fraction)
    xt = _resize(torch.from_numpy(x), resolution)
    mean = xt[train_idx].mean(dim=(0, 2, 3), keepdim=True)  # statistics from the train split only
    std = xt[train_idx].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    xt = (xt - mean) / std
    yt = torch.from_numpy(y)
    if fixed_test is not None:
        x_test = (_resize(torch.from_numpy(fixed_test[0]), resolution) - mean) / std
        test = TensorDataset(x_test, torch.from_numpy(fixed_test[1]))
    else:
        test = TensorDataset(xt[test_idx], yt[test_idx])
    return DataSplits(
        train=TensorDataset(xt[train_idx], yt[train_idx]),
        valid=TensorDataset(xt[valid_idx], yt[valid_idx]),
        test=test,
        in_channels=int(x.shape[1]),
        num_classes=num_classes,
        resolution=resolution,
    )


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits, grey values scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    return x, digits.target.astype(np.int64)


def _load_cifar10(root: Path) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """The standard `cifar-10-batches-py` folder; its official test_batch becomes the test split."""
    if not root.is_dir():
        raise FileNotFoundError(f"cifar10: {root} is not a directory (expected the cifar-10-batches-py folder)")
    present = [root / name for name in CIFAR_TRAIN_BATCHES if (root / name).is_file()]
    if not present:
        raise FileNotFoundError(f"cifar10: no data_batch_1..5 files in {root}")
    parts = [_read_cifar_batch(p) for p in present]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    test_path = root / "test_batch"
    fixed_test = _read_cifar_batch(test_path) if test_path.is_file() else None
    if fixed_test is None:
        log.warning("cifar10: %s has no test_batch; the test split is carved out of the training batches", root)
    return x, y, fixed_test


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and plain containers but no other object (no code runs)."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle hook
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file -> (N, 3, 32, 32) floats in [0, 1] and labels."""
    # CIFAR-10 is distributed only as Python pickles; we unpickle it solely because that is the official
    # format of a folder the user chose to point us at; the unpickler rebuilds arrays only, so a hostile
    # file cannot run code. hwnas never writes pickles itself.
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as err:  # corrupt/truncated files raise many different exception types
        raise ValueError(f"cifar10: cannot read {path} as a CIFAR-10 batch ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"cifar10: {path} is not a CIFAR-10 batch (needs 'data' and 'labels')")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"cifar10: {path}: 'data' must have shape (N, 3072), got {data.shape}")
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"cifar10: {path}: {labels.size} labels for {data.shape[0]} images")
    return (data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0), labels


def _load_folder(root: Path, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """One sub-folder per class of image files, each resized to resolution x resolution with Pillow."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise FileNotFoundError(f"folder: {root} is not a directory")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"folder: {root} has no class sub-folders (expected one sub-folder per class)")
    files: list[tuple[Path, int]] = []
    for label, d in enumerate(classes):
        found = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ValueError(f"folder: class folder {d} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        files += [(p, label) for p in found]
    images = []
    for path, _ in files:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB").resize((resolution, resolution), Image.Resampling.BILINEAR))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"folder: cannot read image {path} ({err})") from None
    x = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images]).transpose(0, 3, 1, 2)  # (N, 3, H, W)
    if np.allclose(x[:, 0], x[:, 1]) and np.allclose(x[:, 0], x[:, 2]):
        x = x[:, :1]  # all grey: keep one channel
    return np.ascontiguousarray(x), np.array([label for _, label in files], dtype=np.int64)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrays `x` (N, C, H, W) or (N, H, W) and integer labels `y` (N,) from a .npz file (no pickles)."""
    if not path.is_file():
        raise FileNotFoundError(f"npz: no such file {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):  # a bare .npy file
                raise ValueError(f"npz: {path} is not an .npz archive (arrays x and y)")
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise ValueError(f"npz: {path} lacks array(s) {missing}; found {npz.files}")
            _check_npz_sizes(npz, path)
            x, y = npz["x"], npz["y"]
    except ValueError as err:
        if str(err).startswith("npz:"):
            raise
        raise ValueError(f"npz: cannot read {path} ({err})") from None
    except (OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        raise ValueError(f"npz: cannot read {path} ({type(err).__name__}: {err})") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"npz: {path}: x must have shape (N, C, H, W) or (N, H, W), got {x.shape}")
    if _channels_last(x.shape, path):
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"npz: {path}: x must be real numbers, got dtype {x.dtype}")
    if y.ndim != 1:
        raise ValueError(f"npz: {path}: y must have shape (N,), got {y.shape}")
    if len(y) != len(x):
        raise ValueError(f"npz: {path}: {len(y)} labels in y for {len(x)} samples in x")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError(f"npz: {path}: y must hold integer class labels")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"npz: {path}: y must hold integer class labels, got dtype {y.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"npz: {path}: x contains NaN or infinite values")
    return x, y.astype(np.int64)


CHANNEL_COUNTS = (1, 3, 4)  # grey, RGB, RGBA: what a channels-last image array ends with


def _channels_last(shape: tuple[int, ...], path: Path) -> bool:
    """Whether an (N, A, B, D) array is channels-last (N, H, W, C); ValueError when the shape cannot tell.

    Channels-first needs A in {1, 3, 4} or an unusual channel count with nothing channels-last about it;
    channels-last needs D in {1, 3, 4}. When both fit (e.g. (N, 4, 4, 4)), square images decide; else it
    is ambiguous.
    """
    _, a, b, d = shape
    first, last = a in CHANNEL_COUNTS, d in CHANNEL_COUNTS
    if first and last:  # e.g. (N, 3, 8, 3): a square image settles it
        first, last = b == d, a == b
    if first == last and (first or a in CHANNEL_COUNTS):
        raise ValueError(f"npz: {path}: x of shape {tuple(shape)} is ambiguous: (N, C, H, W) or (N, H, W, C)? "
                         "store it channels-first, (N, C, H, W)")
    return last and not first
def _check_npz_sizes(npz: Any, path: Path) -> None:
    """Refuse arrays whose header claims more data than the archive member holds (before numpy allocates it)."""
    for name in ("x", "y"):
        info = npz.zip.getinfo(f"{name}.npy")
        with npz.zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f, max_header_size=10_000)
        claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if claimed > info.file_size:
            raise ValueError(f"npz: {path}: array {name} claims shape {shape} ({claimed} bytes), but the file holds "
                             f"{info.file_size} bytes")


def _check_labels(spec: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, int]:
    """Map labels onto 0..K-1; at least two classes are needed."""
    if len(x) == 0:
        raise ValueError(f"{spec}: the dataset is empty")
    classes, y = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"{spec}: all samples have the same label {classes[0]!r}; at least two classes are needed")
    return y.astype(np.int64), len(classes)


def _split_indices(
    y: np.ndarray, seed: int, valid_fraction: float, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified (where every class has enough samples) train / valid / test index arrays."""
    from sklearn.model_selection import train_test_split

    if not (0 < valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError("valid_fraction and test_fraction must be in (0, 1) and sum to less than 1")
    idx = np.arange(len(y))

    def split(ids: np.ndarray, frac: float, salt: int) -> tuple[np.ndarray, np.ndarray]:
        counts = np.bincount(y[ids])
        stratify = y[ids] if counts[counts > 0].min() >= 2 else None
        n_out = max(1, int(round(frac * len(ids))))
        if len(ids) - n_out < 1:
            raise ValueError(f"only {len(y)} samples: too few to split into train / valid / test")
        try:
            return train_test_split(ids, test_size=n_out, random_state=seed * 7919 + salt, stratify=stratify)
        except ValueError:  # too few samples per class for a stratified split
            return train_test_split(ids, test_size=n_out, random_state=seed * 7919 + salt)

    if test_fraction > 0:
        rest, test = split(idx, test_fraction, 1)
    else:
        rest, test = idx, idx[:0]
    train, valid = split(rest, valid_fraction / (1 - test_fraction), 2)
    return np.sort(train), np.sort(valid), np.sort(test)


def _resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, resolution, resolution) with bilinear interpolation (antialiased when shrinking)."""
    if x.shape[-2:] == (resolution, resolution):
        return x.contiguous()
    shrink = min(x.shape[-2:]) > resolution
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrink)
