"""Genotype: one DARTS cell architecture (normal + reduce), its JSON form and its integer encoding."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from hwnas.config import DEFAULT_MACRO, MacroConfig
from hwnas.jsonio import atomic_write_json, load_json
from hwnas.space.ops import GENOTYPE_OPS

SCHEMA_VERSION = 1
SPACE_NAME = "darts-cell"
STEPS = 4  # intermediate nodes per cell
PAIRS_PER_CELL = 2 * STEPS
CELL_TYPES = ("normal", "reduce")

Pair = tuple[str, int]
# Elastic depth keeps the first d normal cells of each stage (stage 0: the cells before the first reduction;
# stage s > 0: the normal cells after reduction s). The first cell is never dropped: its input is the stem
# (3C channels), so only it cannot be replaced by passing its input through.
MIN_STAGE_DEPTH = (1, 0, 0)
# Elastic width: each stage runs at one of these fractions of its channels (the supernet's leading channels).
WIDTH_CHOICES = (0.5, 0.75, 1.0)
N_STAGES = 3
MIN_CHANNELS = 2  # FactorizedReduce splits a cell's channels into two halves


def reduction_layers(layers: int) -> tuple[int, int]:
    """Indices of the two reduction cells (DARTS places them at 1/3 and 2/3 depth)."""
    return layers // 3, 2 * layers // 3


def stage_depths(macro: MacroConfig) -> tuple[int, int, int]:
    """Normal cells per stage at full depth."""
    r1, r2 = reduction_layers(macro.layers)
    return r1, r2 - r1 - 1, macro.layers - r2 - 1


def active_cells(macro: MacroConfig, depth: Sequence[int] = ()) -> tuple[bool, ...]:
    """Per cell of `macro`: kept (True) or dropped by `depth` (normal cells kept per stage; () = all)."""
    depth = tuple(depth) or stage_depths(macro)
    reds = reduction_layers(macro.layers)
    out, stage, seen = [], 0, 0
    for i in range(macro.layers):
        if i in reds:
            stage, seen = stage + 1, 0
            out.append(True)
        else:
            out.append(seen < depth[stage])
            seen += 1
    return tuple(out)


def cell_stages(macro: MacroConfig) -> tuple[int, ...]:
    """Stage of each cell: 0 before the first reduction, s for reduction s and the normal cells after it."""
    r1, r2 = reduction_layers(macro.layers)
    return tuple(0 if i < r1 else 1 if i < r2 else 2 for i in range(macro.layers))


def stage_channels(macro: MacroConfig, width: Sequence[float] = ()) -> tuple[int, ...]:
    """Channels per node in each stage at `width` (fractions per stage; () = full: C, 2C, 4C)."""
    full = [macro.C * 2 ** s for s in range(N_STAGES)]
    if not width:
        return tuple(full)
    return tuple(max(MIN_CHANNELS, int(w * c + 0.5)) for w, c in zip(width, full))


def cell_channels(macro: MacroConfig, width: Sequence[float] = ()) -> tuple[int, ...]:
    """Channels per node of every cell at `width` (what Network builds and the supernet slices to)."""
    per_stage = stage_channels(macro, width)
    return tuple(per_stage[s] for s in cell_stages(macro))


def normalize_width(width: Any) -> tuple[float, ...]:
    """Validated width fraction per stage, each one of WIDTH_CHOICES; full width becomes () (arch_id unchanged)."""
    if width is None:
        return ()
    if not isinstance(width, (list, tuple)) or not all(
            isinstance(w, (int, float, np.integer, np.floating)) and not isinstance(w, bool) for w in width):
        raise ValueError(f"width must be a list of numbers (channel fraction per stage), got {width!r}")
    if not width:
        return ()
    if len(width) != N_STAGES:
        raise ValueError(f"width must give {N_STAGES} stages (channel fraction per stage), got {list(width)}")
    out = []
    for stage, w in enumerate(width):
        match = [c for c in WIDTH_CHOICES if abs(float(w) - c) < 1e-9]
        if not match:
            raise ValueError(f"width[{stage}] = {w} is not one of {list(WIDTH_CHOICES)}")
        out.append(match[0])
    return () if all(w == 1.0 for w in out) else tuple(out)


def normalize_depth(depth: Any, macro: MacroConfig) -> tuple[int, ...]:
    """Validated normal cells kept per stage; full depth becomes () so its arch_id stays what it always was."""
    if depth is None:
        return ()
    if not isinstance(depth, (list, tuple)) or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in depth):
        raise ValueError(f"depth must be a list of integers (normal cells kept per stage), got {depth!r}")
    depth = tuple(int(d) for d in depth)
    if not depth:
        return ()
    full = stage_depths(macro)
    if len(depth) != len(full):
        raise ValueError(f"depth must give {len(full)} stages (normal cells kept per stage), got {list(depth)}")
    for stage, (d, lo, hi) in enumerate(zip(depth, MIN_STAGE_DEPTH, full)):
        if not lo <= d <= hi:
            raise ValueError(f"depth[{stage}] = {d} is outside [{lo}, {hi}] for macro.layers = {macro.layers}")
    return () if depth == full else depth


def _check_cell(cell_type: str, cell: Any) -> tuple[Pair, ...]:
    """Validate one cell's list of (op, input) pairs; errors name the bad position."""
    if not isinstance(cell, (list, tuple)):
        raise ValueError(f"{cell_type}: expected a list of {PAIRS_PER_CELL} [op, input] pairs, got {type(cell).__name__}")
    if len(cell) != PAIRS_PER_CELL:
        raise ValueError(f"{cell_type}: expected {PAIRS_PER_CELL} [op, input] pairs (2 per node), got {len(cell)}")
    pairs: list[Pair] = []
    for k, pair in enumerate(cell):
        where = f"{cell_type}[{k}] (node {k // 2})"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{where}: expected [op, input], got {pair!r}")
        op, inp = pair
        if op not in GENOTYPE_OPS:
            raise ValueError(f"{where}: unknown op {op!r}; allowed: {', '.join(GENOTYPE_OPS)}")
        if not isinstance(inp, (int, np.integer)) or isinstance(inp, bool):
            raise ValueError(f"{where}: input must be an integer, got {inp!r}")
        node = k // 2
        if not 0 <= inp < node + 2:
            raise ValueError(f"{where}: input {inp} out of range; node {node} takes inputs 0..{node + 1}")
        pairs.append((str(op), int(inp)))
    for node in range(STEPS):
        a, b = pairs[2 * node], pairs[2 * node + 1]
        if a[1] == b[1]:
            raise ValueError(f"{cell_type} node {node}: both pairs read input {a[1]}; a node needs two distinct inputs")
    return tuple(pairs)


