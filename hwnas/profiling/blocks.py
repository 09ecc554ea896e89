"""The building blocks of a macro at every shape they take: what the per-block profile times."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from hwnas.config import MacroConfig
from hwnas.space.genotype import PAIRS_PER_CELL, STEPS, Genotype, active_cells, reduction_layers
from hwnas.space.network import STEM_MULTIPLIER, Network
from hwnas.space.ops import GENOTYPE_OPS, create_op

N_PAIRS = 2 * PAIRS_PER_CELL  # normal cell pairs, then reduce cell pairs (SearchSpace.encode order)
N_OPS = len(GENOTYPE_OPS)
N_INPUTS = STEPS + 1  # node k reads inputs 0..k+1, so inputs take values 0..STEPS


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


def cell_shapes(macro: MacroConfig) -> list[CellShape]:
    """Per cell: reduction flag, channel count and resolutions (mirrors `Network`)."""
    shapes, c, h = [], macro.C, macro.resolution
    for i in range(macro.layers):
        red = i in reduction_layers(macro.layers)
        if red:
            c *= 2
        h_out = (h + 1) // 2 if red else h  # stride-2 ops and FactorizedReduce give ceil(H/2)
        shapes.append(CellShape(i, red, c, h, h_out))
        h = h_out
    return shapes


def pair_block(cell: CellShape, op: str, inp: int) -> BlockSpec:
    """The block an edge with `op` reading state `inp` runs in `cell`."""
    stride = 2 if cell.reduction and inp < 2 else 1
    h = cell.H_in if inp < 2 else cell.H_out
    return BlockSpec(op, cell.C, h, stride)


def op_blocks(macro: MacroConfig) -> list[BlockSpec]:
    """Every distinct (op, shape) any genotype at `macro` can run, in a stable order."""
    seen: dict[str, BlockSpec] = {}
    for cell in cell_shapes(macro):
        for inp in range(N_INPUTS):
            for op in GENOTYPE_OPS:
                spec = pair_block(cell, op, inp)
                seen.setdefault(spec.key, spec)
    return list(seen.values())


def pair_tables(macro: MacroConfig, block_ms: dict[str, float], active: Sequence[bool] | None = None) -> np.ndarray:
    """(N_PAIRS, N_OPS, N_INPUTS) summed block latency of pair p with op o reading input i, over its kept cells.

    `active` flags the cells a genotype keeps (Genotype.active_cells; None: all). Dropping a normal cell
    changes no other cell's shapes, so the kept cells' blocks are the ones the full macro measured.
    """
    table = np.zeros((N_PAIRS, N_OPS, N_INPUTS))
    for cell in cell_shapes(macro):
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


class DepthTable(NamedTuple):
    """What a profile's block measurements give for the networks of one depth."""

    table: np.ndarray  # (N_PAIRS, N_OPS, N_INPUTS) summed block ms over the kept cells
    fixed_ms: float  # stem, kept cells' preprocessing, head, run overhead
    counts: np.ndarray  # (N_PAIRS,) kept cells running each pair (pair_counts)


DepthTables = dict[tuple[int, ...], DepthTable]


def depth_tables(macro: MacroConfig, blocks: dict[str, Any], depths: Sequence[tuple[int, ...]]) -> DepthTables:
    """Block table, fixed latency and pair counts per depth (full depth `()` always included) from a blocks section."""
    out: DepthTables = {}
    for depth in [(), *depths]:
        if depth not in out:
            active = active_cells(macro, depth)
            fixed = sum(ms for n, ms in blocks["fixed_ms"].items() if fixed_block_kept(n, active)) + blocks["overhead_ms"]
            out[depth] = DepthTable(pair_tables(macro, blocks["ops_ms"], active), float(fixed), pair_counts(macro, active))
    return out


def depth_groups(depths: Sequence[tuple[int, ...]],
                 tables: DepthTables) -> list[tuple[np.ndarray, np.ndarray, float, np.ndarray]]:
    """(rows, block table, fixed ms, pair counts) per depth among `depths`: the `groups` of LatencyPredictor.fit_encoded."""
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, d in enumerate(depths):
        rows.setdefault(d, []).append(i)
    return [(np.asarray(r), *tables[d]) for d, r in rows.items()]


class _Head(nn.Module):
    """Global pooling + classifier, the network's fixed tail."""

    def __init__(self, net: Network) -> None:
        super().__init__()
        self.pool, self.fc = net.global_pooling, net.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


def fixed_block_kept(name: str, active: Sequence[bool]) -> bool:
    """Whether the fixed part `name` ("stem", "cell3.pre0", "head") runs when only the `active` cells are kept."""
    if not name.startswith("cell"):
        return True
    return active[int(name[4:].split(".")[0])]


def fixed_blocks(macro: MacroConfig, genotype: Genotype) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """The genotype-independent parts (stem, cell preprocessing, head) with their input shapes."""
    net = Network(genotype, macro).eval()
    parts: dict[str, tuple[nn.Module, tuple[int, ...]]] = {
        "stem": (net.stem, (1, macro.in_channels, macro.resolution, macro.resolution))
    }
    # States entering each cell, as (channels, resolution): both start as the stem output.
    s0 = s1 = (STEM_MULTIPLIER * macro.C, macro.resolution)
    for cell, shape in zip(net.cells, cell_shapes(macro)):
        parts[f"cell{shape.index}.pre0"] = (cell.preprocess0, (1, s0[0], s0[1], s0[1]))
        parts[f"cell{shape.index}.pre1"] = (cell.preprocess1, (1, s1[0], s1[1], s1[1]))
        s0, s1 = s1, (STEPS * shape.C, shape.H_out)
    parts["head"] = (_Head(net), (1, s1[0], s1[1], s1[1]))
    return parts
