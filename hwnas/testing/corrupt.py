"""Valid hwnas files of every kind, and the ways to damage them: the list tests/test_bad_input.py and
benchmarks/faults.py both run (each case: a loader call, the `hwnas` argv that reads the file, what the
error must name)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hwnas.config import MacroConfig, ProfileConfig, SearchConfig, SupernetConfig

TINY_MACRO = MacroConfig(C=4, layers=3, in_channels=1, resolution=8, classes=3)
# The synthetic profile is no machine's: its sentinel check would refuse it before the file under test is read.
SEARCH_FLAGS = ["--pop", "4", "--gens", "1", "--trust-profile"]


@dataclass(frozen=True)
class World:
    """Valid files of every kind, made once: a tiny dataset, supernet, profile, architecture and search run."""

    root: Path
    data: Path  # npz
    supernet: Path  # folder
    profile: Path
    arch: Path
    search: Path  # folder with front.json and checkpoint.json
    report: Path
    macro: Path
    sidecar: Path


@dataclass(frozen=True)
class Case:
    """One damaged input: how the library loads it, the CLI argv that reads it, what an error must name."""

    load: Callable[[], Any]
    argv: list[str] | None
    names: str
    must_fail: bool


def tiny_npz(path: Path, n: int = 60) -> Path:
    """n 8x8 grey images in 3 classes told apart by brightness."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    x = (y[:, None, None] + 0.3 * rng.standard_normal((n, 8, 8))).astype(np.float32)
    np.savez(path, x=x, y=y)
    return path


def synthetic_profile(macro: MacroConfig, path: Path) -> Path:
    """A profile assembled from made-up timing records (no timing) for `macro`, saved at `path`."""
    from hwnas.profiling import profiler
    from hwnas.profiling.fingerprint import device_fingerprint

    # Full width only, like the world's supernet: a fit to random timings over every width can go negative.
    cfg = ProfileConfig(device="synthetic", macro=macro, n_calibration=10, n_validation=5, rounds=2, elastic_width=False)
    plan = profiler.make_plan(cfg)
    rng = np.random.default_rng(0)
    records = [(key, r, float(rng.uniform(0.01, 0.05)), 1.0) for r in range(2) for key, _ in plan.jobs()]
    profiler.profile_from_records(plan, records, device_fingerprint()).save(path)
    return path


def supernet_config(data: Path) -> SupernetConfig:
    """The tiny supernet of the world (one single-path epoch)."""
    return SupernetConfig(data=f"npz:{data}", macro=TINY_MACRO, epochs=0, sample_epochs=1, batch_size=32)


def build_world(root: Path) -> World:
    """Every valid file, in `root` (a few seconds)."""
    from hwnas.search.session import build_problem, run_search
    from hwnas.space import SearchSpace
    from hwnas.train import train_supernet

    root.mkdir(parents=True, exist_ok=True)
    data = tiny_npz(root / "tiny.npz")
    sn = train_supernet(supernet_config(data), root / "supernet")
    profile = synthetic_profile(TINY_MACRO, root / "profile.json")
    arch = root / "arch.json"
    SearchSpace(TINY_MACRO).sample(np.random.default_rng(0)).save(arch)
    cfg = SearchConfig(pop=4, gens=1)
    run_search(build_problem(sn, [profile], cfg), cfg, root / "search",
               provenance={"supernet": str(sn.resolve()), "profile": str(profile.resolve())})
    report = root / "export_report.json"
    report.write_text(json.dumps({"schema_version": 1, "summary": {"n": 0, "n_passed": 0}, "members": []}))
    macro = root / "macro.json"
    macro.write_text(json.dumps(TINY_MACRO.to_dict()))
    sidecar = root / "p.json.partial.json"
    sidecar.write_text(json.dumps({"schema_version": 2, "config": sidecar_key(), "elapsed_s": 1.0,
                                   "records": [["overhead", 0, 0.1, 0.2]]}))
    return World(root, data, sn, profile, arch, root / "search", report, macro, sidecar)