@dataclass(frozen=True)
class Genotype:
    """A cell architecture: 8 (op, input) pairs for the normal and the reduction cell, its macro and depth."""

    normal: tuple[Pair, ...]
    reduce: tuple[Pair, ...]
    macro: MacroConfig = field(default=DEFAULT_MACRO)
    depth: tuple[int, ...] = ()  # normal cells kept per stage (elastic depth); () = every cell of the macro
    width: tuple[float, ...] = ()  # channel fraction per stage (elastic width); () = full width

    def __post_init__(self) -> None:
        object.__setattr__(self, "normal", _check_cell("normal", self.normal))
        object.__setattr__(self, "reduce", _check_cell("reduce", self.reduce))
        if not isinstance(self.macro, MacroConfig):
            raise ValueError(f"macro must be a MacroConfig, got {type(self.macro).__name__}")
        object.__setattr__(self, "depth", normalize_depth(self.depth, self.macro))
        object.__setattr__(self, "width", normalize_width(self.width))

    @property
    def active_cells(self) -> tuple[bool, ...]:
        """Per cell of the macro: whether this genotype keeps it."""
        return active_cells(self.macro, self.depth)

    @property
    def stage_depth(self) -> tuple[int, ...]:
        """Normal cells kept per stage, full depth spelled out."""
        return self.depth or stage_depths(self.macro)

    @property
    def stage_width(self) -> tuple[float, ...]:
        """Channel fraction per stage, full width spelled out."""
        return self.width or (1.0,) * N_STAGES

    @property
    def cell_channels(self) -> tuple[int, ...]:
        """Channels per node of every cell of the macro at this genotype's width."""
        return cell_channels(self.macro, self.width)

    @property
    def shape_key(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(depth, width): what, beside the cells, decides which blocks the network runs (latency tables key)."""
        return self.depth, self.width

    @property
    def arch_id(self) -> str:
        """Stable 16-hex-digit id; the two pairs of a node are unordered, so they are sorted first."""
        canon = {t: [sorted(getattr(self, t)[2 * n : 2 * n + 2]) for n in range(STEPS)] for t in CELL_TYPES}
        canon["macro"] = self.macro.to_dict()  # type: ignore[assignment]
        if self.depth:  # only when cells are dropped, so full-depth ids stay what they always were
            canon["depth"] = list(self.depth)  # type: ignore[assignment]
        if self.width:  # likewise: full-width ids stay what they always were
            canon["width"] = list(self.width)  # type: ignore[assignment]
        blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The architecture JSON object of DESIGN.md."""
        out = {
            "schema_version": SCHEMA_VERSION,
            "space": SPACE_NAME,
            "normal": [[op, inp] for op, inp in self.normal],
            "reduce": [[op, inp] for op, inp in self.reduce],
            "macro": self.macro.to_dict(),
        }
        if self.depth:
            out["depth"] = list(self.depth)
        if self.width:
            out["width"] = list(self.width)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Genotype":
        """Parse and validate an architecture object; errors name the bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"architecture must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"schema_version: expected {SCHEMA_VERSION}, got {version!r}")
        space = data.get("space", SPACE_NAME)
        if space != SPACE_NAME:
            raise ValueError(f"space: expected {SPACE_NAME!r}, got {space!r}")
        for key in CELL_TYPES:
            if key not in data:
                raise ValueError(f"missing field {key!r}")
        macro = MacroConfig.from_dict(data["macro"]) if "macro" in data else DEFAULT_MACRO
        return cls(normal=data["normal"], reduce=data["reduce"], macro=macro, depth=data.get("depth", ()),
                   width=data.get("width", ()))

    def save(self, path: str | Path) -> None:
        """Write the architecture JSON file atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Genotype":
        """Read an architecture JSON file; errors name the file."""
        path = Path(path)
        data = load_json(path, "no such architecture file")
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


class SearchSpace:
    """Integer encoding of genotypes for search: per node (op_a, in_a, op_b, in_b), normal cell first.

    The elastic macro adds variables after the cells: with more than one input resolution, the index into
    `resolutions` (ascending); with `depth`, the normal cells kept in each stage that has a choice; with
    `width`, the index into WIDTH_CHOICES of each stage's channel fraction.
    """

    name = SPACE_NAME
    cell_vars = 2 * STEPS * 4

    def __init__(self, macro: MacroConfig = DEFAULT_MACRO, resolutions: Sequence[int] | None = None,
                 depth: bool = False, width: bool = False) -> None:
        self.macro = macro
        self.resolutions = tuple(sorted(set(int(r) for r in resolutions))) if resolutions else (macro.resolution,)
        if any(r < 1 for r in self.resolutions):
            raise ValueError(f"resolutions must be positive, got {self.resolutions}")
        full = stage_depths(macro)
        # Stages whose depth the search chooses; the others stay at full depth.
        self.depth_stages = tuple(s for s in range(len(full)) if full[s] > MIN_STAGE_DEPTH[s]) if depth else ()
        self.width_stages = tuple(range(N_STAGES)) if width else ()

    @property
    def elastic(self) -> bool:
        """True when the search chooses the input resolution too."""
        return len(self.resolutions) > 1

    @property
    def elastic_depth(self) -> bool:
        """True when the search chooses how many normal cells each stage keeps."""
        return bool(self.depth_stages)

    @property
    def elastic_width(self) -> bool:
        """True when the search chooses each stage's channel fraction."""
        return bool(self.width_stages)

    @property
    def _width_start(self) -> int:
        return self.cell_vars + int(self.elastic) + len(self.depth_stages)

    @property
    def n_var(self) -> int:
        """Length of an encoding."""
        return self._width_start + len(self.width_stages)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive lower and upper bounds of every variable."""
        xl = np.zeros(self.n_var, dtype=int)
        xu = np.zeros(self.n_var, dtype=int)
        for cell in range(2):
            for node in range(STEPS):
                base = cell * 4 * STEPS + 4 * node
                xu[base : base + 4] = [len(GENOTYPE_OPS) - 1, node + 1, len(GENOTYPE_OPS) - 1, node + 1]
        if self.elastic:
            xu[self.cell_vars] = len(self.resolutions) - 1
        full, first = stage_depths(self.macro), self.cell_vars + int(self.elastic)
        for k, stage in enumerate(self.depth_stages):
            xl[first + k], xu[first + k] = MIN_STAGE_DEPTH[stage], full[stage]
        xu[self._width_start:] = len(WIDTH_CHOICES) - 1
        return xl, xu

    def encode(self, genotype: Genotype) -> np.ndarray:
        """Genotype -> integer vector of length n_var; ValueError if its resolution or depth is not in the space."""
        x = []
        for cell in (genotype.normal, genotype.reduce):
            for op, inp in cell:
                x += [GENOTYPE_OPS.index(op), inp]
        res = genotype.macro.resolution
        if res not in self.resolutions:
            raise ValueError(f"genotype resolution {res} is not searched here; resolutions: {list(self.resolutions)}")
        if self.elastic:
            x.append(self.resolutions.index(res))
        depth, full = genotype.stage_depth, stage_depths(self.macro)
        fixed = [s for s in range(len(full)) if s not in self.depth_stages and depth[s] != full[s]]
        if fixed:
            raise ValueError(f"genotype depth {list(depth)} drops cells of stage {fixed[0]}, which this space keeps at full depth")
        x += [depth[s] for s in self.depth_stages]
        if genotype.width and not self.elastic_width:
            raise ValueError(f"genotype width {list(genotype.width)} is not full, and this space keeps every stage at full width")
        x += [WIDTH_CHOICES.index(genotype.stage_width[s]) for s in self.width_stages]
        return np.asarray(x, dtype=int)

    def decode(self, x: Sequence[int] | np.ndarray) -> Genotype:
        """Integer vector -> Genotype; raises ValueError naming the bad position."""
        x = np.asarray(x)
        if x.shape != (self.n_var,):
            raise ValueError(f"encoding must have shape ({self.n_var},), got {x.shape}")
        if not np.all(np.equal(np.mod(x, 1), 0)):
            raise ValueError("encoding must hold integers")
        xl, xu = self.bounds()
        bad = np.flatnonzero((x < xl) | (x > xu))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"encoding position {i} = {x[i]} is outside [{xl[i]}, {xu[i]}]")
        cells = []
        for cell in range(2):
            part = x[cell * 4 * STEPS : (cell + 1) * 4 * STEPS].astype(int)
            cells.append([(GENOTYPE_OPS[part[2 * k]], int(part[2 * k + 1])) for k in range(PAIRS_PER_CELL)])
        res = self.resolutions[int(x[self.cell_vars])] if self.elastic else self.resolutions[0]
        depth = list(stage_depths(self.macro))
        for k, stage in enumerate(self.depth_stages):
            depth[stage] = int(x[self.cell_vars + int(self.elastic) + k])
        width = [1.0] * N_STAGES
        for k, stage in enumerate(self.width_stages):
            width[stage] = WIDTH_CHOICES[int(x[self._width_start + k])]
        return Genotype(normal=tuple(cells[0]), reduce=tuple(cells[1]), macro=self.macro.at_resolution(res),
                        depth=tuple(depth), width=tuple(width))

    def repair(self, x: np.ndarray) -> np.ndarray:
        """Clip into bounds and give each node two distinct inputs (the second moves to the next free one)."""
        xl, xu = self.bounds()
        x = np.clip(np.rint(np.asarray(x)), xl, xu).astype(int)
        for cell in range(2):
            for node in range(STEPS):
                base = cell * 4 * STEPS + 4 * node
                if x[base + 1] == x[base + 3]:
                    x[base + 3] = (x[base + 3] + 1) % (node + 2)
        return x

    def sample(self, rng: np.random.Generator) -> Genotype:
        """A uniformly random valid genotype (and resolution, depth and width, when elastic)."""
        x = []
        for _ in range(2):
            for node in range(STEPS):
                a, b = rng.choice(node + 2, size=2, replace=False)
                x += [int(rng.integers(len(GENOTYPE_OPS))), int(a), int(rng.integers(len(GENOTYPE_OPS))), int(b)]
        # The elastic variables are drawn last, so a fixed space samples the cells it always did.
        if self.elastic:
            x.append(int(rng.integers(len(self.resolutions))))
        xl, xu = self.bounds()
        for i in range(len(x), self.n_var):
            x.append(int(rng.integers(xl[i], xu[i] + 1)))
        return self.decode(x)

    def sample_distinct(self, rng: np.random.Generator, n: int, exclude: Iterable[str] = ()) -> list[Genotype]:
        """n uniform draws with distinct arch_ids, none of them in `exclude` (ValueError if the space runs out)."""
        seen, out = set(exclude), []
        for _ in range(1000 * (n + 1)):  # the space is vast; only a degenerate one runs dry
            if len(out) >= n:
                break
            g = self.sample(rng)
            if g.arch_id not in seen:
                seen.add(g.arch_id)
                out.append(g)
        if len(out) < n:
            raise ValueError(f"found only {len(out)} of {n} distinct architectures in this space")
        return out
