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


def test_blocks_of_every_width_decompose_its_network_and_keep_full_width_names(rng):
    """At each elastic width the network's parameters split exactly into that width's fixed parts and edge blocks."""
    from dataclasses import replace

    from hwnas.profiling.blocks import all_widths, fixed_names

    macro = MacroConfig(C=4, layers=5, in_channels=1, resolution=7, classes=10)
    g = SearchSpace(macro).sample(rng)
    fixed, ops = fixed_blocks(macro, g, elastic_width=True), {b.key for b in op_blocks(macro, elastic_width=True)}
    assert len(all_widths()) == 27 and all_widths(False) == [()]
    for width in all_widths():
        narrow = replace(g, width=width)
        names = fixed_names(macro, width)
        total = sum(count_params(fixed[n][0]) for n in names.values())
        for cell in cell_shapes(macro, width):
            for op, inp in g.reduce if cell.reduction else g.normal:
                spec = pair_block(cell, op, inp)
                assert spec.key in ops
                total += count_params(spec.module())
        assert total == count_params(Network(narrow)), width
    # Full width: the same keys and names as a profile measured before elastic width, listed first.
    plain_ops, plain_fixed = [b.key for b in op_blocks(macro)], list(fixed_blocks(macro, g))
    assert [b.key for b in op_blocks(macro, elastic_width=True)][:len(plain_ops)] == plain_ops
    assert list(fixed)[:len(plain_fixed)] == plain_fixed and all("/" not in n for n in plain_fixed)
    assert fixed_names(macro) == {n: n for n in plain_fixed}
    # Other channel counts get their own names; a part whose channels do not change keeps its plain name.
    half = fixed_names(macro, (0.5, 1.0, 1.0))
    assert half["stem"] == "stem" and half["cell0.pre0"] == "cell0.pre0/in12/out2"
    assert half["cell1.pre1"] == "cell1.pre1/in8/out8" and half["cell2.pre0"] == "cell2.pre0/in8/out8"
    assert half["cell3.pre0"] == "cell3.pre0" and half["head"] == "head"
    assert fixed_names(macro, (1.0, 1.0, 0.75))["head"] == "head/in48/out10"
    assert {f"sep_conv_3x3/C{c}/H7/s1" for c in (2, 3, 4)} <= ops  # stage 0 at 0.5, 0.75 and 1.0


def test_fixed_block_shapes_at_a_width_match_a_forward_pass(rng, tiny_macro):
    from dataclasses import replace

    from hwnas.profiling.blocks import fixed_names

    g = replace(SearchSpace(tiny_macro).sample(rng), width=(0.75, 0.5, 1.0))
    net = Network(g).eval()
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, k=f"cell{i}.pre{j}": seen.__setitem__(k, tuple(a[0].shape)))
             for i, cell in enumerate(net.cells) for j, m in enumerate((cell.preprocess0, cell.preprocess1))]
    with torch.no_grad():
        net(torch.zeros(1, tiny_macro.in_channels, tiny_macro.resolution, tiny_macro.resolution))
    for h in hooks:
        h.remove()
    fixed, names = fixed_blocks(tiny_macro, g, elastic_width=True), fixed_names(tiny_macro, g.width)
    assert len(seen) == 2 * tiny_macro.layers
    assert all(fixed[names[part]][1] == shape for part, shape in seen.items())
    for module, shape in fixed.values():
        module.eval()(torch.zeros(*shape))  # every part of every width accepts its recorded input shape
