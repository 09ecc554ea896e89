"""The building blocks of a macro at every shape they take: what the per-block profile times."""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import product
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from hwnas.config import MacroConfig
from hwnas.profiling.device_profile import block_widths
from hwnas.space.genotype import (N_STAGES, PAIRS_PER_CELL, STEPS, WIDTH_CHOICES, Genotype, active_cells, cell_channels,
                                  normalize_width, reduction_layers)
from hwnas.space.network import STEM_MULTIPLIER, Network
from hwnas.space.ops import GENOTYPE_OPS, create_op

N_PAIRS = 2 * PAIRS_PER_CELL  # normal cell pairs, then reduce cell pairs (SearchSpace.encode order)
N_OPS = len(GENOTYPE_OPS)
N_INPUTS = STEPS + 1  # node k reads inputs 0..k+1, so inputs take values 0..STEPS
# What, beside its cells, decides the blocks a network runs: Genotype.shape_key, (depth, width); () = full.
ShapeKey = tuple[tuple[int, ...], tuple[float, ...]]
FULL_SHAPE: ShapeKey = ((), ())


def all_widths(elastic_width: bool = True) -> list[tuple[float, ...]]:
    """The stage widths a profile covers: full width `()` only, or every combination of WIDTH_CHOICES (full first)."""
    if not elastic_width:
        return [()]
    return list(dict.fromkeys(normalize_width(w) for w in [(), *product(WIDTH_CHOICES, repeat=N_STAGES)]))


@dataclass(frozen=True)
class BlockSpec:
    """One candidate op at one shape: `op` on a (1, C, H, H) input with `stride`."""

    op: str
    C: int
    H: int
    stride: int

    @property
    def key(self) -> str:
        """Stable name used in the profile file."""
        return f"{self.op}/C{self.C}/H{self.H}/s{self.stride}"

    def module(self) -> nn.Module:
        """The op as the discrete network builds it."""
        return create_op(self.op, self.C, self.stride, affine=True)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """Input shape, batch first."""
        return (1, self.C, self.H, self.H)


@dataclass(frozen=True)
class CellShape:
    """Channels and resolutions of one cell of the macro."""

    index: int
    reduction: bool
    C: int
    H_in: int  # resolution of both preprocessed inputs
    H_out: int  # resolution of the intermediate nodes


def cell_shapes(macro: MacroConfig, width: Sequence[float] = ()) -> list[CellShape]:
    """Per cell: reduction flag, channel count at `width` (() = full) and resolutions (mirrors `Network`)."""
    shapes, h = [], macro.resolution
    for i, c in enumerate(cell_channels(macro, width)):
        red = i in reduction_layers(macro.layers)
        h_out = (h + 1) // 2 if red else h  # stride-2 ops and FactorizedReduce give ceil(H/2)
        shapes.append(CellShape(i, red, c, h, h_out))
        h = h_out
    return shapes


def pair_block(cell: CellShape, op: str, inp: int) -> BlockSpec:
    """The block an edge with `op` reading state `inp` runs in `cell`."""
    stride = 2 if cell.reduction and inp < 2 else 1
    h = cell.H_in if inp < 2 else cell.H_out
    return BlockSpec(op, cell.C, h, stride)


def op_blocks(macro: MacroConfig, elastic_width: bool = False) -> list[BlockSpec]:
    """Every distinct (op, shape) any genotype at `macro` can run (at every width if asked), in a stable order.

    Full-width blocks come first and keep their keys: another width only adds channel counts (more keys).
    """
    seen: dict[str, BlockSpec] = {}
    for width in all_widths(elastic_width):
        for cell in cell_shapes(macro, width):
            for inp in range(N_INPUTS):
                for op in GENOTYPE_OPS:
                    spec = pair_block(cell, op, inp)
                    seen.setdefault(spec.key, spec)
    return list(seen.values())


