"""CPU channels-last kernels of hwnas._C (torch.ops.hwnas.dwconv_nhwc) with autograd and fake kernels.

`dwconv_nhwc` computes what `hwnas::dwconv` computes (depthwise conv of relu(x) or x, 'same' padding,
stride 1 or 2) on tensors in channels-last memory, which it keeps: the layout oneDNN's 1x1 convolutions
and pools run fastest in, so a channels-last network needs no layout conversion around it.
`batch_norm_nhwc` is a training-mode nn.BatchNorm2d forward (batch statistics, running statistics
updated alike) on channels-last tensors in two passes over memory each way. `cat_relu_nhwc` is
relu(cat(xs, dim=1)) in one pass, each input's gradient written in one pass back. `pool3x3_nhwc` is the
search space's 3x3 max or average pooling (padding 1, count_include_pad=False) without ATen's int64 indices.
Used by hwnas.train.fast_ops ("fused" mode). Importing this module raises ImportError when hwnas._C is
not built, or was built before these kernels existed; a build from before the pool kernels has
`HAS_POOL3X3` False (the pools then stay on ATen).
"""
from __future__ import annotations

import torch

from hwnas import _C  # noqa: F401  (registers the hwnas:: operators)

if not hasattr(torch.ops.hwnas, "dwconv_nhwc"):
    raise ImportError("hwnas._C was built without the channels-last kernels (csrc/nhwc_cpu.cpp): rebuild it")

from hwnas.kernels.compiled import register_dwconv_autograd  # noqa: E402  (after the check above)


def _out_hw(h: int, w: int, stride: int) -> tuple[int, int]:
    return (h + stride - 1) // stride, (w + stride - 1) // stride


@torch.library.register_fake("hwnas::dwconv_nhwc")
def _dwconv_nhwc_fake(x, weight, stride, dilation, relu_input):
    ho, wo = _out_hw(x.shape[2], x.shape[3], stride)
    return x.new_empty(x.shape[0], x.shape[1], ho, wo).contiguous(memory_format=torch.channels_last)


@torch.library.register_fake("hwnas::dwconv_nhwc_backward")
def _dwconv_nhwc_backward_fake(grad_out, x, weight, stride, dilation, relu_input):
    return torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(weight)


register_dwconv_autograd("hwnas::dwconv_nhwc", torch.ops.hwnas.dwconv_nhwc_backward)


def dwconv_nhwc(x: torch.Tensor, weight: torch.Tensor, stride: int, dilation: int, relu_input: bool) -> torch.Tensor:
    """Depthwise conv of (relu(x) if relu_input else x) with weight (C, 1, k, k), 'same' padding; channels-last."""
    return torch.ops.hwnas.dwconv_nhwc(x, weight, stride, dilation, relu_input)


# --------------------------------------------------------------------------------------------------
# hwnas::bn_nhwc: training-mode BatchNorm2d


@torch.library.register_fake("hwnas::bn_nhwc")
def _bn_nhwc_fake(x, weight, bias, eps):
    c = x.shape[1]
    stat = lambda: x.new_empty(c, dtype=torch.float64)  # noqa: E731
    return torch.empty_like(x, memory_format=torch.channels_last), stat(), stat(), stat()


@torch.library.register_fake("hwnas::bn_nhwc_backward")
def _bn_nhwc_backward_fake(grad_out, x, weight, mean, invstd):
    return torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(weight), torch.empty_like(weight)


def _bn_setup(ctx, inputs, output) -> None:
    x, weight, bias, eps = inputs
    _, mean, var, invstd = output
    ctx.mark_non_differentiable(mean, var, invstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, mean, invstd)


def _bn_backward(ctx, grad, *_stat_grads):
    if grad is None:
        return None, None, None, None
    x, weight, mean, invstd = ctx.saved_tensors
    gx, gw, gb = torch.ops.hwnas.bn_nhwc_backward(grad, x, weight, mean, invstd)
    return gx, gw, gb, None


torch.library.register_autograd("hwnas::bn_nhwc", _bn_backward, setup_context=_bn_setup)


