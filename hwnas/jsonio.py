"""JSON files as hwnas writes and reads them: atomic writes, strict reads, errors that name the file."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

# Limits of what a hwnas file may hold. Every hwnas file nests a few levels (a checkpoint's archive rows are
# the deepest, at 4); 64 leaves room for hand-written files while no reader can hit Python's recursion limit.
MAX_DEPTH = 64
INT_LIMIT = 2**128  # the largest integers hwnas writes are 128-bit generator states (search checkpoints)
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` through a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; profiles and fronts are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _finite(data: Any) -> Any:
    """`data` with every NaN or infinite float replaced by None (JSON has no such numbers; read_json refuses them)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def dumps(data: Any, indent: int | None = None) -> str:
    """Standard JSON text of `data`; non-finite floats are written as null, so every file hwnas writes reads back."""
    return json.dumps(_finite(data), indent=indent, allow_nan=False)


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON (see `dumps`), atomically."""
    atomic_write_text(path, dumps(data, indent=1) + "\n")


class _BadNumber(ValueError):
    """A number JSON allows but hwnas files never hold (NaN, infinity, out-of-range)."""


def _reject_constant(name: str) -> Any:
    raise _BadNumber(f"{name} is not a number hwnas accepts")


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise _BadNumber(f"number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 41:  # cheap guard before int(): 10**4000-digit strings are slow to convert
        raise _BadNumber(f"integer {text[:20]}... is out of range")
    value = int(text)
    if not -INT_LIMIT <= value < INT_LIMIT:
        raise _BadNumber(f"integer {text} is out of range")
    return value


def nesting_depth(text: str) -> int:
    """Deepest nesting of arrays/objects in JSON `text` (brackets inside strings ignored), without parsing it."""
    depth = deepest = 0
    for m in _STRING_OR_BRACKET.finditer(text):
        ch = m.group()
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(text: str, source: str) -> Any:
    """Strict JSON: no NaN/Infinity, finite floats, integers below 2**128, nesting <= MAX_DEPTH; ValueError names `source`."""
    if not text.strip():
        raise ValueError(f"{source}: file is empty")
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        raise ValueError(f"{source}: JSON nested {depth} levels deep (hwnas files nest at most {MAX_DEPTH})")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except _BadNumber as err:
        raise ValueError(f"{source}: {err}") from None
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{source}: not valid JSON, truncated or corrupt (invalid JSON: {err})") from None


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of a file; FileNotFoundError if absent, ValueError (naming the file) if unreadable."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a {what} file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a {what} file (not UTF-8 text)") from None
    except OSError as err:  # permissions, special files, I/O errors
        raise ValueError(f"{path}: cannot read the {what} file ({err.strerror or err})") from None


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file strictly (see parse_json); FileNotFoundError if absent, ValueError naming the file otherwise."""
    path = Path(path)
    return parse_json(read_text(path, what), f"{path}: {what} file" if what else str(path))


def load_json(path: str | Path, missing: str) -> Any:
    """Like read_json, but a missing file is a ValueError '<path>: <missing>'."""
    path = Path(path)
    try:
        text = read_text(path, "JSON")
    except FileNotFoundError:
        raise ValueError(f"{path}: {missing}") from None
    return parse_json(text, str(path))
