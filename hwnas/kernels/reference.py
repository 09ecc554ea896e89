"""Pure-PyTorch MixedOp: the specification every compiled backend must match."""
from __future__ import annotations

import torch
from torch import nn


_HOST_ZEROS = "_hwnas_host_zeros"  # tensor attribute: (version, zero pattern) known on the host


def skippable(weights: torch.Tensor) -> list[bool]:
    """Per op: True where its weight is exactly zero and no gradient w.r.t. the weights is needed."""
    if torch.is_grad_enabled() and weights.requires_grad:
        return [False] * weights.numel()
    return (weights == 0).tolist()


def mark_host_zeros(weights: torch.Tensor, zeros: list[list[bool]]) -> torch.Tensor:
    """Attach the zero pattern of the (E, 8) `weights`, built on the host, so skip_table needs no device read."""
    setattr(weights, _HOST_ZEROS, (weights._version, zeros))
    return weights


def skip_table(*weights: torch.Tensor) -> list[list[list[bool]] | None]:
    """Per (E, 8) weight matrix: skippable() of each row, or None where a gradient w.r.t. it is needed.

    A device-to-host read per edge would stall a CUDA forward once per edge: the pattern comes from the
    host mark (mark_host_zeros) when present, else from one transfer for all matrices together.
    """
    table: list[list[list[bool]] | None] = [None] * len(weights)
    unknown = []
    for i, w in enumerate(weights):
        if torch.is_grad_enabled() and w.requires_grad:
            continue
        mark = getattr(w, _HOST_ZEROS, None)
        if mark is not None and mark[0] == w._version:
            table[i] = mark[1]
        else:
            unknown.append(i)
    if unknown:
        flat = torch.cat([weights[i].detach().reshape(-1) for i in unknown]).eq(0).tolist()
        for i in unknown:
            rows, cols = weights[i].shape
            table[i] = [flat[r * cols:(r + 1) * cols] for r in range(rows)]
            flat = flat[rows * cols:]
    return table


def mixed_op_reference(x: torch.Tensor, weights: torch.Tensor, ops: nn.ModuleList, stride: int,
                       skip: list[bool] | None = None) -> torch.Tensor:
    """sum_k weights[k] * ops[k](x), skipping the 'none' op and zero-weight ops that need no gradient.

    `ops` holds the eight supernet ops in PRIMITIVES order. Skipped ops are not run at all, so their
    BatchNorm running statistics are not updated: every backend follows that rule. `skip` is
    skippable(weights) when the caller already has it on the host (see skip_table).
    """
    skip = skippable(weights) if skip is None else skip
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
