"""Elastic width: supernet layers that run on the first channels of their weights (Once-for-All channel slicing).

A sub-network at a narrower width uses, in every layer, the leading output channels of the supernet's weights
and reads the leading channels of each input block. The supernet holds these layer classes in place of the
plain torch.nn ones (same parameters and buffers, so checkpoints are unchanged); at full width they run the
plain forward. `sliced_network_state` copies the slices into the discrete `Network` of a genotype, which
is what the equality tests compare.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hwnas.space.ops import FactorizedReduce, ReLUConvBN


def block_channels(total: int, blocks: int, used: int) -> torch.Tensor | slice:
    """Indices of the first used/blocks channels of each of `blocks` equal blocks of `total` (a concat of nodes)."""
    if used == total:
        return slice(None)
    if blocks == 1:
        return slice(0, used)
    if total % blocks or used % blocks:
        raise ValueError(f"{used} of {total} channels do not split into {blocks} equal blocks")
    per, keep = total // blocks, used // blocks
    return torch.cat([torch.arange(b * per, b * per + keep) for b in range(blocks)])


class ElasticConv2d(nn.Conv2d):
    """A convolution that runs on the input's channel count: leading filters, each input block's leading channels.

    `in_blocks` (set by the supernet) is how many equal blocks the full input has: a cell's output is the concat
    of its 4 nodes, and a narrower cell concatenates 4 narrower nodes.
    """

    in_blocks = 1

    def forward(self, x: torch.Tensor, out: int | None = None) -> torch.Tensor:
        """`out`: output channels (default: as many as the input has when this conv keeps the channel count)."""
        c_in = x.shape[1]
        if self.groups == self.in_channels and self.groups > 1:  # depthwise: one filter per channel
            if c_in == self.in_channels:
                return super().forward(x)
            return F.conv2d(x, self.weight[:c_in], None, self.stride, self.padding, self.dilation, c_in)
        if out is None:
            out = c_in if self.out_channels == self.in_channels else self.out_channels
        if c_in == self.in_channels and out == self.out_channels:
            return super().forward(x)
        weight = self.weight[:out][:, block_channels(self.in_channels, self.in_blocks, c_in)]
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the input's channels, `offset` onward; a narrower training pass updates only their statistics."""

    def forward(self, x: torch.Tensor, offset: int = 0, count: bool = True) -> torch.Tensor:
        """`count`: False for the second part of one batch normalised in two calls (its batch is counted once)."""
        c = x.shape[1]
        if c == self.num_features and offset == 0:
            return super().forward(x)
        use_batch = self.training or self.running_mean is None
        factor = 0.0
        if self.training and self.track_running_stats:
            if count:
                self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        part = slice(offset, offset + c)
        return F.batch_norm(
            x,
            None if self.running_mean is None else self.running_mean[part],
            None if self.running_var is None else self.running_var[part],
            None if self.weight is None else self.weight[part],
            None if self.bias is None else self.bias[part],
            use_batch, factor, self.eps,
        )


class ElasticLinear(nn.Linear):
    """The classifier reading the leading channels of each of `in_blocks` input blocks."""

    in_blocks = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.in_features:
            return super().forward(x)
        return F.linear(x, self.weight[:, block_channels(self.in_features, self.in_blocks, x.shape[1])], self.bias)


class ElasticReLUConvBN(ReLUConvBN):
    """Cell preprocessing to `out` channels."""

    def forward(self, x: torch.Tensor, out: int | None = None) -> torch.Tensor:
        relu, conv, bn = self.op
        return bn(conv(relu(x), out))


class ElasticFactorizedReduce(FactorizedReduce):
    """FactorizedReduce to `out` channels: the leading filters of each half, each half's own BatchNorm channels."""

    def forward(self, x: torch.Tensor, out: int | None = None) -> torch.Tensor:
        full = self.conv_1.out_channels + self.conv_2.out_channels
        if out is None:  # as a candidate op it keeps the channel count
            out = x.shape[1] if self.conv_1.in_channels == full else full
        if out == full and x.shape[1] == self.conv_1.in_channels:
            return super().forward(x)
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        a = self.conv_1(x, out // 2)
        b = self.conv_2(shifted, out - out // 2)
        # The BatchNorm's channels are [conv_1's | conv_2's]: each half normalises with its own statistics.
        return torch.cat([self.bn(a), self.bn(b, offset=self.conv_1.out_channels, count=False)], dim=1)


_ELASTIC = {
    nn.Conv2d: ElasticConv2d,
    nn.BatchNorm2d: ElasticBatchNorm2d,
    nn.Linear: ElasticLinear,
    ReLUConvBN: ElasticReLUConvBN,
    FactorizedReduce: ElasticFactorizedReduce,
}


def make_elastic(module: nn.Module) -> nn.Module:
    """Turn every layer of `module` into its elastic class in place (parameters, buffers and names unchanged)."""
    for m in module.modules():
        cls = _ELASTIC.get(type(m))
        if cls is not None:
            m.__class__ = cls
    return module