def sidecar_key() -> dict[str, Any]:
    """The measurement key of the world's partial profile."""
    return ProfileConfig(macro=TINY_MACRO, quick=True).resolved().measurement_key()


# -- JSON kinds ------------------------------------------------------------------------------------------------
def _fake_problem():
    from hwnas.search.problem import HWNASProblem
    from hwnas.space import SearchSpace

    def error(gs):
        return np.array([int(g.arch_id[:4], 16) / 0xFFFF for g in gs])

    def latency(gs):
        return np.array([1.0 + sum(op == "sep_conv_5x5" for op, _ in g.normal) for g in gs])

    return HWNASProblem(SearchSpace(TINY_MACRO), error, latency)


def _load(kind: str, path: Path) -> Callable[[], Any]:
    """The library call that reads a file of `kind` at `path`."""
    if kind == "arch":
        from hwnas.space import Genotype
        return lambda: Genotype.load(path)
    if kind == "profile":
        from hwnas.profiling.device_profile import DeviceProfile
        return lambda: DeviceProfile.load(path)
    if kind == "front":
        from hwnas.search.front import ParetoFront
        return lambda: ParetoFront.load(path)
    if kind == "search_checkpoint":
        from hwnas.search import search
        return lambda: search(_fake_problem(), SearchConfig(pop=4, gens=1), resume=path)
    if kind == "supernet_meta":
        from hwnas.train import load_supernet
        return lambda: load_supernet(path.parent)
    if kind == "export_report":
        from hwnas.export import load_report
        return lambda: load_report(path)
    if kind == "macro":
        return lambda: MacroConfig.load(path)
    if kind == "profile_sidecar":
        from hwnas.profiling.profiler import _Sidecar
        return lambda: _Sidecar(path, sidecar_key(), resume=True)
    raise KeyError(kind)


def _argv(kind: str, path: Path, world: World, tmp: Path) -> list[str] | None:
    """An `hwnas` command that reads the file first (None: no command reads it, or only before slow work)."""
    if kind == "arch":
        return ["predict", str(path), "--profile", str(world.profile)]
    if kind == "profile":
        return ["predict", str(world.arch), "--profile", str(path)]
    if kind == "front":  # the missing profile stops a front that still parses before any export work
        return ["export", str(path.parent), "--out", str(tmp / "export"), "--profile", str(tmp / "no-profile.json")]
    if kind == "search_checkpoint":
        return ["search", "--supernet", str(world.supernet), "--profile", str(world.profile), "--out",
                str(path.parent), "--resume", *SEARCH_FLAGS]
    if kind == "supernet_meta":
        return ["search", "--supernet", str(path.parent), "--profile", str(world.profile), "--out",
                str(tmp / "search-out"), *SEARCH_FLAGS]
    if kind == "macro":
        return ["profile", "--macro", str(path), "--out", str(tmp / "p.json"), "--quick"]
    return None


# Where each kind's file lives in its folder (kinds read from a folder keep their folder's other files).
JSON_KINDS = {"arch": "arch", "profile": "profile", "front": "search/front.json",
              "search_checkpoint": "search/checkpoint.json", "supernet_meta": "supernet/supernet.json",
              "export_report": "report", "macro": "macro", "profile_sidecar": "sidecar"}
KIND_CLI = {k: k not in ("export_report", "profile_sidecar") for k in JSON_KINDS}
# The corruptions the unit tests also drive through the CLI (benchmarks/faults.py drives all of them).
CLI_SAMPLE = ("empty", "truncated", "list", "schema_version", "foreign", "numbers_as_strings", "nan", "huge_int",
              "deep_list", "long_strings", "directory")
FOREIGN = {"arch": "profile", "profile": "arch", "front": "search/checkpoint.json", "search_checkpoint": "search/front.json",
           "supernet_meta": "arch", "export_report": "search/front.json", "macro": "arch", "profile_sidecar": "profile"}
# Commands that would start minutes of work on a file that still parses: only run them on refused files.
SLOW_WHEN_VALID = ("macro",)


def _world_file(world: World, where: str) -> Path:
    head, _, rest = where.partition("/")
    base = getattr(world, head)
    return base / rest if rest else base


