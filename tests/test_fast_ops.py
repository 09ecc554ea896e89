"""Training the discrete network on the compiled kernels: same loss, gradients and BN statistics as eager."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hwnas.config import MacroConfig
from hwnas.space import Genotype
from hwnas.space.network import Network
from hwnas.train import fast_ops
from hwnas.train.fast_ops import fast_training, pointwise

CONVS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
needs_extension = pytest.mark.skipif(not fast_ops.available(), reason="hwnas._C is not built")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _conv_genotype() -> Genotype:
    """Every conv op in both cells, fed by both cell inputs (so the reduction cell strides each of them)."""
    pairs = tuple((CONVS[i % 4], inp) for i, inp in enumerate((0, 1, 1, 0, 0, 2, 1, 3)))
    macro = MacroConfig(C=4, layers=3, in_channels=1, resolution=9, classes=5)  # odd size: stride-2 edges
    return Genotype(normal=pairs, reduce=pairs, macro=macro)


def _loss_and_grads(net: Network, x: torch.Tensor, y: torch.Tensor, mode: str):
    net.zero_grad(set_to_none=True)
    with fast_training(net, mode) as used:
        loss = F.cross_entropy(net(x), y)
        loss.backward()
    return used, loss.detach(), {n: p.grad for n, p in net.named_parameters()}


@pytest.mark.parametrize("mode", [pytest.param("compiled", marks=needs_extension), "channels_last"])
def test_fast_training_equals_eager_loss_gradients_and_bn_stats(mode: str) -> None:
    torch.manual_seed(0)
    eager = Network(_conv_genotype()).double().train()
    fast = copy.deepcopy(eager)
    x, y = torch.randn(6, 1, 9, 9, dtype=torch.float64), torch.randint(0, 5, (6,))
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


@pytest.mark.parametrize("mode", [pytest.param("compiled", marks=needs_extension), "channels_last"])
def test_fast_training_restores_the_plain_modules(mode: str) -> None:
    net = Network(_conv_genotype())
    with fast_training(net, mode):
        net(torch.randn(2, 1, 9, 9)).sum().backward()
    assert not any("forward" in m.__dict__ for m in net.modules())  # export sees plain nn ops again
    assert not net._forward_pre_hooks
    assert all(p.is_contiguous() for p in net.parameters())


def test_without_the_extension_training_stays_eager(monkeypatch) -> None:
    monkeypatch.setattr(fast_ops, "available", lambda: False)
    net = Network(_conv_genotype())
    with fast_training(net, "compiled") as used:
        assert used == "eager" and not any("forward" in m.__dict__ for m in net.modules())
        net(torch.randn(2, 1, 9, 9)).sum().backward()
    with pytest.raises(ValueError, match="training mode"):
        with fast_training(net, "fastest"):
            pass


def test_pointwise_is_a_1x1_convolution() -> None:
    x, w = torch.randn(3, 5, 4, 6), torch.randn(7, 5, 1, 1)
    torch.testing.assert_close(pointwise(x, w), F.conv2d(x, w), rtol=1e-5, atol=1e-5)
