"""Channels-last CPU kernels of hwnas._C (hwnas.kernels.nhwc) against ATen: values, gradients, BN buffers."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

try:
    from hwnas.kernels import nhwc
    IMPORT_ERROR = None
except ImportError as err:  # not built (or built without csrc/nhwc_cpu.cpp)
    nhwc, IMPORT_ERROR = None, err

pytestmark = [
    pytest.mark.skipif(nhwc is None, reason=f"hwnas._C channels-last kernels not built ({IMPORT_ERROR})"),
    pytest.mark.usefixtures("one_torch_thread"),
]

CL = torch.channels_last


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=CL)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "plain"])
@pytest.mark.parametrize("k,dilation", [(3, 1), (5, 1), (3, 2), (5, 2), (1, 1)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels", [3, 16, 24])  # channel blocks of 1, 16, and 8
def test_dwconv_nhwc_matches_aten(channels, stride, k, dilation, relu):
    x = _cl(torch.randn(2, channels, 7, 6, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(channels, 1, k, k, dtype=torch.float64, requires_grad=True)
    pad = dilation * (k - 1) // 2
    want = F.conv2d(F.relu(x) if relu else x, weight, stride=stride, padding=pad, dilation=dilation, groups=channels)
    got = nhwc.dwconv_nhwc(x, weight, stride, dilation, relu)
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want)
    g = _cl(torch.randn_like(want))
    gx, gw = torch.autograd.grad(got, (x, weight), g)
    wx, ww = torch.autograd.grad(want, (x, weight), g)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gw, ww)
    assert gx.is_contiguous(memory_format=CL)


def test_dwconv_nhwc_takes_any_layout_and_gradchecks():
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)  # NCHW in, channels-last out
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    want = F.conv2d(F.relu(x), w, stride=2, padding=1, groups=4)
    torch.testing.assert_close(nhwc.dwconv_nhwc(x, w, 2, 1, True), want)
    assert torch.autograd.gradcheck(lambda a, b: nhwc.dwconv_nhwc(a, b, 2, 2, False), (x, w))


@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (4, 16, 7, 7), (8, 32, 1, 1)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_nhwc_matches_batchnorm2d(shape, momentum):
    bn = nn.BatchNorm2d(shape[1], momentum=momentum).double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    ours = copy.deepcopy(bn)
    for _ in range(2):  # two steps: the running statistics and num_batches_tracked move alike
        x = _cl(torch.randn(*shape, dtype=torch.float64) * 3 + 1).requires_grad_()
        want, got = bn(x), nhwc.batch_norm_nhwc(ours, x)
        assert got.is_contiguous(memory_format=CL)
        torch.testing.assert_close(got, want)
        g = torch.randn_like(want)
        torch.testing.assert_close(
            torch.autograd.grad(got, (x, ours.weight, ours.bias), g),
            torch.autograd.grad(want, (x, bn.weight, bn.bias), g),
        )
    for (name, a), b in zip(bn.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)


def test_batch_norm_nhwc_gradcheck_and_eval_fallback():
    bn = nn.BatchNorm2d(3).double()
    x = _cl(torch.randn(2, 3, 4, 5, dtype=torch.float64)).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: torch.ops.hwnas.bn_nhwc(x, w, b, 1e-5)[0], (x, w, b))
    bn.eval()
    torch.testing.assert_close(nhwc.batch_norm_nhwc(bn, x), bn(x))  # eval mode: the module itself


def test_opcheck():
    opcheck = torch.library.opcheck
    x = _cl(torch.randn(2, 16, 7, 9)).requires_grad_()
    w = torch.randn(16, 1, 5, 5, requires_grad=True)
    for stride in (1, 2):
        opcheck(torch.ops.hwnas.dwconv_nhwc.default, (x, w, stride, 2, True))
        g = _cl(torch.randn(2, 16, (7 + stride - 1) // stride, (9 + stride - 1) // stride))
        opcheck(torch.ops.hwnas.dwconv_nhwc_backward.default, (g, x.detach(), w.detach(), stride, 2, True))
    gamma, beta = torch.rand(16, requires_grad=True), torch.randn(16, requires_grad=True)
    opcheck(torch.ops.hwnas.bn_nhwc.default, (x, gamma, beta, 1e-5))
    _, mean, _, invstd = torch.ops.hwnas.bn_nhwc(x.detach(), gamma.detach(), beta.detach(), 1e-5)
    g = _cl(torch.randn(2, 16, 7, 9))
    opcheck(torch.ops.hwnas.bn_nhwc_backward.default, (g, x.detach(), gamma.detach(), mean, invstd))


def test_cat_relu_nhwc_matches_aten_and_gradchecks():
    xs = [_cl(torch.randn(2, c, 3, 4, dtype=torch.float64)).requires_grad_() for c in (3, 5, 2)]
    got, want = nhwc.cat_relu_nhwc(xs), F.relu(torch.cat(xs, 1))
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, xs, g), torch.autograd.grad(want, xs, g)):
        torch.testing.assert_close(a, b)
        assert a.is_contiguous(memory_format=CL)
    assert torch.autograd.gradcheck(lambda *t: nhwc.cat_relu_nhwc(list(t)), tuple(xs))
    torch.library.opcheck(torch.ops.hwnas.cat_relu_nhwc.default, ([x.detach().float().requires_grad_() for x in xs],))


def test_dwconv_nhwc_rejects_bad_arguments():
    x = _cl(torch.randn(1, 4, 5, 5))
    with pytest.raises(RuntimeError, match="weight must be"):
        nhwc.dwconv_nhwc(x, torch.randn(3, 1, 3, 3), 1, 1, True)
    with pytest.raises(RuntimeError, match="stride must be"):
        nhwc.dwconv_nhwc(x, torch.randn(4, 1, 3, 3), 3, 1, True)
    with pytest.raises(RuntimeError, match="kernel sizes up to 7"):
        nhwc.dwconv_nhwc(x, torch.randn(4, 1, 9, 9), 1, 1, True)


@pytest.mark.parametrize("is_max", [True, False], ids=["max", "avg"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(7, 6), (1, 1), (2, 3)])
def test_pool3x3_nhwc_matches_aten(size, stride, is_max):
    x = _cl(torch.randn(2, 5, *size, dtype=torch.float64)).requires_grad_()
    want = F.max_pool2d(x, 3, stride, 1) if is_max else F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)
    got = nhwc.pool3x3_nhwc(x, stride, is_max)
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = torch.randn_like(want)
    (got_gx,), (want_gx,) = torch.autograd.grad(got, x, g), torch.autograd.grad(want, x, g)
    torch.testing.assert_close(got_gx, want_gx)
    assert got_gx.is_contiguous(memory_format=CL)
    assert torch.autograd.gradcheck(lambda t: nhwc.pool3x3_nhwc(t, stride, is_max), (x,))


def test_max_pool3x3_nhwc_ties_and_nan_follow_aten():
    x = _cl(torch.zeros(1, 2, 4, 4)).requires_grad_()  # every window a tie: the first tap wins
    with torch.no_grad():
        x[0, 1, 2, 2] = float("nan")
    want = F.max_pool2d(x, 3, 1, 1)
    got = nhwc.pool3x3_nhwc(x, 1, True)
    torch.testing.assert_close(got, want, equal_nan=True)
    g = torch.rand_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])


def test_pool3x3_nhwc_opcheck_and_bad_arguments():
    x = _cl(torch.randn(2, 16, 7, 9)).requires_grad_()
    for stride in (1, 2):
        for is_max in (True, False):
            torch.library.opcheck(torch.ops.hwnas.pool3x3_nhwc.default, (x, stride, is_max))
    with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
        nhwc.pool3x3_nhwc(x, 3, True)
    with pytest.raises(RuntimeError, match="does not match x"):
        torch.ops.hwnas.pool3x3_nhwc_backward(torch.randn(2, 16, 3, 3), x.detach(), 1, False)