def pair_tables(macro: MacroConfig, block_ms: dict[str, float], active: Sequence[bool] | None = None,
                width: Sequence[float] = ()) -> np.ndarray:
    """(N_PAIRS, N_OPS, N_INPUTS) summed block latency of pair p with op o reading input i, over its kept cells.

    `active` flags the cells a genotype keeps (Genotype.active_cells; None: all). Dropping a normal cell
    changes no other cell's shapes, so the kept cells' blocks are the ones the full macro measured. `width`
    (() = full) picks each cell's channel count, so the blocks of that width.
    """
    table = np.zeros((N_PAIRS, N_OPS, N_INPUTS))
    for cell in cell_shapes(macro, width):
        if active is not None and not active[cell.index]:
            continue
        base = PAIRS_PER_CELL if cell.reduction else 0
        for k in range(PAIRS_PER_CELL):
            for inp in range(k // 2 + 2):  # valid inputs of node k // 2
                for o, op in enumerate(GENOTYPE_OPS):
                    table[base + k, o, inp] += block_ms[pair_block(cell, op, inp).key]
    return table


def pair_counts(macro: MacroConfig, active: Sequence[bool] | None = None) -> np.ndarray:
    """(N_PAIRS,) how many kept cells run pair p: the op instances one genotype pair stands for."""
    counts = np.zeros(N_PAIRS)
    for cell in cell_shapes(macro):
        if active is None or active[cell.index]:
            base = PAIRS_PER_CELL if cell.reduction else 0
            counts[base:base + PAIRS_PER_CELL] += 1
    return counts


class ShapeTable(NamedTuple):
    """What a profile's block measurements give for the networks of one (depth, width)."""

    table: np.ndarray  # (N_PAIRS, N_OPS, N_INPUTS) summed block ms over the kept cells at their width
    fixed_ms: float  # stem, kept cells' preprocessing, head (at the width), run overhead
    counts: np.ndarray  # (N_PAIRS,) kept cells running each pair (pair_counts)


ShapeTables = dict[ShapeKey, ShapeTable]
DepthTable = ShapeTable  # the name of full-width-only hwnas


def check_width(blocks: dict[str, Any], width: Sequence[float]) -> None:
    """ValueError unless the blocks section holds the blocks of `width` (a profile measured without elastic width has
    only full width's)."""
    have = block_widths(blocks)
    missing = sorted({float(w) for w in width} - set(have))
    if missing:
        raise ValueError(f"its blocks cover stage widths {list(have)} only, not width {list(width)} (no blocks at "
                         f"{missing}); re-profile with elastic width (`hwnas profile`, ProfileConfig.elastic_width)")


def fixed_ms_of(blocks: dict[str, Any], name: str) -> float:
    """Measured ms of fixed part `name`: full-width parts in fixed_ms, parts of other channel counts in width_fixed_ms."""
    return float(blocks["width_fixed_ms" if "/" in name else "fixed_ms"][name])


def shape_table(macro: MacroConfig, blocks: dict[str, Any], depth: Sequence[int] = (),
                width: Sequence[float] = ()) -> ShapeTable:
    """Block table, fixed latency and pair counts of the networks of `depth` and `width` (() = full) from a blocks section."""
    check_width(blocks, width)
    active = active_cells(macro, depth)
    names = fixed_names(macro, width)
    fixed = sum(fixed_ms_of(blocks, names[part]) for part in names if fixed_block_kept(part, active))
    return ShapeTable(pair_tables(macro, blocks["ops_ms"], active, width), float(fixed + blocks["overhead_ms"]),
                      pair_counts(macro, active))


def shape_tables(macro: MacroConfig, blocks: dict[str, Any], shapes: Sequence[ShapeKey]) -> ShapeTables:
    """shape_table per (depth, width) among `shapes` (Genotype.shape_key), full depth and width always included."""
    out: ShapeTables = {}
    for depth, width in [FULL_SHAPE, *shapes]:
        key = (tuple(depth), tuple(width))
        if key not in out:
            out[key] = shape_table(macro, blocks, *key)
    return out


def depth_tables(macro: MacroConfig, blocks: dict[str, Any], depths: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], ShapeTable]:
    """shape_tables at full width, keyed by depth alone (full depth `()` always included)."""
    return {d: t for (d, _), t in shape_tables(macro, blocks, [(tuple(d), ()) for d in depths]).items()}


