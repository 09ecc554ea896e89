"""Training the discrete network on the compiled kernels: same loss, gradients and BN statistics as eager."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwnas.config import MacroConfig
from hwnas.space import Genotype
from hwnas.space.network import Network
from hwnas.train import fast_ops
from hwnas.train.fast_ops import fast_training, pointwise

CONVS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
needs_extension = pytest.mark.skipif(not fast_ops.available(), reason="hwnas._C is not built")
needs_nhwc = pytest.mark.skipif(not fast_ops.nhwc_available(), reason="hwnas._C has no channels-last kernels")
FAST_MODES = [pytest.param("compiled", marks=needs_extension), "channels_last", pytest.param("fused", marks=needs_nhwc)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _conv_genotype(resolution: int = 9, channels: int = 4) -> Genotype:
    """Every conv op in both cells, fed by both cell inputs (so the reduction cell strides each of them)."""
    pairs = tuple((CONVS[i % 4], inp) for i, inp in enumerate((0, 1, 1, 0, 0, 2, 1, 3)))
    # odd size by default: stride-2 edges with a padded last row and column
    macro = MacroConfig(C=channels, layers=3, in_channels=1, resolution=resolution, classes=5)
    return Genotype(normal=pairs, reduce=pairs, macro=macro)


def _mixed_genotype(resolution: int, depth: tuple[int, ...] = ()) -> Genotype:
    """Pools, skips (FactorizedReduce after and inside the reduction cell) and convs, at 4 layers."""
    normal = (("sep_conv_3x3", 0), ("skip_connect", 1), ("max_pool_3x3", 2), ("dil_conv_5x5", 0),
              ("avg_pool_3x3", 3), ("sep_conv_5x5", 1), ("skip_connect", 4), ("dil_conv_3x3", 2))
    reduce = (("skip_connect", 0), ("max_pool_3x3", 1), ("sep_conv_3x3", 2), ("avg_pool_3x3", 0),
              ("dil_conv_3x3", 1), ("skip_connect", 3), ("sep_conv_5x5", 4), ("max_pool_3x3", 2))
    macro = MacroConfig(C=8, layers=4, in_channels=1, resolution=resolution, classes=5)
    return Genotype(normal=normal, reduce=reduce, macro=macro, depth=depth)


def _loss_and_grads(net: Network, x: torch.Tensor, y: torch.Tensor, mode: str):
    net.zero_grad(set_to_none=True)
    with fast_training(net, mode) as used:
        loss = F.cross_entropy(net(x), y)
        loss.backward()
    return used, loss.detach(), {n: p.grad for n, p in net.named_parameters()}


@pytest.mark.parametrize(
    "genotype",
    [_conv_genotype(), _mixed_genotype(12), _mixed_genotype(11), _mixed_genotype(12, depth=(1, 0, 0))],
    ids=["convs-9px", "mixed-12px", "mixed-11px", "mixed-12px-last-cell-dropped"],
)
@pytest.mark.parametrize("mode", FAST_MODES)
def test_fast_training_equals_eager_loss_gradients_and_bn_stats(mode: str, genotype: Genotype) -> None:
    torch.manual_seed(0)
    eager = Network(genotype).double().train()
    fast = copy.deepcopy(eager)
    res = genotype.macro.resolution
    x, y = torch.randn(6, 1, res, res, dtype=torch.float64), torch.randint(0, 5, (6,))
    used_eager, loss_e, grads_e = _loss_and_grads(eager, x, y, "eager")
    used_fast, loss_f, grads_f = _loss_and_grads(fast, x, y, mode)
    assert (used_eager, used_fast) == ("eager", mode)
    torch.testing.assert_close(loss_f, loss_e)
    assert grads_f.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], msg=name)
    for (name, a), b in zip(eager.state_dict().items(), fast.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)  # BatchNorm running statistics moved alike
    fast.eval(), eager.eval()
    with fast_training(fast, mode):
        torch.testing.assert_close(fast(x), eager(x))


@pytest.mark.parametrize("mode", FAST_MODES)
def test_fast_training_restores_the_plain_modules(mode: str) -> None:
    net = Network(_mixed_genotype(12))
    with fast_training(net, mode):
        net(torch.randn(2, 1, 12, 12)).sum().backward()
    assert not any("forward" in m.__dict__ or "_hwnas_relu" in m.__dict__ for m in net.modules())  # plain nn again
    assert not net._forward_pre_hooks
    assert all(p.is_contiguous() for p in net.parameters())


def test_without_the_extension_training_stays_eager(monkeypatch) -> None:
    monkeypatch.setattr(fast_ops, "available", lambda: False)
    net = Network(_conv_genotype())
    with fast_training(net, "compiled") as used:
        assert used == "eager" and not any("forward" in m.__dict__ for m in net.modules())
        net(torch.randn(2, 1, 9, 9)).sum().backward()
    with fast_training(net, "fused") as used:  # without the kernels: ATen on channels-last tensors
        assert used == "channels_last" and not any("forward" in m.__dict__ for m in net.modules())
        net(torch.randn(2, 1, 9, 9)).sum().backward()
    with pytest.raises(ValueError, match="training mode"):
        with fast_training(net, "fastest"):
            pass


def test_fused_mode_leaves_a_network_off_the_cpu_to_aten() -> None:
    net = Network(_conv_genotype()).to("meta")  # stands in for a GPU: the channels-last kernels are CPU-only
    with fast_training(net, "fused") as used:
        assert used == "channels_last" and not any("forward" in m.__dict__ for m in net.modules())


def test_pointwise_is_a_1x1_convolution() -> None:
    x, w = torch.randn(3, 5, 4, 6), torch.randn(7, 5, 1, 1)
    torch.testing.assert_close(pointwise(x, w), F.conv2d(x, w), rtol=1e-5, atol=1e-5)


@needs_nhwc
def test_fused_float32_steps_track_eager() -> None:
    """Three SGD steps in float32 at the benchmark's channel counts (channel blocks of 16): same trajectory."""
    torch.manual_seed(0)
    eager = Network(_mixed_genotype(12)).train()
    fast = copy.deepcopy(eager)
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 5, (8,))
    losses = {}
    for name, net, mode in (("eager", eager, "eager"), ("fused", fast, "fused")):
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        with fast_training(net, mode):
            losses[name] = []
            for _ in range(3):
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses[name].append(float(loss.detach()))
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["eager"]), rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), fast.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)


