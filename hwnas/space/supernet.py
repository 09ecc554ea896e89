"""DARTS weight-sharing supernet: every edge a MixedOp over the eight ops, run through hwnas.kernels."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hwnas.config import MacroConfig
from hwnas.kernels import mixed_op
from hwnas.kernels.reference import mark_host_zeros, skip_table
from hwnas.space.elastic import make_elastic
from hwnas.space.genotype import STEPS, Genotype, cell_channels, reduction_layers
from hwnas.space.network import STEM_MULTIPLIER
from hwnas.space.ops import GENOTYPE_OPS, PRIMITIVES, FactorizedReduce, ReLUConvBN, create_op

EDGES = sum(node + 2 for node in range(STEPS))  # 14 edges per cell
NUM_OPS = len(PRIMITIVES)
EdgeWeights = tuple[torch.Tensor, torch.Tensor]  # (normal (14, 8), reduce (14, 8))
# Relative size of the random part of a channel-aligned initialisation (see align_init).
ALIGN_INIT_NOISE = 0.1


def edge_index(node: int, inp: int) -> int:
    """Row of the alphas for the edge from state `inp` into intermediate node `node`."""
    return sum(k + 2 for k in range(node)) + inp


@torch.no_grad()
def align_init(op: nn.Module, noise: float = ALIGN_INIT_NOISE) -> None:
    """Initialise a candidate op's convolutions near a channel-preserving map: output channel c reads input channel c.

    The parameter-free candidates (pools, skip) keep each channel where it is, while independently initialised
    conv candidates each scatter the channels through their own random 1x1 convolutions. A single-path step then
    hands the next layer features in an unrelated channel basis whenever an edge's op changes, and the shared
    downstream weights must first learn to reconcile every combination: on digits a uniform single-path supernet
    reached only ~0.35 train accuracy after the quick plan's 30 epochs. Started near the identity (Dirac kernels
    plus `noise` times a 1/sqrt(fan-in) random part), all candidates of an edge agree on the channel basis and
    training adapts them from there (~0.93 in the same epochs). FactorizedReduce (the stride-2 skip) maps its
    two halves likewise.
    """
    if isinstance(op, FactorizedReduce):
        half = op.conv_1.out_channels
        for conv, first in ((op.conv_1, 0), (op.conv_2, half)):
            w = conv.weight  # (out, in, 1, 1)
            w.zero_()
            rows = torch.arange(w.shape[0])
            w[rows, (rows + first) % w.shape[1], 0, 0] = 1.0
            w.add_(noise * w[0].numel() ** -0.5 * torch.randn_like(w))
        return
    for conv in op.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.dirac_(conv.weight, conv.groups)  # depthwise: centre tap 1; pointwise: identity
            conv.weight.add_(noise * conv.weight[0].numel() ** -0.5 * torch.randn_like(conv.weight))


class MixedOp(nn.Module):
    """One supernet edge: all eight ops (pools followed by BatchNorm, affine=False as in DARTS search).

    The conv candidates start channel-aligned with the parameter-free ones (align_init), so that single-path
    training, which switches an edge's op from step to step, trains a supernet whose sub-networks work.
    """

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.ops = nn.ModuleList(create_op(p, channels, stride, affine=False, supernet=True) for p in PRIMITIVES)
        for op in self.ops:
            align_init(op)
        self.backend = "auto"

    def forward(self, x: torch.Tensor, weights: torch.Tensor, skip: list[bool] | None = None) -> torch.Tensor:
        return mixed_op(x, weights, self.ops, self.stride, self.backend, skip)


class SearchCell(nn.Module):
    """A supernet cell: node j sums the MixedOps of all edges from earlier states."""

    def __init__(self, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool) -> None:
        super().__init__()
        self.reduction = reduction
        aff = False
        self.preprocess0 = FactorizedReduce(c_pp, c, aff) if reduction_prev else ReLUConvBN(c_pp, c, 1, 1, 0, aff)
        self.preprocess1 = ReLUConvBN(c_p, c, 1, 1, 0, aff)
        self.edges = nn.ModuleList(
            MixedOp(c, 2 if reduction and inp < 2 else 1) for node in range(STEPS) for inp in range(node + 2)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                skip: list[list[bool]] | None = None, channels: int | None = None) -> torch.Tensor:
        """`skip`: per edge, skippable() of its weights when known on the host (see skip_table); `channels`:
        this cell's node width (elastic width; None = full)."""
        states = [self.preprocess0(s0, channels), self.preprocess1(s1, channels)]
        offset = 0
        for node in range(STEPS):
            states.append(sum(self._edge(offset + j, h, weights, skip) for j, h in enumerate(states)))
            offset += len(states) - 1
        return torch.cat(states[2:], dim=1)  # (N, 4C, H, W)

    def _edge(self, i: int, h: torch.Tensor, weights: torch.Tensor, skip: list[list[bool]] | None) -> torch.Tensor:
        # without a table, call as before: benchmarks swap MixedOp.forward for a two-argument one
        return self.edges[i](h, weights[i]) if skip is None else self.edges[i](h, weights[i], skip=skip[i])