def shape_groups(keys: Sequence[Any], tables: dict[Any, ShapeTable]) -> list[tuple[np.ndarray, np.ndarray, float, np.ndarray]]:
    """(rows, block table, fixed ms, pair counts) per distinct key among `keys` (shape keys, or depths for tables keyed
    by depth): the `groups` of LatencyPredictor.fit_encoded."""
    rows: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        rows.setdefault(k, []).append(i)
    return [(np.asarray(r), *tables[k]) for k, r in rows.items()]


depth_groups = shape_groups  # the name of full-width-only hwnas


class _Head(nn.Module):
    """Global pooling + classifier, the network's fixed tail."""

    def __init__(self, net: Network) -> None:
        super().__init__()
        self.pool, self.fc = net.global_pooling, net.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


def fixed_block_kept(name: str, active: Sequence[bool]) -> bool:
    """Whether the fixed part `name` ("stem", "cell3.pre0", "head", or one at a width) runs when only the `active`
    cells are kept."""
    if not name.startswith("cell"):
        return True
    return active[int(name[4:].split(".")[0])]


def fixed_parts(macro: MacroConfig, width: Sequence[float] = ()) -> dict[str, tuple[int, int, int]]:
    """Per fixed part ("stem", "cellN.pre0", "cellN.pre1", "head"): (input channels, output channels, input
    resolution) at `width` (mirrors `Network`; a dropped cell changes none of them)."""
    parts = {"stem": (macro.in_channels, STEM_MULTIPLIER * macro.C, macro.resolution)}
    # States entering each cell, as (channels, resolution): both start as the stem output (3C, whatever the width).
    s0 = s1 = (STEM_MULTIPLIER * macro.C, macro.resolution)
    for shape in cell_shapes(macro, width):
        parts[f"cell{shape.index}.pre0"] = (s0[0], shape.C, s0[1])
        parts[f"cell{shape.index}.pre1"] = (s1[0], shape.C, s1[1])
        s0, s1 = s1, (STEPS * shape.C, shape.H_out)
    parts["head"] = (s1[0], macro.classes, s1[1])
    return parts


def fixed_names(macro: MacroConfig, width: Sequence[float] = ()) -> dict[str, str]:
    """Per fixed part: the name of its measurement at `width`. A part with full width's channels keeps its plain name
    (so profiles measured before elastic width still apply); others name their channels, "cell3.pre0/in24/out8"."""
    full, here = fixed_parts(macro), fixed_parts(macro, width)
    return {p: p if here[p] == full[p] else f"{p}/in{here[p][0]}/out{here[p][1]}" for p in here}


def fixed_blocks(macro: MacroConfig, genotype: Genotype,
                 elastic_width: bool = False) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """The genotype-independent parts (stem, cell preprocessing, head) with their input shapes; with `elastic_width`,
    also every other channel count they take at some width (full-width parts first, under their plain names)."""
    parts: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}
    for width in all_widths(elastic_width):
        names = fixed_names(macro, width)
        if all(n in parts for n in names.values()):
            continue
        # Every cell kept: a dropped cell has no preprocessing to take, and depth changes no part's shape.
        net = Network(replace(genotype, macro=macro, depth=(), width=width), macro).eval()
        modules = {"stem": net.stem, "head": _Head(net)}
        for i, cell in enumerate(net.cells):
            modules[f"cell{i}.pre0"], modules[f"cell{i}.pre1"] = cell.preprocess0, cell.preprocess1
        stem_in = (1, macro.in_channels, macro.resolution, macro.resolution)
        for part, (c_in, _, h) in fixed_parts(macro, width).items():
            parts.setdefault(names[part], (modules[part], stem_in if part == "stem" else (1, c_in, h, h)))
    return parts


def blocks_section(overhead_ms: float, fixed_ms: dict[str, float], ops_ms: dict[str, float],
                   elastic_width: bool) -> dict[str, Any]:
    """A profile's `blocks`: full-width fixed parts in fixed_ms (as before elastic width), the fixed parts of other
    channel counts in width_fixed_ms, and width_choices: the stage fractions whose blocks were all measured."""
    return {"overhead_ms": overhead_ms, "fixed_ms": {n: v for n, v in fixed_ms.items() if "/" not in n},
            "width_fixed_ms": {n: v for n, v in fixed_ms.items() if "/" in n}, "ops_ms": ops_ms,
            "width_choices": list(WIDTH_CHOICES) if elastic_width else [1.0]}
