"""Training-time forwards for the discrete Network on the compiled kernels (same parameters, same results).

Eager PyTorch spends most of a CPU training step in the depthwise convolutions' backward. Inside
`compiled_training(net)` every SepConv / DilConv of `net` runs its depthwise convolutions (ReLU fused)
on `hwnas::dwconv`, and the 1x1 convolutions of those ops and of the cell preprocessing run as batched
matrix products. The modules, their parameters and state_dict stay untouched: only the instances'
`forward` is swapped for the duration, so what is exported afterwards is the plain nn graph.
Without the compiled extension the context changes nothing (eager PyTorch, same results).
"""
from __future__ import annotations

import contextlib
import logging
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hwnas.space.ops import DilConv, ReLUConvBN, SepConv

log = logging.getLogger(__name__)
DEFAULT_MODE = "channels_last"  # fastest in benchmarks/train_speed.py on a quiet 2-core CPU (1.79x eager, compiled 1.36x)


def available() -> bool:
    """Whether the compiled depthwise kernel can run (hwnas._C built, not disabled)."""
    from hwnas.kernels import _compiled

    return _compiled() is not None


def pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1x1 convolution (no bias) of x (N, C, H, W) with weight (O, C, 1, 1) as one batched matrix product."""
    n, c, h, w = x.shape
    o = weight.shape[0]
    # bmm on the NCHW layout as is: torch.matmul would fold N into the rows and copy x transposed.
    out = torch.bmm(weight.view(1, o, c).expand(n, o, c), x.reshape(n, c, h * w))  # (N, O, H*W)
    return out.view(n, o, h, w)


def _sep_dil_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SepConv (relu, dw, pw, bn, relu, dw, pw, bn) or DilConv (relu, dw, pw, bn) on hwnas::dwconv."""
    from hwnas.kernels.compiled import dwconv, has_backend

    if not has_backend(x.device.type):
        return self.op(x)
    seq = self.op
    dw = seq[1]
    y = seq[3](pointwise(dwconv(x, dw.weight, dw.stride[0], dw.dilation[0], True), seq[2].weight))
    if len(seq) == 8:
        dw = seq[5]
        y = seq[7](pointwise(dwconv(y, dw.weight, 1, dw.dilation[0], True), seq[6].weight))
    return y


def _relu_conv_bn_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ReLU, 1x1 conv, BN with the conv as a matrix product (other kernel sizes stay on ATen)."""
    conv = self.op[1]
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0):
        return self.op(x)
    return self.op[2](pointwise(F.relu(x), conv.weight))


_FORWARDS = ((SepConv, _sep_dil_forward), (DilConv, _sep_dil_forward), (ReLUConvBN, _relu_conv_bn_forward))
MODES = ("eager", "compiled", "channels_last")


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the network's input in channels-last layout (the layers then keep it)."""
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


@contextlib.contextmanager
def fast_training(net: nn.Module, mode: str = DEFAULT_MODE) -> Iterator[str]:
    """Within the block `net` trains the `mode` way (same parameters, same results); yields the mode used.

    "compiled": SepConv/DilConv depthwise convs on hwnas::dwconv and 1x1 convs as bmm (falls back to
    "eager" when hwnas._C is not built). "channels_last": plain ATen ops on NHWC tensors (oneDNN's native
    layout). "eager": nothing changes. On exit every module is plain and contiguous again, ready to export.
    """
    if mode not in MODES:
        raise ValueError(f"training mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "compiled" and not available():
        log.info("hwnas._C is not built: training the discrete network in eager PyTorch")
        mode = "eager"
    swapped: list[nn.Module] = []
    hook = None
    try:
        if mode == "compiled":
            for module in net.modules():
                for cls, forward in _FORWARDS:
                    if type(module) is cls and "forward" not in module.__dict__:
                        module.forward = types.MethodType(forward, module)
                        swapped.append(module)
        elif mode == "channels_last":
            net.to(memory_format=torch.channels_last)
            hook = net.register_forward_pre_hook(_to_channels_last)
        yield mode
    finally:
        for module in swapped:
            del module.forward  # back to the class's plain-nn forward
        if hook is not None:
            hook.remove()
            net.to(memory_format=torch.contiguous_format)


def compiled_training(net: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager[str]:
    """fast_training in "compiled" mode (or "eager" when not `enabled`)."""
    return fast_training(net, "compiled" if enabled else "eager")