def _walk(data: Any, leaf: Callable[[Any], Any]) -> Any:
    if isinstance(data, dict):
        return {k: _walk(v, leaf) for k, v in data.items()}
    if isinstance(data, list):
        return [_walk(v, leaf) for v in data]
    return leaf(data)


def _numbers(to: Any) -> Callable[[Any], Any]:
    return lambda v: to if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _top(data: Any, change: Callable[[dict], dict]) -> Any:
    return change(dict(data)) if isinstance(data, dict) else None


def _long_strings(n: int = 20, length: int = 200_000) -> Callable[[Any], Any]:
    """Make the first n strings `length` characters long (all of them would make a profile gigabytes)."""
    left = [n]

    def leaf(v: Any) -> Any:
        if isinstance(v, str) and left[0] > 0:
            left[0] -= 1
            return (v or "x") * (length // max(len(v), 1))
        return v

    return leaf


DIRECTORY = object()
# name -> (make the damaged content from (text, data, foreign text); must every reader refuse it?)
JSON_CORRUPTIONS: dict[str, tuple[Callable[[str, Any, str], Any], bool]] = {
    "empty": (lambda t, d, f: "", True),
    "truncated": (lambda t, d, f: t[: len(t) // 2], True),
    "binary": (lambda t, d, f: b"\x00\xff\xfe\x80 garbage", True),
    "list": (lambda t, d, f: "[1, 2, 3]", True),
    "string": (lambda t, d, f: '"an architecture"', True),
    "null": (lambda t, d, f: "null", True),
    "schema_version": (lambda t, d, f: _top(d, lambda x: {**x, "schema_version": 99}) if "schema_version" in d else None, True),
    "foreign": (lambda t, d, f: f, True),
    "numbers_as_strings": (lambda t, d, f: _walk(d, lambda v: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v), False),
    "objects_as_lists": (lambda t, d, f: _top(d, lambda x: {k: (list(v) if isinstance(v, dict) else {} if isinstance(v, list) else v)
                                                            for k, v in x.items()}), False),
    "half_the_keys": (lambda t, d, f: _top(d, lambda x: {k: v for i, (k, v) in enumerate(x.items()) if i % 2}), False),
    "nan": (lambda t, d, f: json.dumps(_walk(d, _numbers(float("nan")))), True),
    "infinity": (lambda t, d, f: json.dumps(_walk(d, _numbers(float("inf")))), True),
    "huge_float": (lambda t, d, f: _walk(d, _numbers(1e308)), False),
    "huge_int": (lambda t, d, f: _walk(d, _numbers(10**100)), True),
    "negative": (lambda t, d, f: _walk(d, lambda v: -v if isinstance(v, (int, float)) and not isinstance(v, bool) else v), False),
    "deep_list": (lambda t, d, f: "[" * 10000 + "]" * 10000, True),
    "deep_object": (lambda t, d, f: '{"a":' * 10000 + "1" + "}" * 10000, True),
    "long_strings": (lambda t, d, f: _walk(d, _long_strings()), False),
    "directory": (lambda t, d, f: DIRECTORY, True),
}


def json_case(world: World, kind: str, corruption: str, tmp: Path) -> Case | None:
    """Write `kind` damaged by `corruption` under `tmp` (its folder copied when it lives in one); None if n/a."""
    src = _world_file(world, JSON_KINDS[kind])
    text = src.read_text()
    make, must_fail = JSON_CORRUPTIONS[corruption]
    content = make(text, json.loads(text), _world_file(world, FOREIGN[kind]).read_text())
    if content is None:
        return None
    if "/" in JSON_KINDS[kind]:  # copy the whole folder: the readers look at its other files too
        folder = tmp / src.parent.name
        shutil.copytree(src.parent, folder)
        path = folder / src.name
    else:
        path = tmp / src.name
    _write(path, content)
    argv = _argv(kind, path, world, tmp)
    if argv is not None and kind in SLOW_WHEN_VALID and not must_fail:
        argv = None
    return Case(_load(kind, path), argv, str(path), must_fail)


def _write(path: Path, content: Any) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    if content is DIRECTORY:
        path.mkdir()
        (path / "inside.json").write_text("{}")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))


# -- the supernet checkpoint (a torch file) --------------------------------------------------------------------
class _Code:
    """Unpickles to a call of os.getcwd: what torch.load(weights_only=True) and our unpickler must refuse."""

    def __reduce__(self):
        return (os.getcwd, ())


def _torch_bytes(obj: Any) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _shrunk_model(real: bytes) -> bytes:
    import io

    import torch

    state = torch.load(io.BytesIO(real), weights_only=True)
    state["model"] = {k: torch.zeros(1) for k in state["model"]}
    return _torch_bytes(state)


CHECKPOINT_CORRUPTIONS: dict[str, Callable[[bytes, str], Any]] = {
    "empty": lambda b, arch: b"",
    "truncated": lambda b, arch: b[: len(b) // 2],
    "garbage": lambda b, arch: b"\x80\x04 not a torch file",
    "json_file": lambda b, arch: arch,
    "list": lambda b, arch: _torch_bytes([1, 2, 3]),
    "model_not_a_dict": lambda b, arch: _torch_bytes({"model": [1, 2]}),
    "no_weights": lambda b, arch: _torch_bytes({"model": {}}),
    "wrong_shapes": lambda b, arch: _shrunk_model(b),
    "code_pickle": lambda b, arch: pickle.dumps({"model": _Code()}),
    "directory": lambda b, arch: DIRECTORY,
}


def checkpoint_case(world: World, corruption: str, tmp: Path) -> Case:
    """The world's supernet folder with supernet.pt damaged."""
    from hwnas.train import load_supernet

    folder = tmp / "supernet"
    shutil.copytree(world.supernet, folder)
    path = folder / "supernet.pt"
    _write(path, CHECKPOINT_CORRUPTIONS[corruption](path.read_bytes(), world.arch.read_text()))
    argv = ["search", "--supernet", str(folder), "--profile", str(world.profile), "--out", str(tmp / "s"), *SEARCH_FLAGS]
    return Case(lambda: load_supernet(folder), argv, str(path), True)


# -- datasets --------------------------------------------------------------------------------------------------
def train_argv(spec: str, out: Path) -> list[str]:
    """`hwnas train-supernet` on `spec` with the tiny macro, one epoch."""
    return ["train-supernet", "--data", spec, "--out", str(out), "--epochs", "0", "--sample-epochs", "1",
            "--C", "4", "--layers", "3", "--resolution", "8", "--batch-size", "32"]


def _npz(tmp: Path, **arrays: Any) -> tuple[str, str]:
    path = tmp / "d.npz"
    np.savez(path, **arrays)
    return f"npz:{path}", str(path)


def _npz_bytes(tmp: Path, cut: Callable[[bytes], bytes]) -> tuple[str, str]:
    path = tiny_npz(tmp / "d.npz")
    path.write_bytes(cut(path.read_bytes()))
    return f"npz:{path}", str(path)


def _npz_huge_header(tmp: Path) -> tuple[str, str]:
    """An .npy inside the .npz whose header claims 10**12 floats the file does not hold."""
    import zipfile

    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1, 1000, 1000), }"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\x00" * 64
    path = tmp / "d.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", npy)
        buf = tmp / "y.npy"
        np.save(buf, np.arange(3))
        z.write(buf, "y.npy")
    return f"npz:{path}", str(path)