class Supernet(nn.Module):
    """DARTS search network with architecture parameters `alphas_normal`/`alphas_reduce` of shape (14, 8)."""

    def __init__(self, macro: MacroConfig) -> None:
        super().__init__()
        self.macro = macro
        c_curr = STEM_MULTIPLIER * macro.C
        self.stem = nn.Sequential(
            nn.Conv2d(macro.in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )
        c_pp, c_p, c_curr = c_curr, c_curr, macro.C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(macro.layers):
            reduction = i in reduction_layers(macro.layers)
            if reduction:
                c_curr *= 2
            self.cells.append(SearchCell(c_pp, c_p, c_curr, reduction, reduction_prev))
            reduction_prev = reduction
            c_pp, c_p = c_p, STEPS * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, macro.classes)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(EDGES, NUM_OPS))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(EDGES, NUM_OPS))
        self.full_channels = cell_channels(macro)
        make_elastic(self)
        # Layers that read a cell's output (a concat of STEPS node blocks) slice each block (elastic width).
        for i, cell in enumerate(self.cells):
            readers = [cell.preprocess1] if i == 1 else [cell.preprocess0, cell.preprocess1] if i > 1 else []
            for pre in readers:
                for conv in pre.modules():
                    if isinstance(conv, nn.Conv2d):
                        conv.in_blocks = STEPS
        self.classifier.in_blocks = STEPS

    def set_backend(self, name: str) -> None:
        """Route every MixedOp through kernel backend `name` ("auto", "reference", "cpu", "cuda")."""
        for module in self.modules():
            if isinstance(module, MixedOp):
                module.backend = name

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture parameters (alphas)."""
        return [self.alphas_normal, self.alphas_reduce]

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter that is not an alpha."""
        arch = {id(p) for p in self.arch_parameters()}
        return (p for p in self.parameters() if id(p) not in arch)

    def softmax_weights(self) -> EdgeWeights:
        """Per-edge op weights from the alphas (DARTS softmax relaxation)."""
        return F.softmax(self.alphas_normal, dim=-1), F.softmax(self.alphas_reduce, dim=-1)

    def forward(self, x: torch.Tensor, weights: EdgeWeights | None = None,
                active: Sequence[bool] | None = None, channels: Sequence[int] | None = None) -> torch.Tensor:
        """Logits; `active` (one flag per cell, see Genotype.active_cells) drops cells as the elastic depth does,
        `channels` (node width per cell, see Genotype.cell_channels) narrows them as the elastic width does."""
        w_normal, w_reduce = self.softmax_weights() if weights is None else weights
        for w, name in ((w_normal, "normal"), (w_reduce, "reduce")):
            if w.shape != (EDGES, NUM_OPS):
                raise ValueError(f"{name} edge weights must have shape ({EDGES}, {NUM_OPS}), got {tuple(w.shape)}")
        if active is not None and (len(active) != len(self.cells) or not all(active[i] for i in reduction_layers(len(self.cells)))):
            raise ValueError(f"active must flag each of the {len(self.cells)} cells and keep the reduction cells, got {active!r}")
        if channels is not None:
            self._check_channels(channels)
        # which ops each edge may skip, read from the device at most once per forward (not per edge)
        skip_normal, skip_reduce = skip_table(w_normal, w_reduce)
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            if active is not None and not active[i]:
                s0 = s1  # a dropped normal cell passes its input on, as in Network
                continue
            c = None if channels is None else channels[i]
            if cell.reduction:
                s0, s1 = s1, cell(s0, s1, w_reduce, skip_reduce, c)
            else:
                s0, s1 = s1, cell(s0, s1, w_normal, skip_normal, c)
        return self.classifier(torch.flatten(self.global_pooling(s1), 1))  # (N, classes)

    def _check_channels(self, channels: Sequence[int]) -> None:
        if len(channels) != len(self.full_channels) or not all(
                2 <= c <= full for c, full in zip(channels, self.full_channels)):
            raise ValueError(f"channels must give each of the {len(self.cells)} cells a width in [2, its full "
                             f"{list(self.full_channels)}], got {list(channels)}")

    def derive(self) -> Genotype:
        """DARTS discretisation: per node the two strongest incoming edges, each with its best non-none op."""
        cells = []
        for alphas in (self.alphas_normal, self.alphas_reduce):
            w = F.softmax(alphas.detach(), dim=-1)[:, 1:]  # drop "none"
            pairs = []
            for node in range(STEPS):
                rows = [edge_index(node, j) for j in range(node + 2)]
                best = sorted(range(node + 2), key=lambda j: -float(w[rows[j]].max()))[:2]
                for j in sorted(best):
                    pairs.append((GENOTYPE_OPS[int(w[rows[j]].argmax())], j))
            cells.append(tuple(pairs))
        return Genotype(normal=cells[0], reduce=cells[1], macro=self.macro)

    def genotype_weights(self, genotype: Genotype) -> EdgeWeights:
        """One-hot weights selecting `genotype`'s ops; unselected edges get all-zero rows.

        The supernet's layers do not depend on the input size, so a genotype at another resolution fits; its
        depth and width are forward's `active` and `channels` (Genotype.active_cells and .cell_channels).
        """
        if not self.macro.same_but_resolution(genotype.macro):
            raise ValueError(f"genotype macro {genotype.macro} does not match the supernet's {self.macro}")
        out = []
        for pairs in (genotype.normal, genotype.reduce):
            w = torch.zeros(EDGES, NUM_OPS)  # built on the host: its zero pattern is known without a device read
            for k, (op, inp) in enumerate(pairs):
                w[edge_index(k // 2, inp), PRIMITIVES.index(op)] = 1.0
            zeros = (w == 0).tolist()
            out.append(mark_host_zeros(w.to(self.alphas_normal.device), zeros))
        return out[0], out[1]
