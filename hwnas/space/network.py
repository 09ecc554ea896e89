"""The discrete network built from a Genotype: plain torch.nn ops only, the one thing hwnas exports."""
from __future__ import annotations

import torch
from torch import nn

from hwnas.config import MacroConfig
from hwnas.space.genotype import STEPS, Genotype, Pair, active_cells, cell_channels, reduction_layers  # noqa: F401 (re-exported)
from hwnas.space.ops import FactorizedReduce, ReLUConvBN, create_op

STEM_MULTIPLIER = 3


class Cell(nn.Module):
    """One discrete cell: each of 4 nodes sums two ops applied to earlier states; output concats the nodes."""

    def __init__(self, pairs: tuple[Pair, ...], c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = FactorizedReduce(c_pp, c) if reduction_prev else ReLUConvBN(c_pp, c, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(c_p, c, 1, 1, 0)
        self.inputs = [inp for _, inp in pairs]
        self.ops = nn.ModuleList(
            create_op(op, c, 2 if reduction and inp < 2 else 1, affine=True) for op, inp in pairs
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(STEPS):
            a, b = 2 * node, 2 * node + 1
            states.append(self.ops[a](states[self.inputs[a]]) + self.ops[b](states[self.inputs[b]]))
        return torch.cat(states[2:], dim=1)  # (N, 4C, H, W)


class SkippedCell(nn.Module):
    """A normal cell the genotype's depth drops: it passes its input on (a normal cell keeps the shape)."""

    reduction = False

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        return s1


class Network(nn.Module):
    """DARTS evaluation network: stem, `layers` cells (two of them reductions), global pool, classifier.

    Cells the genotype's depth drops are `SkippedCell`s: they add no op to the graph or the ONNX export. The
    genotype's width sets each stage's channels; the stem keeps 3C.
    """

    def __init__(self, genotype: Genotype, macro: MacroConfig | None = None) -> None:
        super().__init__()
        self.genotype = genotype
        self.macro = macro = macro or genotype.macro
        c_curr = STEM_MULTIPLIER * macro.C
        self.stem = nn.Sequential(
            nn.Conv2d(macro.in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )
        c_pp = c_p = c_curr
        self.cells = nn.ModuleList()
        reduction_prev = False
        if (genotype.depth or genotype.width) and macro.layers != genotype.macro.layers:
            raise ValueError(f"genotype depth {list(genotype.depth)} / width {list(genotype.width)} is for "
                             f"{genotype.macro.layers} layers, not {macro.layers}")
        active = active_cells(macro, genotype.depth)
        for i, c_curr in enumerate(cell_channels(macro, genotype.width)):
            reduction = i in reduction_layers(macro.layers)
            pairs = genotype.reduce if reduction else genotype.normal
            self.cells.append(Cell(pairs, c_pp, c_p, c_curr, reduction, reduction_prev) if active[i] else SkippedCell())
            reduction_prev = reduction
            c_pp, c_p = c_p, STEPS * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, macro.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)  # (N, 3C, H, W)
        for cell in self.cells:
            # A dropped cell passes s1 on: the next cell reads the same s0 as at full depth, and an s1 of the
            # same shape (a normal cell keeps channels and resolution), so no layer changes shape.
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(torch.flatten(self.global_pooling(s1), 1))  # (N, classes)


def count_params(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build_network(genotype: Genotype) -> Network:
    """The discrete network of `genotype` at its own macro config."""
    return Network(genotype)
