"""Training-time forwards for the discrete Network on the compiled kernels (same parameters, same results).

Eager PyTorch spends most of a CPU training step in the depthwise convolutions' backward. Modes:

* "fused" (default): the whole network on channels-last tensors (oneDNN's native layout for the 1x1 and
  stem convolutions and the pools) and the rest on hwnas._C's channels-last kernels
  (hwnas.kernels.nhwc): depthwise convolutions with the ReLU before them fused (hwnas::dwconv_nhwc, 2-3x
  oneDNN's fwd+bwd, far more on stride 2 and 5x5), BatchNorms (hwnas::bn_nhwc, two passes each way),
  each cell's output concatenated and rectified in one pass (hwnas::cat_relu_nhwc: every cell output but
  the last is read only by ReLU-first preprocessing, and ReLU is idempotent), one ReLU per tensor where
  several preprocessings read it (the stem output), the stem's BatchNorm on hwnas::bn_nhwc too, and
  FactorizedReduce at even sizes without its padded copy and with a backward that writes x's gradient once
  (autograd's builds it three times over, from freshly zeroed tensors), and the 3x3 max and average pools on
  hwnas::pool3x3_nhwc (ATen's max pool writes and reads an int64 index per output value). Falls back to
  "channels_last" when hwnas._C lacks these kernels.
* "channels_last": plain ATen ops on NHWC tensors.
* "compiled": SepConv/DilConv depthwise convs on hwnas::dwconv (NCHW), 1x1 convs as bmm.
* "eager": nothing changes.

Measured side by side (python benchmarks/train_speed.py --rounds 9 --threads 2: C=16, 5 cells, 28x28, batch
128, forward + backward + SGD step, interleaved rounds, medians; AMD EPYC, 2 cores, quiet, 2026-12-05):
fused 0.319 s = 2.98x eager, channels_last 1.81x, compiled 1.38x (benchmarks/results/train_speed_cpu.json);
a second quiet run 2.71x (train_speed_cpu_rerun.json); with the pool kernels, on a 2-core Intel Xeon, 3.11x and
2.80x (train_speed_cpu_xeon*.json; the code before them 2.81-2.96x there). docs/results.md has the history.
The modules, their parameters and state_dict stay untouched: only the instances' `forward` is swapped
for the duration (and the parameters are channels-last inside the block), so what is exported afterwards
is the plain nn graph. Without the compiled extension "compiled" is eager and "fused" is channels_last.
"""
from __future__ import annotations

import contextlib
import logging
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hwnas.space.genotype import STEPS
from hwnas.space.network import Cell, Network
from hwnas.space.ops import DilConv, FactorizedReduce, ReLUConvBN, SepConv

log = logging.getLogger(__name__)
# Fastest in benchmarks/train_speed.py side by side, quiet or loaded, 1 or 2 threads (figures above).
DEFAULT_MODE = "fused"


def available() -> bool:
    """Whether the compiled depthwise kernel can run (hwnas._C built, not disabled)."""
    from hwnas.kernels import _compiled

    return _compiled() is not None


def nhwc_available() -> bool:
    """Whether the channels-last kernels of the "fused" mode can run (hwnas._C built with them)."""
    if not available():
        return False
    try:
        import hwnas.kernels.nhwc  # noqa: F401
    except ImportError:
        return False
    return True


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


def _sep_dil_forward_nhwc(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SepConv / DilConv on channels-last tensors: depthwise convs (ReLU fused) on hwnas::dwconv_nhwc,
    1x1 convs on oneDNN, BatchNorms on hwnas::bn_nhwc."""
    from hwnas.kernels.nhwc import batch_norm_nhwc, dwconv_nhwc

    if x.device.type != "cpu":
        return self.op(x)
    seq = self.op
    dw = seq[1]
    y = batch_norm_nhwc(seq[3], F.conv2d(dwconv_nhwc(x, dw.weight, dw.stride[0], dw.dilation[0], True), seq[2].weight))
    if len(seq) == 8:
        dw = seq[5]
        y = batch_norm_nhwc(seq[7], F.conv2d(dwconv_nhwc(y, dw.weight, 1, dw.dilation[0], True), seq[6].weight))
    return y


class _ReluCache:
    """relu(x) once per tensor within one forward of the network.

    A cell's output feeds the preprocessing of the next two cells, and both start with a ReLU (the stem's
    output even feeds both preprocessings of the first cell): computing it once saves a pass over the
    largest tensors of the network, forward and backward (autograd sums the gradients first). The
    network's forward hooks empty the cache before and after each forward.
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hit = self.entries.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        y = F.relu(x)
        self.entries[id(x)] = (x, y)  # keeping x alive keeps its id unique until the cache is emptied
        return y

    def rectified(self, y: torch.Tensor) -> torch.Tensor:
        """Records that y is already rectified (relu(y) is y itself) and returns it."""
        self.entries[id(y)] = (y, y)
        return y

    def clear(self, *_args) -> None:
        self.entries.clear()


