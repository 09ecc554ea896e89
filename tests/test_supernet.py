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
    """With one-hot weights the supernet computes exactly the genotype's sub-network."""
    net = Supernet(genotype.macro).eval()
    w = net.genotype_weights(genotype)
    assert w[0].sum() == 8 and w[1].sum() == 8
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        y = net(x, w)
    assert torch.isfinite(y).all()
    # Changing an unselected op's parameters must not change the output.
    row = int(torch.nonzero(w[0].sum(1) == 0)[0])
    with torch.no_grad():
        for p in net.cells[0].edges[row].parameters():
            p.add_(1.0)
        assert torch.equal(net(x, w), y)


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
