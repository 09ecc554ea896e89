"""Datasets (digits, IDX/MNIST-format folder, cifar10 folder, image folder, .npz) as deterministic splits.

Nothing is downloaded: `digits` ships inside scikit-learn, `fashion-mnist` comes from a Debian package,
the other kinds read files the user points at. The test split is held out from training and search; only
stand-alone evaluation reads it. Splits are train / search-validation / test.
"""
from __future__ import annotations

import gzip
import logging
import pickle
import zipfile
import zlib
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
# IDX (MNIST format): canonical file names of the four files, per split.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_UBYTE = 0x08
# Named IDX datasets: name -> (folder, Debian package that installs it).
NAMED_IDX = {"fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"), "dataset-fashion-mnist")}
RESIZE_CHUNK = 8192  # images converted to float and resized at a time (bounds peak memory)


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
                 test_fraction: float = 0.2, train_subset: int = 0) -> None:
        self.resolutions = tuple(sorted(set(resolutions)))
        self._args = (spec, seed, valid_fraction, test_fraction, train_subset)
        self._loaded: dict[int, DataSplits] = {}

    def __getitem__(self, resolution: int) -> DataSplits:
        if resolution not in self.resolutions:
            raise KeyError(resolution)
        if resolution not in self._loaded:
            spec, seed, valid, test, subset = self._args
            self._loaded[resolution] = load_dataset(spec, resolution, seed, valid, test, train_subset=subset)
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
    train_subset: int = 0,
) -> DataSplits:
    """Load `spec` (digits, fashion-mnist, idx:DIR, cifar10:PATH, folder:PATH, npz:PATH) at `resolution`, split by `seed`.

    A dataset that ships an official test set (IDX t10k files, CIFAR-10 test_batch) uses it as the test split;
    validation then comes from its training set. `train_subset` > 0 keeps a stratified subset of that many
    training images (deterministic per seed); validation and test are never subset.
    """
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    if not isinstance(train_subset, int) or isinstance(train_subset, bool) or train_subset < 0:
        raise ValueError(f"train_subset must be a non-negative integer (0: all), got {train_subset!r}")
    kind, _, arg = spec.partition(":")
    fixed_test: tuple[np.ndarray, np.ndarray] | None = None
    if kind == "digits" and not arg:
        x, y = _load_digits()
    elif kind in NAMED_IDX and not arg:
        x, y, fixed_test = _load_idx(NAMED_IDX[kind][0], kind, NAMED_IDX[kind][1])
    elif kind == "idx" and arg:
        x, y, fixed_test = _load_idx(Path(arg), "idx")
    elif kind == "cifar10" and arg:
        x, y, fixed_test = _load_cifar10(Path(arg))
    elif kind == "folder" and arg:
        x, y = _load_folder(Path(arg), resolution)
    elif kind == "npz" and arg:
        x, y = _load_npz(Path(arg))
    else:
        raise ValueError(f"unknown dataset spec {spec!r}; expected digits, {', '.join(NAMED_IDX)}, idx:DIR, "
                         "cifar10:PATH, folder:PATH or npz:PATH")
    y, num_classes = _check_labels(spec, x, y if fixed_test is None else np.concatenate([y, fixed_test[1]]))
    if fixed_test is not None:  # labels were remapped together so train and test share class indices
        y, y_test = y[: len(x)], y[len(x) :]
        fixed_test = (fixed_test[0], y_test)

    train_idx, valid_idx, test_idx = _split_indices(y, seed, valid_fraction, 0.0 if fixed_test else test_fraction)
    if train_subset:
        train_idx = _stratified_subset(y, train_idx, train_subset, seed)
    # Only the images a split keeps are converted and resized (a subset of 60 000 stays cheap).
    x_train = _to_float_resized(x[train_idx], resolution)
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)  # statistics from the train split only
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)

    def prepare(images: np.ndarray) -> torch.Tensor:
        return (_to_float_resized(images, resolution) - mean) / std

    x_test, y_test = (fixed_test[0], fixed_test[1]) if fixed_test is not None else (x[test_idx], y[test_idx])
    return DataSplits(
        train=TensorDataset((x_train - mean) / std, torch.from_numpy(y[train_idx])),
        valid=TensorDataset(prepare(x[valid_idx]), torch.from_numpy(y[valid_idx])),
        test=TensorDataset(prepare(x_test), torch.from_numpy(np.ascontiguousarray(y_test))),
        in_channels=int(x.shape[1]),
        num_classes=num_classes,
        resolution=resolution,
    )


