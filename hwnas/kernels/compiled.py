"""The compiled MixedOp backend: hwnas._C operators (torch.ops.hwnas.*) with autograd and fake kernels.

Per edge: the four conv branches run their depthwise convolutions through `hwnas::dwconv` (ReLU fused
into the read), their 1x1 convolutions and BatchNorms through ATen (GEMMs); the stride-2 skip
(FactorizedReduce) through ATen; then `hwnas::combine` computes the pools with their BatchNorms and the
identity from one read of x and sums everything with the weights, forward and backward. The backward
recomputes the pools from x: keeping them from the forward costs more memory traffic than recomputing.
Importing this module raises ImportError when hwnas._C is not built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hwnas import _C  # noqa: F401  (registers the hwnas:: operators)
from hwnas.kernels.reference import skippable

MAX_POOL, AVG_POOL, SKIP = 1, 2, 3
CONV_OPS = (4, 5, 6, 7)  # sep_conv_3x3, sep_conv_5x5, dil_conv_3x3, dil_conv_5x5
NUM_OPS = 8


def has_backend(name: str) -> bool:
    """Whether the compiled kernels can run on device type `name` in this process."""
    if name == "cpu":
        return True
    if name == "cuda":
        return bool(_C.with_cuda) and torch.cuda.is_available()
    return False


def _out_hw(h: int, w: int, stride: int) -> tuple[int, int]:
    return (h + stride - 1) // stride, (w + stride - 1) // stride


# --------------------------------------------------------------------------------------------------
# hwnas::dwconv — fake kernels and autograd


@torch.library.register_fake("hwnas::dwconv")
def _dwconv_fake(x, weight, stride, dilation, relu_input):
    ho, wo = _out_hw(x.shape[2], x.shape[3], stride)
    return x.new_empty(x.shape[0], x.shape[1], ho, wo)


@torch.library.register_fake("hwnas::dwconv_backward")
def _dwconv_backward_fake(grad_out, x, weight, stride, dilation, relu_input):
    return torch.empty_like(x), torch.empty_like(weight)


def register_dwconv_autograd(name: str, backward_op) -> None:
    """Autograd for depthwise-conv op `name` (x, weight, stride, dilation, relu_input) via `backward_op`."""

    def setup(ctx, inputs, output) -> None:
        x, weight, stride, dilation, relu_input = inputs
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, dilation, relu_input)

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx, gw = backward_op(grad, x, weight, *ctx.conf)
        return gx, gw, None, None, None

    torch.library.register_autograd(name, backward, setup_context=setup)


register_dwconv_autograd("hwnas::dwconv", torch.ops.hwnas.dwconv_backward)


def dwconv(x: torch.Tensor, weight: torch.Tensor, stride: int, dilation: int, relu_input: bool) -> torch.Tensor:
    """Depthwise conv of (relu(x) if relu_input else x) with weight (C, 1, k, k), 'same' padding."""
    return torch.ops.hwnas.dwconv(x, weight, stride, dilation, relu_input)


# --------------------------------------------------------------------------------------------------
# hwnas::combine — fake kernels and autograd


@torch.library.register_fake("hwnas::combine")
def _combine_fake(x, weights, branches, running_stats, active, stride, training, eps):
    ho, wo = _out_hw(x.shape[2], x.shape[3], stride)
    return x.new_empty(x.shape[0], x.shape[1], ho, wo), x.new_empty(4, x.shape[1])


@torch.library.register_fake("hwnas::combine_backward")
def _combine_backward_fake(grad_out, x, weights, branches, stats, active, stride, training, eps):
    grads = [torch.empty_like(grad_out) for _ in branches]
    return torch.empty_like(x), torch.empty_like(weights), grads


def _combine_setup(ctx, inputs, output) -> None:
    x, weights, branches, running_stats, active, stride, training, eps = inputs
    out, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for an output that took no part in the loss
    ctx.save_for_backward(x, weights, stats, *branches)
    ctx.conf = (active, stride, training, eps)


def _combine_backward(ctx, grad_out, grad_stats):
    x, weights, stats, *branches = ctx.saved_tensors
    if grad_out is None:  # the output took no part in the loss
        return None, None, [None] * len(branches), None, None, None, None, None
    gx, gw, gb = torch.ops.hwnas.combine_backward(grad_out, x, weights, branches, stats, *ctx.conf)
    return gx, gw, list(gb), None, None, None, None, None


torch.library.register_autograd("hwnas::combine", _combine_backward, setup_context=_combine_setup)


# --------------------------------------------------------------------------------------------------
# MixedOp


def _conv_branch(op: nn.Module, x: torch.Tensor, stride: int) -> torch.Tensor:
    """SepConv / DilConv with the depthwise convs (ReLU fused) on hwnas::dwconv.

    A narrower x (elastic width) uses the leading channels of every weight; the BatchNorms slice themselves.
    """
    seq, c = op.op, x.shape[1]
    if len(seq) == 8:  # SepConv: relu, dw, pw, bn, relu, dw, pw, bn
        y = dwconv(x, seq[1].weight[:c], stride, seq[1].dilation[0], True)
        y = seq[3](F.conv2d(y, seq[2].weight[:c, :c]))
        y = dwconv(y, seq[5].weight[:c], 1, seq[5].dilation[0], True)
        return seq[7](F.conv2d(y, seq[6].weight[:c, :c]))
    # DilConv: relu, dw, pw, bn
    y = dwconv(x, seq[1].weight[:c], stride, seq[1].dilation[0], True)
    return seq[3](F.conv2d(y, seq[2].weight[:c, :c]))


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """What nn.BatchNorm2d does to its buffers in a training-mode forward (to the leading channels of a narrower pass)."""
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = var * (count / (count - 1)) if count > 1 else var
    c = mean.shape[0]
    bn.running_mean[:c].mul_(1 - momentum).add_(mean, alpha=momentum)
    bn.running_var[:c].mul_(1 - momentum).add_(unbiased, alpha=momentum)


def mixed_op(x: torch.Tensor, weights: torch.Tensor, ops: nn.ModuleList, stride: int,
             skip: list[bool] | None = None) -> torch.Tensor:
    """Same result, gradients and BatchNorm updates as reference.mixed_op_reference, via hwnas._C."""
    skip = skippable(weights) if skip is None else skip
    active = [k > 0 and not skip[k] for k in range(NUM_OPS)]
    mask = sum(1 << k for k in range(NUM_OPS) if active[k])
    branches: list[torch.Tensor] = []  # external branches of the active ops, in op order
    if stride == 2 and active[SKIP]:
        branches.append(ops[SKIP](x))  # FactorizedReduce: parameters, ATen
    for k in CONV_OPS:
        if active[k]:
            branches.append(_conv_branch(ops[k], x, stride))
    bn_max, bn_avg = ops[MAX_POOL][1], ops[AVG_POOL][1]
    training = bn_max.training
    running = None
    if not training and (active[MAX_POOL] or active[AVG_POOL]):
        c = x.shape[1]
        running = torch.stack([bn_max.running_mean[:c], bn_max.running_var[:c], bn_avg.running_mean[:c], bn_avg.running_var[:c]])
        running = running.to(x.dtype)
    out, stats = torch.ops.hwnas.combine(x, weights, branches, running, mask, stride, training, bn_max.eps)
    if training:
        ho, wo = out.shape[2], out.shape[3]
        count = x.shape[0] * ho * wo
        with torch.no_grad():
            if active[MAX_POOL]:
                _update_running_stats(bn_max, stats[0], stats[1], count)
            if active[AVG_POOL]:
                _update_running_stats(bn_avg, stats[2], stats[3], count)
    return out
