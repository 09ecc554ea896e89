import pytest
import torch

from hwnas.config import MacroConfig
from hwnas.profiling.onnx_io import export_onnx, verify_onnx
from hwnas.space import Genotype, Network, SearchSpace, count_params


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


def test_dropped_cells_leave_no_op_and_the_export_matches(rng, tmp_path):
    from hwnas.search.problem import ParamsCounter
    from hwnas.space.network import SkippedCell

    macro = MacroConfig(C=4, layers=5, in_channels=1, resolution=8, classes=10)
    full = SearchSpace(macro).sample(rng)
    shallow = Genotype(full.normal, full.reduce, macro, depth=(1, 0, 0))
    net = Network(shallow).eval()
    assert [isinstance(c, SkippedCell) for c in net.cells] == [False, False, True, False, True]
    assert count_params(net) < count_params(Network(full))
    assert ParamsCounter(macro)([shallow, full]).tolist() == [count_params(net) / 1e6, count_params(Network(full)) / 1e6]
    path = export_onnx(net, tmp_path / "shallow.onnx", (1, 1, 8, 8))
    assert verify_onnx(path, net, torch.randn(3, 1, 8, 8)) <= 1e-4
    with pytest.raises(ValueError, match="is for 5 layers"):
        Network(shallow, MacroConfig(C=4, layers=8, resolution=8))


def test_width_sets_each_stage_s_channels_params_and_export(rng, tmp_path):
    from hwnas.search.problem import ParamsCounter

    macro = MacroConfig(C=8, layers=5, in_channels=1, resolution=8, classes=10)
    space = SearchSpace(macro, depth=True, width=True)
    counter = ParamsCounter(macro)
    for g in (space.sample(rng) for _ in range(20)):
        assert counter.count(g) == count_params(Network(g))
    g = space.sample(rng)
    narrow = Genotype(g.normal, g.reduce, macro, depth=(1, 0, 1), width=(0.5, 0.75, 0.5))
    net = Network(narrow).eval()
    assert [c.preprocess1.op[1].out_channels for c in net.cells if hasattr(c, "ops")] == [4, 12, 16, 16]
    assert net.classifier.in_features == 4 * 16
    assert count_params(net) < count_params(Network(Genotype(g.normal, g.reduce, macro, depth=(1, 0, 1))))
    path = export_onnx(net, tmp_path / "narrow.onnx", (1, 1, 8, 8))
    assert verify_onnx(path, net, torch.randn(3, 1, 8, 8)) <= 1e-4