def _stratified_subset(y: np.ndarray, idx: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` of the indices `idx`, drawn stratified by label (deterministic per seed); all of them if n >= len(idx)."""
    from sklearn.model_selection import train_test_split

    if n >= len(idx):
        log.info("train_subset %d >= the %d training samples: using them all", n, len(idx))
        return idx
    classes = np.unique(y[idx])
    if n < len(classes):
        raise ValueError(f"train_subset {n} is smaller than the number of classes ({len(classes)})")
    try:
        keep, _ = train_test_split(idx, train_size=n, random_state=seed * 7919 + 3, stratify=y[idx])
    except ValueError:  # a class too rare to stratify
        keep, _ = train_test_split(idx, train_size=n, random_state=seed * 7919 + 3)
    return np.sort(keep)


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


def _load_idx(root: Path, what: str, package: str | None = None
              ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """An MNIST-format folder (train-/t10k- images and labels, optionally .gz) -> uint8 (N, 1, H, W) and labels.

    The t10k files become the fixed test split; without them the test split is carved out of train (warned).
    """
    how = f"; install them with `apt-get install {package}`" if package else ""
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: {root} is not a directory (expected the four MNIST-format IDX files{how})")
    x, y = _read_idx_pair(root, "train", what, how)
    fixed_test = None
    if _find_idx_file(root, IDX_FILES["test"][0]) or _find_idx_file(root, IDX_FILES["test"][1]):
        fixed_test = _read_idx_pair(root, "test", what, how)
        if fixed_test[0].shape[1:] != x.shape[1:]:
            raise ValueError(f"{what}: test images in {root} are {fixed_test[0].shape[2:]} but train images "
                             f"{x.shape[2:]}")
    else:
        log.warning("%s: %s has no t10k files; the test split is carved out of the training files", what, root)
    return x, y, fixed_test


def _find_idx_file(root: Path, name: str) -> Path | None:
    """The file in `root` called `name` (or `name`.gz), also spelt with dots or underscores for the dashes."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    for path in sorted(root.iterdir()):
        stem = path.name.lower().removesuffix(".gz").replace(".", "-").replace("_", "-")
        if stem == name and path.is_file():
            return path
    return None


def _read_idx_pair(root: Path, split: str, what: str, how: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, 1, H, W) uint8 and labels (N,) int64 of one split, with matching counts."""
    paths = []
    for name in IDX_FILES[split]:
        path = _find_idx_file(root, name)
        if path is None:
            raise FileNotFoundError(f"{what}: no {name}[.gz] in {root}{how}")
        paths.append(path)
    images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
    if len(images) != len(labels):
        raise ValueError(f"{what}: {paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels")
    return images[:, None], labels.astype(np.int64)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """One IDX file of unsigned bytes with `ndim` dimensions; ValueError naming the file if it is not one."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read {path} ({type(err).__name__}: {err})") from None
    magic = (IDX_UBYTE << 8) | ndim
    if len(raw) < 4 or raw[:4] != magic.to_bytes(4, "big"):
        found = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise ValueError(f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s) "
                         f"(magic number {found}, expected {magic:08x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise ValueError(f"{path}: {state}: dimensions {dims} need {expected} bytes, the file has {len(raw)}")
    if ndim == 3 and (dims[1] < 1 or dims[2] < 1):
        raise ValueError(f"{path}: images of size {dims[1]}x{dims[2]}")
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(dims)  # writable copy


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


def _to_float_resized(x: np.ndarray, resolution: int) -> torch.Tensor:
    """(N, C, H, W) floats or uint8 (0..255, scaled to [0, 1]) -> float32 tensor at resolution, in chunks."""
    if x.dtype != np.uint8:
        return _resize(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), resolution)
    out = torch.empty((len(x), x.shape[1], resolution, resolution), dtype=torch.float32)
    for start in range(0, len(x), RESIZE_CHUNK):
        chunk = torch.from_numpy(x[start : start + RESIZE_CHUNK]).float().div_(255.0)
        out[start : start + len(chunk)] = _resize(chunk, resolution)
    return out


def _resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, resolution, resolution) with bilinear interpolation (antialiased when shrinking)."""
    if x.shape[-2:] == (resolution, resolution):
        return x.contiguous()
    shrink = min(x.shape[-2:]) > resolution
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrink)
