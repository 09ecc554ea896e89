import pytest
import torch

from hwnas.config import MacroConfig
from hwnas.profiling.onnx_io import export_onnx, verify_onnx
from hwnas.space import Network, SearchSpace, count_params


@pytest.mark.parametrize("resolution", [8, 7])
def test_network_output_shape_and_params(tiny_macro, rng, resolution):
    macro = MacroConfig(C=4, layers=3, in_channels=1, resolution=resolution, classes=10)
    net = Network(SearchSpace(macro).sample(rng))
    assert net(torch.randn(2, 1, resolution, resolution)).shape == (2, 10)
    assert count_params(net) > 0


def test_network_exports_to_onnx_and_matches_torch(genotype, tmp_path):
    net = Network(genotype).eval()
    # Non-trivial BatchNorm statistics so the comparison is not between two near-zero outputs.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    macro = genotype.macro
    path = export_onnx(net, tmp_path / "net.onnx", (1, macro.in_channels, macro.resolution, macro.resolution))
    x = torch.randn(3, macro.in_channels, macro.resolution, macro.resolution)  # batch 3: dynamic axis
    assert verify_onnx(path, net, x) <= 1e-4
