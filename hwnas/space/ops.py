"""The eight DARTS candidate operations and a registry that builds them by name."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Order matters: it is the column order of the supernet's alphas and of every kernel's weight vector.
PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
# Ops a discrete genotype may use: "none" only exists inside the supernet.
GENOTYPE_OPS: tuple[str, ...] = PRIMITIVES[1:]


class Zero(nn.Module):
    """The 'none' op: zeros at the output resolution."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class ReLUConvBN(nn.Module):
    """ReLU, dense k x k convolution, BatchNorm: the cell preprocessing block."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """ReLU, depthwise (optionally dilated) k x k conv, pointwise conv, BatchNorm."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int, affine: bool = True
    ) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class SepConv(nn.Module):
    """Two stacked DilConv blocks with dilation 1; only the first one strides."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel, 1, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class FactorizedReduce(nn.Module):
    """Halves resolution with two offset 1x1 stride-2 convs; pads so odd sizes give ceil(H/2)."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        # The shifted path sees x[1:, 1:]; padding one row/column keeps both paths at ceil(H/2).
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


class Identity(nn.Module):
    """The stride-1 skip connection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _pool(kind: str, c: int, stride: int, bn_after: bool, affine: bool) -> nn.Module:
    pool: nn.Module
    if kind == "max":
        pool = nn.MaxPool2d(3, stride=stride, padding=1)
    else:
        pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    if not bn_after:
        return pool
    return nn.Sequential(pool, nn.BatchNorm2d(c, affine=affine))


OpFactory = Callable[[int, int, bool, bool], nn.Module]
# name -> factory(C, stride, affine, supernet); `supernet` adds the BatchNorm after pools (DARTS search).
OPS: dict[str, OpFactory] = {
    "none": lambda c, s, affine, supernet: Zero(s),
    "max_pool_3x3": lambda c, s, affine, supernet: _pool("max", c, s, supernet, affine),
    "avg_pool_3x3": lambda c, s, affine, supernet: _pool("avg", c, s, supernet, affine),
    "skip_connect": lambda c, s, affine, supernet: Identity() if s == 1 else FactorizedReduce(c, c, affine),
    "sep_conv_3x3": lambda c, s, affine, supernet: SepConv(c, c, 3, s, 1, affine),
    "sep_conv_5x5": lambda c, s, affine, supernet: SepConv(c, c, 5, s, 2, affine),
    "dil_conv_3x3": lambda c, s, affine, supernet: DilConv(c, c, 3, s, 2, 2, affine),
    "dil_conv_5x5": lambda c, s, affine, supernet: DilConv(c, c, 5, s, 4, 2, affine),
}


def create_op(name: str, channels: int, stride: int, affine: bool = True, supernet: bool = False) -> nn.Module:
    """Build the op called `name` for `channels` channels at `stride` (1 or 2)."""
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; known ops: {', '.join(PRIMITIVES)}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    return OPS[name](channels, stride, affine, supernet)
