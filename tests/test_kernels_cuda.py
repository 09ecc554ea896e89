"""CUDA kernels of hwnas._C against the reference: values, mixed precision, opcheck, gradcheck, bad input.

Skipped unless a GPU is present and hwnas._C was built with CUDA (benchmarks/gpu_check.sh runs them).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwnas.kernels.reference import mixed_op_reference
import hwnas.space.supernet as supernet_mod
from hwnas.space import SearchSpace, Supernet
from hwnas.space.supernet import MixedOp

compiled = pytest.importorskip("hwnas.kernels.compiled", reason="hwnas._C is not built")
pytestmark = pytest.mark.skipif(
    not compiled.has_backend("cuda"), reason="needs a GPU and hwnas._C built with CUDA"
)
CUDA = "cuda"
ALL_OPS = 0b11111110


@pytest.fixture(autouse=True)
def _no_tf32():
    """The reference's cuDNN convolutions would round to TF32 on Ampere/Hopper: compare in true fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_pair(channels: int, stride: int, train: bool, dtype=torch.float32) -> tuple[MixedOp, MixedOp]:
    """Two identical CUDA MixedOps with non-trivial running statistics."""
    m = MixedOp(channels, stride).to(device=CUDA, dtype=dtype)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
    m.train(train)
    return m, copy.deepcopy(m)