def _cell_forward_rectified(self: nn.Module, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    """Cell forward that returns relu(output), concatenated and rectified in one pass (hwnas::cat_relu_nhwc).

    Only for cells whose output is read by ReLU-first modules alone (the preprocessing of the next two
    cells; every cell but the network's last): ReLU is idempotent and its mask is the same, so those
    modules compute exactly what they compute from the plain output, and they skip their own ReLU.
    """
    from hwnas.kernels.nhwc import cat_relu_nhwc

    states = [self.preprocess0(s0), self.preprocess1(s1)]
    for node in range(STEPS):
        a, b = 2 * node, 2 * node + 1
        states.append(self.ops[a](states[self.inputs[a]]) + self.ops[b](states[self.inputs[b]]))
    return self._hwnas_relu.rectified(cat_relu_nhwc(states[2:]))


def _relu_conv_bn_forward_nhwc(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ReLU (shared with the other consumers of x), conv on oneDNN, BN on hwnas::bn_nhwc."""
    from hwnas.kernels.nhwc import batch_norm_nhwc

    return batch_norm_nhwc(self.op[2], self.op[1](self._hwnas_relu(x)))


def _factorized_reduce_forward_nhwc(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """FactorizedReduce with the shared ReLU and, for even sizes, no padded copy of x.

    The shifted path's stride-2 1x1 conv reads x at (2i + 1, 2j + 1); with even H and W those all lie inside
    x, so it is a stride-1 1x1 conv of that subsampled view (the pad row and column are never read).
    """
    from hwnas.kernels.nhwc import batch_norm_nhwc

    x = self._hwnas_relu(x)
    if x.shape[2] % 2 or x.shape[3] % 2:
        shifted = self.conv_2(F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:])
        return batch_norm_nhwc(self.bn, torch.cat([self.conv_1(x), shifted], dim=1))
    return batch_norm_nhwc(self.bn, _EvenFactorizedReduce.apply(x, self.conv_1.weight, self.conv_2.weight))


def _layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last if x is laid out so, else contiguous."""
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class _EvenFactorizedReduce(torch.autograd.Function):
    """cat(conv1x1(x at (2i, 2j), w1), conv1x1(x at (2i+1, 2j+1), w2)) for even H and W.

    Autograd's own backward builds x's gradient three times over (the stride-2 convolution's, and a zero
    tensor per slice of the shifted path's view, then their sum); those zero fills of fresh full-size
    tensors cost more than the convolutions. Here the four interleaved quarters of x's gradient are each
    written once: the two convolutions' input gradients and two zero quarters. The two subsampled quarters of
    x the convolutions read are dense copies either way (oneDNN reads no strided input); the forward keeps
    them for the backward, which would otherwise copy them again.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:  # noqa: D102
        layout = _layout(x)
        even, odd = (x[:, :, r::2, r::2].contiguous(memory_format=layout) for r in (0, 1))
        ctx.save_for_backward(even, odd, w1, w2)
        ctx.x_shape, ctx.layout = x.shape, layout
        return torch.cat([F.conv2d(even, w1), F.conv2d(odd, w2)], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        even, odd, w1, w2 = ctx.saved_tensors
        n, c, h, w = ctx.x_shape
        grads = grad.split([w1.shape[0], w2.shape[0]], dim=1)
        # In x's own layout, so that each quarter's gradient copies in along channels.
        grad_x = torch.empty((n, c, h, w), dtype=even.dtype, device=even.device, memory_format=ctx.layout)
        quarters = grad_x.view(n, c, h // 2, 2, w // 2, 2)  # splitting H and W is a view in any layout
        grad_ws = []
        for (row, col), g, part, weight in zip(((0, 0), (1, 1)), grads, (even, odd), (w1, w2)):
            gx, gw, _ = torch.ops.aten.convolution_backward(
                g, part, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [ctx.needs_input_grad[0], True, False],
            )
            if gx is not None:
                quarters[:, :, :, row, :, col].copy_(gx)
            grad_ws.append(gw)
        quarters[:, :, :, 0, :, 1].zero_()
        quarters[:, :, :, 1, :, 0].zero_()
        return grad_x if ctx.needs_input_grad[0] else None, grad_ws[0], grad_ws[1]


def _is_pool3x3(pool: nn.Module) -> bool:
    """True for the search space's pools: 3x3, padding 1, stride 1 or 2 (averages without the padding)."""
    def one(v) -> int | None:
        v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        return v[0] if v[0] == v[1] else None

    plain = (one(pool.kernel_size) == 3 and one(pool.padding) == 1 and one(pool.stride) in (1, 2)
             and not pool.ceil_mode)
    if isinstance(pool, nn.MaxPool2d):
        return plain and one(pool.dilation) == 1 and not pool.return_indices
    return plain and not pool.count_include_pad and pool.divisor_override is None


def _pool_forward_nhwc(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """3x3 max or average pooling of a channels-last CPU tensor on hwnas::pool3x3_nhwc (no int64 indices)."""
    from hwnas.kernels import nhwc

    if not nhwc.HAS_POOL3X3 or x.device.type != "cpu" or x.dim() != 4 or not _is_pool3x3(self):
        return type(self).forward(self, x)
    stride = self.stride if isinstance(self.stride, int) else self.stride[0]
    return nhwc.pool3x3_nhwc(x, stride, isinstance(self, nn.MaxPool2d))


def _stem_bn_forward_nhwc(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The stem's BatchNorm on hwnas::bn_nhwc (ATen's NHWC BatchNorm backward is several times slower)."""
    from hwnas.kernels.nhwc import batch_norm_nhwc

    if x.device.type != "cpu" or not (self.training and self.affine and self.running_mean is not None):
        return nn.BatchNorm2d.forward(self, x)
    return batch_norm_nhwc(self, x)


_FORWARDS = ((SepConv, _sep_dil_forward), (DilConv, _sep_dil_forward), (ReLUConvBN, _relu_conv_bn_forward))
_FORWARDS_NHWC = (
    (SepConv, _sep_dil_forward_nhwc),
    (DilConv, _sep_dil_forward_nhwc),
    (ReLUConvBN, _relu_conv_bn_forward_nhwc),
    (FactorizedReduce, _factorized_reduce_forward_nhwc),
    (nn.MaxPool2d, _pool_forward_nhwc),
    (nn.AvgPool2d, _pool_forward_nhwc),
)
_USES_RELU_CACHE = (ReLUConvBN, FactorizedReduce)
MODES = ("eager", "compiled", "channels_last", "fused")


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the network's input in channels-last layout (the layers then keep it)."""
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


@contextlib.contextmanager
def fast_training(net: nn.Module, mode: str = DEFAULT_MODE) -> Iterator[str]:
    """Within the block `net` trains the `mode` way (same parameters, same results); yields the mode used.

    "fused": channels-last tensors with the depthwise convs, BatchNorms, pools and cell concatenations on
    hwnas._C's channels-last kernels (falls back to "channels_last" without them). "compiled":
    SepConv/DilConv depthwise convs on hwnas::dwconv and 1x1 convs as bmm (falls back to "eager" when
    hwnas._C is not built). "channels_last": plain ATen ops on NHWC tensors (oneDNN's native layout).
    "eager": nothing changes. On exit every module is plain and contiguous again, ready to export.
    """
    if mode not in MODES:
        raise ValueError(f"training mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "compiled" and not available():
        log.info("hwnas._C is not built: training the discrete network in eager PyTorch")
        mode = "eager"
    if mode == "fused" and not nhwc_available():
        log.info("hwnas._C is not built with its channels-last kernels: training in channels_last mode")
        mode = "channels_last"
    if mode == "fused" and any(p.device.type != "cpu" for p in net.parameters()):
        mode = "channels_last"  # the channels-last kernels are CPU kernels
    swapped: list[nn.Module] = []
    hooks = []
    relu_cache = _ReluCache()
    try:
        forwards = {"compiled": _FORWARDS, "fused": _FORWARDS_NHWC}.get(mode, ())
        for module in net.modules():
            for cls, forward in forwards:
                if type(module) is cls and "forward" not in module.__dict__:
                    module.forward = types.MethodType(forward, module)
                    if mode == "fused" and cls in _USES_RELU_CACHE:
                        module._hwnas_relu = relu_cache
                    swapped.append(module)
        if mode == "fused" and type(net) is Network:
            stem_bn = net.stem[-1]
            if type(stem_bn) is nn.BatchNorm2d and "forward" not in stem_bn.__dict__:
                stem_bn.forward = types.MethodType(_stem_bn_forward_nhwc, stem_bn)
                swapped.append(stem_bn)
            # Every cell's output but the last cell's (global pooling reads it) feeds ReLU-first modules only.
            cells = [cell for cell in net.cells if type(cell) is Cell and "forward" not in cell.__dict__]
            for cell in cells[:-1]:
                cell.forward = types.MethodType(_cell_forward_rectified, cell)
                cell._hwnas_relu = relu_cache
                swapped.append(cell)
        if mode in ("channels_last", "fused"):
            net.to(memory_format=torch.channels_last)
            hooks.append(net.register_forward_pre_hook(_to_channels_last))
        if mode == "fused":
            hooks.append(net.register_forward_pre_hook(relu_cache.clear))
            hooks.append(net.register_forward_hook(relu_cache.clear, always_call=True))
        yield mode
    finally:
        for module in swapped:
            del module.forward  # back to the class's plain-nn forward
            module.__dict__.pop("_hwnas_relu", None)
        relu_cache.clear()
        for hook in hooks:
            hook.remove()
        if mode in ("channels_last", "fused"):
            net.to(memory_format=torch.contiguous_format)


def compiled_training(net: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager[str]:
    """fast_training in "compiled" mode (or "eager" when not `enabled`)."""
    return fast_training(net, "compiled" if enabled else "eager")
