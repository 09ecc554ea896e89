"""Pure-PyTorch MixedOp: the specification every compiled backend must match."""
from __future__ import annotations

import torch
from torch import nn


def skippable(weights: torch.Tensor) -> list[bool]:
    """Per op: True where its weight is exactly zero and no gradient w.r.t. the weights is needed."""
    if torch.is_grad_enabled() and weights.requires_grad:
        return [False] * weights.numel()
    return (weights == 0).tolist()


def mixed_op_reference(x: torch.Tensor, weights: torch.Tensor, ops: nn.ModuleList, stride: int) -> torch.Tensor:
    """sum_k weights[k] * ops[k](x), skipping the 'none' op and zero-weight ops that need no gradient.

    `ops` holds the eight supernet ops in PRIMITIVES order. Skipped ops are not run at all, so their
    BatchNorm running statistics are not updated: every backend follows that rule.
    """
    skip = skippable(weights)
    out: torch.Tensor | None = None
    for k in range(1, len(ops)):  # k = 0 is "none": it contributes nothing, whatever its weight
        if skip[k]:
            continue
        term = weights[k] * ops[k](x)
        out = term if out is None else out + term
    if out is None:
        n, c, h, w = x.shape
        ho, wo = (h + stride - 1) // stride, (w + stride - 1) // stride
        out = x.new_zeros(n, c, ho, wo)  # only reachable when no gradient is needed
    return out