def _folder(tmp: Path, layout: dict[str, dict[str, bytes]]) -> tuple[str, str]:
    root = tmp / "images"
    root.mkdir()
    for cls, files in layout.items():
        (root / cls).mkdir()
        for name, content in files.items():
            (root / cls / name).write_bytes(content)
    return f"folder:{root}", str(root)


def _png(value: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4, 4), value).save(buf, format="PNG")
    return buf.getvalue()


def _cifar(tmp: Path, batch: bytes | None, test: bytes | None = None) -> tuple[str, str]:
    root = tmp / "cifar-10-batches-py"
    root.mkdir()
    if batch is not None:
        (root / "data_batch_1").write_bytes(batch)
    if test is not None:
        (root / "test_batch").write_bytes(test)
    return f"cifar10:{root}", str(root)


def _cifar_batch(n: int = 6, width: int = 3072, labels: int | None = None) -> bytes:
    data = np.random.default_rng(0).integers(0, 255, size=(n, width), dtype=np.uint8)
    return pickle.dumps({b"data": data, b"labels": [i % 2 for i in range(n if labels is None else labels)]})


DATASET_CORRUPTIONS: dict[str, Callable[[Path], tuple[str, str]]] = {
    "npz_missing": lambda t: (f"npz:{t / 'none.npz'}", str(t / "none.npz")),
    "npz_empty_file": lambda t: _npz_bytes(t, lambda b: b""),
    "npz_truncated": lambda t: _npz_bytes(t, lambda b: b[: len(b) // 2]),
    "npz_garbage": lambda t: _npz_bytes(t, lambda b: b"\x00garbage" * 10),
    "npz_no_labels": lambda t: _npz(t, x=np.zeros((6, 8, 8))),
    "npz_string_images": lambda t: _npz(t, x=np.array([["a"] * 8] * 6), y=np.arange(6) % 2),
    "npz_object_images": lambda t: _npz(t, x=np.array([None] * 6, dtype=object), y=np.arange(6) % 2),
    "npz_nan": lambda t: _npz(t, x=np.full((6, 8, 8), np.nan), y=np.arange(6) % 2),
    "npz_fractional_labels": lambda t: _npz(t, x=np.zeros((6, 8, 8)), y=np.arange(6) / 2),
    "npz_label_count": lambda t: _npz(t, x=np.zeros((6, 8, 8)), y=np.arange(5) % 2),
    "npz_5d": lambda t: _npz(t, x=np.zeros((6, 1, 1, 8, 8)), y=np.arange(6) % 2),
    "npz_no_samples": lambda t: _npz(t, x=np.zeros((0, 8, 8)), y=np.zeros(0, dtype=int)),
    "npz_one_class": lambda t: _npz(t, x=np.zeros((6, 8, 8)), y=np.zeros(6, dtype=int)),
    "npz_huge_header": _npz_huge_header,
    "npz_directory": lambda t: ((t / "d.npz").mkdir(), (f"npz:{t / 'd.npz'}", str(t / "d.npz")))[1],
    "folder_missing": lambda t: (f"folder:{t / 'none'}", str(t / "none")),
    "folder_no_classes": lambda t: _folder(t, {}),
    "folder_class_without_images": lambda t: _folder(t, {"a": {"x.png": _png(0)}, "b": {"notes.txt": b"hi"}}),
    "folder_corrupt_image": lambda t: _folder(t, {"a": {"x.png": _png(0)}, "b": {"y.png": b"\x89PNG broken"}}),
    "folder_one_class": lambda t: _folder(t, {"a": {f"{i}.png": _png(i) for i in range(4)}}),
    "folder_is_a_file": lambda t: ((t / "f").write_text("x"), (f"folder:{t / 'f'}", str(t / "f")))[1],
    "cifar_missing": lambda t: (f"cifar10:{t / 'none'}", str(t / "none")),
    "cifar_no_batches": lambda t: _cifar(t, None),
    "cifar_corrupt_batch": lambda t: _cifar(t, b"\x80\x04garbage"),
    "cifar_truncated_batch": lambda t: _cifar(t, _cifar_batch()[:100]),
    "cifar_list_batch": lambda t: _cifar(t, pickle.dumps([1, 2, 3])),
    "cifar_wrong_shape": lambda t: _cifar(t, _cifar_batch(width=100)),
    "cifar_label_count": lambda t: _cifar(t, _cifar_batch(labels=4)),
    "cifar_code_pickle": lambda t: _cifar(t, pickle.dumps({b"data": _Code(), b"labels": [0]})),
    "cifar_corrupt_test_batch": lambda t: _cifar(t, _cifar_batch(), b"\x80\x04garbage"),
}