@needs_nhwc
def test_fused_relu_cache_is_per_forward() -> None:
    """A cell output's ReLU is computed once per forward and dropped afterwards (no stale tensors kept)."""
    net = Network(_mixed_genotype(12)).train()
    with fast_training(net, "fused"):
        cache = next(m._hwnas_relu for m in net.modules() if "_hwnas_relu" in m.__dict__)
        calls = []
        real_relu = F.relu
        fast_ops.F.relu = lambda t: calls.append(t) or real_relu(t)
        try:
            net(torch.randn(2, 1, 12, 12))
        finally:
            fast_ops.F.relu = real_relu
        assert not cache.entries
    assert len({id(t) for t in calls}) == len(calls)  # no tensor rectified twice
    # the stem output (both inputs of cell 0) and the inputs of the two stride-2 skip_connects
    # (FactorizedReduce) inside the reduction cells; cells 0-2 emit their output rectified already
    assert len(calls) == 3


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_even_factorized_reduce_gradchecks_and_matches_the_module(layout) -> None:
    """The hand-written backward of the even-size FactorizedReduce (each quarter of x's gradient written once)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    w1, w2 = (torch.randn(2, 3, 1, 1, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(fast_ops._EvenFactorizedReduce.apply, (x, w1, w2))
    want = torch.cat([F.conv2d(x, w1, stride=2), F.conv2d(F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:], w2, stride=2)], 1)
    torch.testing.assert_close(fast_ops._EvenFactorizedReduce.apply(x, w1, w2), want)



@needs_nhwc
def test_fused_mode_pools_only_the_search_spaces_3x3_pools(monkeypatch) -> None:
    """The 3x3 padding-1 pools run on hwnas::pool3x3_nhwc; any other pool keeps its own forward."""
    from hwnas.kernels import nhwc

    calls = []
    monkeypatch.setattr(nhwc, "pool3x3_nhwc", lambda *a: calls.append(a[1:]) or torch.ops.hwnas.pool3x3_nhwc(*a))
    pools = [nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(3, 1, 1, count_include_pad=False),
             nn.MaxPool2d(2), nn.AvgPool2d(3, 1, 1)]  # the last two: another window, another padding rule
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    for pool in pools:
        torch.testing.assert_close(fast_ops._pool_forward_nhwc(pool, x), pool(x))
    assert calls == [(2, True), (1, False)]
    monkeypatch.setattr(nhwc, "HAS_POOL3X3", False)  # an extension built before the pool kernels: ATen's pools
    torch.testing.assert_close(fast_ops._pool_forward_nhwc(pools[0], x), pools[0](x))
    assert len(calls) == 2