def batch_norm_nhwc(bn: torch.nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """bn(x) for a training-mode, affine BatchNorm2d that tracks running statistics, and its buffer updates.

    Other configurations (eval mode, no affine parameters, no running statistics) go to `bn` itself.
    """
    if not (bn.training and bn.affine and bn.track_running_stats and bn.running_mean is not None):
        return bn(x)
    out, mean, var, _ = torch.ops.hwnas.bn_nhwc(x, bn.weight, bn.bias, bn.eps)
    with torch.no_grad():  # what nn.BatchNorm2d does to its buffers in a training-mode forward
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        count = x.numel() // x.shape[1]
        unbiased = var * (count / (count - 1)) if count > 1 else var
        bn.running_mean.mul_(1 - momentum).add_(mean.to(bn.running_mean.dtype), alpha=momentum)
        bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)
    return out


# --------------------------------------------------------------------------------------------------
# hwnas::cat_relu_nhwc: relu(cat(xs, dim=1))


@torch.library.register_fake("hwnas::cat_relu_nhwc")
def _cat_relu_nhwc_fake(xs):
    n, _, h, w = xs[0].shape
    return xs[0].new_empty(n, sum(x.shape[1] for x in xs), h, w).contiguous(memory_format=torch.channels_last)


@torch.library.register_fake("hwnas::cat_relu_nhwc_backward")
def _cat_relu_nhwc_backward_fake(grad_out, out, channels):
    n, _, h, w = out.shape
    return [out.new_empty(n, c, h, w).contiguous(memory_format=torch.channels_last) for c in channels]


def _cat_relu_setup(ctx, inputs, output) -> None:
    (xs,) = inputs
    ctx.save_for_backward(output)  # output > 0 exactly where the input was > 0
    ctx.channels = [x.shape[1] for x in xs]


def _cat_relu_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    return (list(torch.ops.hwnas.cat_relu_nhwc_backward(grad, out, ctx.channels)),)


torch.library.register_autograd("hwnas::cat_relu_nhwc", _cat_relu_backward, setup_context=_cat_relu_setup)


def cat_relu_nhwc(xs: list[torch.Tensor]) -> torch.Tensor:
    """relu(torch.cat(xs, dim=1)) in channels-last memory, in one pass (and one pass back)."""
    return torch.ops.hwnas.cat_relu_nhwc(xs)


# --------------------------------------------------------------------------------------------------
# hwnas::pool3x3_nhwc: 3x3 max or average pooling, padding 1, stride 1 or 2


HAS_POOL3X3 = hasattr(torch.ops.hwnas, "pool3x3_nhwc")


def _pool3x3_nhwc_fake(x, stride, is_max):
    ho, wo = _out_hw(x.shape[2], x.shape[3], stride)
    return x.new_empty(x.shape[0], x.shape[1], ho, wo).contiguous(memory_format=torch.channels_last)


def _pool3x3_nhwc_backward_fake(grad_out, x, stride, is_max):
    return torch.empty_like(x, memory_format=torch.channels_last)


def _pool_setup(ctx, inputs, output) -> None:
    x, stride, is_max = inputs
    ctx.save_for_backward(x)  # the average's backward reads only its shape; x is kept alive by its other readers
    ctx.stride, ctx.is_max = stride, is_max


def _pool_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.hwnas.pool3x3_nhwc_backward(grad, x, ctx.stride, ctx.is_max), None, None


if HAS_POOL3X3:
    torch.library.register_fake("hwnas::pool3x3_nhwc", _pool3x3_nhwc_fake)
    torch.library.register_fake("hwnas::pool3x3_nhwc_backward", _pool3x3_nhwc_backward_fake)
    torch.library.register_autograd("hwnas::pool3x3_nhwc", _pool_backward, setup_context=_pool_setup)


def pool3x3_nhwc(x: torch.Tensor, stride: int, is_max: bool) -> torch.Tensor:
    """3x3 max (is_max) or average (count_include_pad=False) pooling with padding 1, channels-last."""
    return torch.ops.hwnas.pool3x3_nhwc(x, stride, is_max)
