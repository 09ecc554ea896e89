import torch

from hwnas.config import MacroConfig
from hwnas.profiling.blocks import cell_shapes, fixed_blocks, op_blocks, pair_block
from hwnas.space import Network, SearchSpace, count_params


def test_blocks_decompose_the_network_exactly(rng):
    # Every parameter of a network lives in exactly one fixed part or one edge block: the decomposition is complete.
    macro = MacroConfig(C=4, layers=4, in_channels=1, resolution=7, classes=10)  # odd resolution, two reductions
    g = SearchSpace(macro).sample(rng)
    fixed = fixed_blocks(macro, g)
    total = sum(count_params(m) for m, _ in fixed.values())
    for cell in cell_shapes(macro):
        for op, inp in g.reduce if cell.reduction else g.normal:
            spec = pair_block(cell, op, inp)
            assert spec.key in {b.key for b in op_blocks(macro)}
            total += count_params(spec.module())
    assert total == count_params(Network(g))


def test_fixed_block_shapes_match_a_forward_pass(rng, tiny_macro):
    g = SearchSpace(tiny_macro).sample(rng)
    net = Network(g).eval()
    seen = {}
    hooks = [cell.preprocess1.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, tuple(a[0].shape)))
             for i, cell in enumerate(net.cells)]
    with torch.no_grad():
        net(torch.zeros(1, tiny_macro.in_channels, tiny_macro.resolution, tiny_macro.resolution))
    for h in hooks:
        h.remove()
    fixed = fixed_blocks(tiny_macro, g)
    assert all(fixed[f"cell{i}.pre1"][1] == shape for i, shape in seen.items())
    for module, shape in fixed.values():
        module.eval()(torch.zeros(*shape))  # every part accepts its recorded input shape
