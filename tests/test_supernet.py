import pytest
import torch
import torch.nn.functional as F

from hwnas.config import MacroConfig
from hwnas.space import GENOTYPE_OPS, Genotype, Network, SearchSpace, Supernet
from hwnas.space.supernet import EDGES, NUM_OPS


def test_forward_accepts_any_weight_vectors(tiny_macro):
    net = Supernet(tiny_macro)
    x = torch.randn(2, 1, 8, 8)
    for w in (None, torch.sigmoid(torch.randn(EDGES, NUM_OPS)), torch.zeros(EDGES, NUM_OPS), -torch.rand(EDGES, NUM_OPS)):
        weights = None if w is None else (w, w)
        assert net(x, weights).shape == (2, 10)


def test_bad_weight_shape_is_rejected(tiny_macro):
    net = Supernet(tiny_macro)
    with pytest.raises(ValueError, match="normal edge weights must have shape"):
        net(torch.randn(1, 1, 8, 8), (torch.zeros(3, 8), torch.zeros(EDGES, NUM_OPS)))


def test_alpha_gradients_flow(tiny_macro):
    net = Supernet(tiny_macro)
    F.cross_entropy(net(torch.randn(4, 1, 8, 8)), torch.arange(4)).backward()
    assert net.alphas_normal.grad is not None and net.alphas_normal.grad.abs().sum() > 0
    assert net.alphas_reduce.grad.abs().sum() > 0
    assert len(list(net.weight_parameters())) + 2 == len(list(net.parameters()))


def test_derive_picks_strongest_edges(tiny_macro):
    net = Supernet(tiny_macro)
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[0, 4] = 5.0  # edge 0 -> node 0: sep_conv_3x3
        net.alphas_normal[1, 7] = 4.0  # edge 1 -> node 0: dil_conv_5x5
    g = net.derive()
    assert g.normal[:2] == (("sep_conv_3x3", 0), ("dil_conv_5x5", 1))
    assert all(op in GENOTYPE_OPS for op, _ in g.normal + g.reduce)
    Network(g)  # derived genotypes always build


def test_genotype_weights_match_a_discrete_network_with_same_weights(genotype):
    """With one-hot weights the supernet computes exactly the genotype's sub-network: a `Network` given the
    supernet's weights of the chosen ops gives the same output."""
    net = Supernet(genotype.macro).eval()
    w = net.genotype_weights(genotype)
    assert w[0].sum() == 8 and w[1].sum() == 8
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that a mismatched layer shows
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        for cell in net.cells:  # the supernet's pools end in a BatchNorm the discrete network lacks (DARTS):
            for edge in cell.edges:  # make it the identity, so that the two networks agree exactly
                for op in edge.ops:
                    if isinstance(op, torch.nn.Sequential) and isinstance(op[-1], torch.nn.BatchNorm2d) and len(op) == 2:
                        op[-1].running_mean.zero_()
                        op[-1].running_var.fill_(1 - op[-1].eps)
    discrete = Network(genotype).eval()
    copy_chosen_weights(net, discrete)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        y = net(x, w)
        torch.testing.assert_close(y, discrete(x), rtol=1e-4, atol=1e-5)
        # Changing an unselected op's parameters must not change the output.
        row = int(torch.nonzero(w[0].sum(1) == 0)[0])
        for p in net.cells[0].edges[row].parameters():
            p.add_(1.0)
        assert torch.equal(net(x, w), y)


def copy_chosen_weights(supernet: Supernet, net: Network) -> None:
    """Load each of `net`'s layers from the supernet layer its genotype chose (BatchNorm affine: 1 and 0)."""
    from hwnas.space.ops import PRIMITIVES
    from hwnas.space.supernet import edge_index

    def load(dst: torch.nn.Module, src: torch.nn.Module) -> None:
        missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
        if unexpected:  # only a pool's trailing BatchNorm (made the identity above)
            assert not list(dst.parameters()) and isinstance(src[-1], torch.nn.BatchNorm2d), unexpected
        assert all(k.rsplit(".", 1)[-1] in ("weight", "bias") and
                   isinstance(dst.get_submodule(k.rsplit(".", 1)[0]), torch.nn.BatchNorm2d) for k in missing), missing

    load(net.stem, supernet.stem)
    load(net.classifier, supernet.classifier)
    g = net.genotype
    for cell, scell in zip(net.cells, supernet.cells):
        load(cell.preprocess0, scell.preprocess0)
        load(cell.preprocess1, scell.preprocess1)
        for k, (op, inp) in enumerate(g.reduce if cell.reduction else g.normal):
            load(cell.ops[k], scell.edges[edge_index(k // 2, inp)].ops[PRIMITIVES.index(op)])


def test_dropped_cells_are_skipped_like_the_discrete_network(rng):
    """Cells a genotype's depth drops take no part: their parameters cannot change the output."""
    macro = MacroConfig(C=4, layers=5, resolution=8)
    g = SearchSpace(macro, depth=True).sample(rng)
    g = Genotype(g.normal, g.reduce, macro, depth=(1, 0, 1))
    net = Supernet(macro).eval()
    w, x = net.genotype_weights(g), torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        y = net(x, w, g.active_cells)
        for p in net.cells[2].parameters():  # cell 2 is dropped
            p.add_(1.0)
        assert torch.equal(net(x, w, g.active_cells), y)
        assert not torch.equal(net(x, w), y)  # at full depth it runs
    with pytest.raises(ValueError, match="keep the reduction cells"):
        net(x, w, (True, False, True, True, True))