def forward_backward(fn, module, x, w, stride, grad):
    """(y, grad x, grad w, parameter grads) of fn(x, w, module.ops, stride) with output gradient `grad`."""
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(xi, wi, module.ops, stride)
    y.backward(grad.to(y.dtype))
    params = [p.grad.float() for p in module.parameters() if p.grad is not None]
    return y.detach().float(), xi.grad.float(), wi.grad.float(), params


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """|got - want| <= rel * max|want| elementwise (tolerance scaled to the tensor's magnitude)."""
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), 1e-6)
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} * {scale:.3g}"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (16, 8, 32, 32)], ids=["small", "many-chunks"])
def test_float32_matches_reference(shape, stride, train):
    """Includes a shape whose per-channel reductions span many blocks (the 2-D reduction grid)."""
    fast, ref = make_pair(shape[1], stride, train)
    x = torch.randn(*shape, device=CUDA)
    w = torch.randn(8, device=CUDA).softmax(0)
    ho, wo = (shape[2] + stride - 1) // stride, (shape[3] + stride - 1) // stride
    g = torch.randn(shape[0], shape[1], ho, wo, device=CUDA)
    got = forward_backward(compiled.mixed_op, fast, x, w, stride, g)
    want = forward_backward(mixed_op_reference, ref, x, w, stride, g)
    for name, a, b in zip(("out", "grad x", "grad w"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    for a, b in zip(got[3], want[3]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    for (name, b1), (_, b2) in zip(fast.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b1, b2, rtol=1e-4, atol=1e-5, msg=lambda m: f"buffer {name}: {m}")


@pytest.mark.parametrize("dtype,rel", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("stride", [1, 2])
def test_autocast_matches_float32_reference(stride, dtype, rel):
    """Mixed precision: x and branches in half/bf16, op weights and parameters float32 (what autocast gives)."""
    fast, ref = make_pair(8, stride, train=True)
    x = torch.randn(4, 8, 16, 16, device=CUDA)
    w = torch.randn(8, device=CUDA).softmax(0)
    ho = (16 + stride - 1) // stride
    g = torch.randn(4, 8, ho, ho, device=CUDA)
    with torch.autocast(CUDA, dtype=dtype):
        y, gx, gw, params = forward_backward(compiled.mixed_op, fast, x.to(dtype), w, stride, g)
    y_r, gx_r, gw_r, params_r = forward_backward(mixed_op_reference, ref, x, w, stride, g)
    assert_close_scaled(y, y_r, rel, "out")
    assert_close_scaled(gx, gx_r, rel, "grad x")
    assert_close_scaled(gw, gw_r, rel, "grad w")
    for a, b in zip(params, params_r):
        assert_close_scaled(a, b, 2 * rel, "parameter grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reduced_precision_ops_accumulate_in_float32(dtype):
    """dwconv over 5x5 taps and combine over 64x32x32 positions per channel, against float64 math."""
    x = torch.randn(64, 4, 32, 32, device=CUDA).to(dtype)
    weight = torch.randn(4, 1, 5, 5, device=CUDA)
    want = F.conv2d(F.relu(x.double()), weight.double(), padding=2, groups=4)
    assert_close_scaled(compiled.dwconv(x, weight, 1, 1, True).double(), want, 1e-2, "dwconv")
    _, stats = torch.ops.hwnas.combine(x, torch.ones(8, device=CUDA), [], None, 0b110, 1, True, 1e-5)
    pooled = F.max_pool2d(x.double(), 3, 1, 1)
    torch.testing.assert_close(stats[0].double(), pooled.mean((0, 2, 3)), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(stats[1].double(), pooled.var((0, 2, 3), unbiased=False), rtol=2e-2, atol=1e-2)


def _combine_args(stride: int, training: bool, dtype=torch.float64, requires_grad=False, n=2, c=2):
    x = torch.randn(n, c, 3, 5, dtype=dtype, device=CUDA, requires_grad=requires_grad)
    ho, wo = (3 + stride - 1) // stride, (5 + stride - 1) // stride
    n_branches = 5 if stride == 2 else 4
    branches = [torch.randn(n, c, ho, wo, dtype=dtype, device=CUDA, requires_grad=requires_grad)
                for _ in range(n_branches)]
    weights = torch.randn(8, dtype=dtype, device=CUDA, requires_grad=requires_grad)
    running = None if training else torch.rand(4, c, dtype=dtype, device=CUDA) + 0.5
    return (x, weights, branches, running, ALL_OPS, stride, training, 1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_opcheck(stride):
    opcheck = torch.library.opcheck
    x = torch.randn(2, 3, 7, 9, device=CUDA, requires_grad=True)
    w = torch.randn(3, 1, 5, 5, device=CUDA, requires_grad=True)
    opcheck(torch.ops.hwnas.dwconv.default, (x, w, stride, 2, True))
    g = torch.randn(2, 3, (7 + stride - 1) // stride, (9 + stride - 1) // stride, device=CUDA)
    opcheck(torch.ops.hwnas.dwconv_backward.default, (g, x.detach(), w.detach(), stride, 2, True))
    for training in (True, False):
        opcheck(torch.ops.hwnas.combine.default, _combine_args(stride, training, torch.float32, requires_grad=True))
        detached = _combine_args(stride, training, torch.float32)
        out, stats = torch.ops.hwnas.combine(*detached)
        bw = (torch.randn_like(out), detached[0], detached[1], detached[2], stats, *detached[4:])
        opcheck(torch.ops.hwnas.combine_backward.default, bw)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
def test_float64_gradcheck(stride, training):
    args = _combine_args(stride, training, requires_grad=True)

    def combine(x, weights, *branches):
        return torch.ops.hwnas.combine(x, weights, list(branches), *args[3:])[0]

    # nondet_tol: atomics (ours) and cuDNN (the mixed op's convolutions) need not be bitwise reproducible
    assert torch.autograd.gradcheck(combine, (args[0], args[1], *args[2]), nondet_tol=1e-10)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, device=CUDA, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64, device=CUDA, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: compiled.dwconv(a, b, stride, 2, False), (x, w), nondet_tol=1e-10)
    m, _ = make_pair(2, stride, training, torch.float64)
    wm = torch.randn(8, dtype=torch.float64, device=CUDA, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: compiled.mixed_op(a, b, m.ops, stride), (x, wm), nondet_tol=1e-10)


def test_cpu_tensor_among_cuda_arguments_is_rejected():
    """A CPU tensor must never be read as a device pointer: every argument's device is checked."""
    x, weights, branches, running, active, stride, _, eps = _combine_args(1, False)
    cpu = torch.device("cpu")
    cases = {
        "weights": lambda: torch.ops.hwnas.combine(x, weights.to(cpu), branches, running, active, stride, False, eps),
        "running_stats": lambda: torch.ops.hwnas.combine(x, weights, branches, running.to(cpu), active, stride, False,
                                                         eps),
        "branch": lambda: torch.ops.hwnas.combine(x, weights, branches[:3] + [branches[3].to(cpu)], running, active,
                                                  stride, False, eps),
        "x": lambda: torch.ops.hwnas.combine(x.to(cpu), weights, branches, running, active, stride, False, eps),
        "stats": lambda: torch.ops.hwnas.combine_backward(torch.randn_like(x), x, weights, branches,
                                                          running.to(cpu), active, stride, False, eps),
        "grad_out": lambda: torch.ops.hwnas.combine_backward(torch.randn_like(x).to(cpu), x, weights, branches,
                                                             running, active, stride, False, eps),
        "dw weight": lambda: torch.ops.hwnas.dwconv(x, torch.randn(2, 1, 3, 3, dtype=x.dtype), 1, 1, True),
        "dw grad_out": lambda: torch.ops.hwnas.dwconv_backward(
            torch.randn(x.shape, dtype=x.dtype), x, torch.randn(2, 1, 3, 3, dtype=x.dtype, device=CUDA), 1, 1, True),
    }
    for name, call in cases.items():
        with pytest.raises(RuntimeError, match="cpu|CPU|device|other dtype or device"):
            call()
        torch.cuda.synchronize()  # nothing was launched on a bad pointer
        assert name  # (the loop names the case in the traceback)


@pytest.mark.parametrize("stride", [1, 2])
def test_zero_size_inputs(stride):
    """N = 0 or C = 0: empty results (zero gradients), no launch of a zero-block grid; same as the CPU kernels."""
    active = 0b1110 if stride == 1 else 0b0110  # pools (+ identity): no external branch needed
    for n, c in ((0, 3), (2, 0)):
        x = torch.randn(n, c, 6, 7, device=CUDA)
        w = torch.randn(c, 1, 3, 3, device=CUDA)
        out = compiled.dwconv(x, w, stride, 1, True)
        ho, wo = (6 + stride - 1) // stride, (7 + stride - 1) // stride
        assert out.shape == (n, c, ho, wo)
        gx, gw = torch.ops.hwnas.dwconv_backward(torch.randn_like(out), x, w, stride, 1, True)
        assert gx.shape == x.shape and gw.shape == w.shape and not gw.any()
        for training in (True, False):
            running = torch.rand(4, c, device=CUDA) + 0.5
            y, stats = torch.ops.hwnas.combine(x, torch.randn(8, device=CUDA), [], running, active, stride, training,
                                               1e-5)
            y_cpu, stats_cpu = torch.ops.hwnas.combine(x.cpu(), torch.randn(8), [], running.cpu(), active, stride,
                                                       training, 1e-5)
            assert y.shape == y_cpu.shape == (n, c, ho, wo)
            torch.testing.assert_close(stats.cpu(), stats_cpu, equal_nan=True)
            gx, gw, gb = torch.ops.hwnas.combine_backward(torch.randn_like(y), x, torch.randn(8, device=CUDA), [],
                                                          stats, active, stride, training, 1e-5)
            assert gx.shape == x.shape and gw.shape == (8,) and gb == []
    torch.cuda.synchronize()


def test_supernet_forward_does_not_synchronise(tiny_macro):
    """The skip decision comes from the host: no device-to-host sync anywhere in the supernet forward."""
    net = Supernet(tiny_macro).to(CUDA)
    genotype = SearchSpace(tiny_macro).sample(np.random.default_rng(0))
    weights = net.genotype_weights(genotype)
    x = torch.randn(2, 1, 8, 8, device=CUDA)
    for train in (True, False):  # warm-up: lazy initialisation may synchronise once
        net.train(train)(x, weights)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for train in (True, False):
            net.train(train)
            with torch.set_grad_enabled(train):
                net(x, weights)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # The check can fail: deciding per edge from the device (the old way) does synchronise.
    original = supernet_mod.skip_table
    supernet_mod.skip_table = lambda *w: [None] * len(w)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            net(x, weights)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        supernet_mod.skip_table = original
