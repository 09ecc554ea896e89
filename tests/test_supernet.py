import pytest
import torch
import torch.nn.functional as F

from hwnas.config import MacroConfig
from hwnas.space import GENOTYPE_OPS, Genotype, Network, SearchSpace, Supernet
from hwnas.space.supernet import EDGES, NUM_OPS, MixedOp


def test_forward_accepts_any_weight_vectors(tiny_macro):
    net = Supernet(tiny_macro)
    x = torch.randn(2, 1, 8, 8)
    for w in (None, torch.sigmoid(torch.randn(EDGES, NUM_OPS)), torch.zeros(EDGES, NUM_OPS), -torch.rand(EDGES, NUM_OPS)):
        weights = None if w is None else (w, w)
        assert net(x, weights).shape == (2, 10)


def test_every_candidate_op_starts_channel_aligned(tiny_macro):
    """At initialisation each candidate of an edge keeps channel c in channel c, as pools and skip do, so that a
    single-path step that switches the edge's op does not scramble the features the next layer reads."""
    net = Supernet(tiny_macro).eval()
    edges = [m for m in net.modules() if isinstance(m, MixedOp)]
    assert {e.stride for e in edges} == {1, 2}
    for edge in edges:
        c = edge.ops[1][1].num_features
        # per-channel constant images: every op, whatever its stride or shift, sees the same value per channel
        x = torch.randn(64, c, 1, 1).expand(64, c, 8, 8) + 0.01 * torch.randn(64, c, 8, 8)
        ref = x[:, :, 0, 0].T  # (c, N)
        for k in range(1, NUM_OPS):
            with torch.no_grad():
                y = edge.ops[k](x)[:, :, 1, 1].T  # an interior position
            corr = torch.corrcoef(torch.cat([y, ref]))[:c, c:]  # output channel x input channel
            assert torch.equal(corr.argmax(1), torch.arange(c)), (edge.stride, k)
            assert corr.diagonal().min() > 0.5, (edge.stride, k)


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


def _per_edge_skips(monkeypatch) -> None:
    """Make the supernet decide skips per edge from the weights (the behaviour before skip_table)."""
    import hwnas.space.supernet as supernet_mod

    monkeypatch.setattr(supernet_mod, "skip_table", lambda *w: [None] * len(w))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_host_skip_table_gives_identical_results(tiny_macro, genotype, monkeypatch, backend):
    """Skip decisions made once per forward on the host: same outputs, gradients and BN buffers as per edge."""
    torch.manual_seed(0)
    net = Supernet(tiny_macro)
    net.set_backend(backend)
    other = Supernet(tiny_macro)
    other.load_state_dict(net.state_dict())
    other.set_backend(backend)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    weights = net.genotype_weights(genotype)
    losses = [F.cross_entropy(net(x, weights), y)]
    with monkeypatch.context() as m:
        _per_edge_skips(m)
        losses.append(F.cross_entropy(other(x, weights), y))
    for loss, model in zip(losses, (net, other)):
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    for (name, a), (_, b) in zip(net.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, p), (_, q) in zip(net.named_parameters(), other.named_parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name


def test_skip_table_reads_the_device_at_most_once(tiny_macro, genotype, monkeypatch):
    """Genotype weights carry their zero pattern: no read; other weights: one read for the whole forward."""
    from hwnas.kernels import reference

    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real_tolist(t))
    net = Supernet(tiny_macro)
    x = torch.randn(2, 1, 8, 8)
    weights = net.genotype_weights(genotype)
    reads.clear()
    with torch.no_grad():
        net(x, weights)
        assert reads == []
        net(x, tuple(w.clone() for w in weights))  # unmarked: one transfer of both matrices
        assert reads == [(2 * EDGES * NUM_OPS,)]
        reads.clear()
        net(x, None)  # softmax weights without a gradient: also once
        assert len(reads) == 1
    reads.clear()
    net(x, None)  # the weights need a gradient: nothing to skip, nothing read
    assert reads == []
    assert reference.skip_table(weights[0])[0][0][0] is True  # "none" always has weight 0
    weights[0][0, 0] = 0.5  # changed in place: the mark no longer holds
    assert reference.skip_table(weights[0])[0][0][0] is False


def test_skip_table_matches_skippable():
    from hwnas.kernels.reference import skip_table, skippable

    w = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.25]])
    assert skip_table(w) == [[skippable(w[0]), skippable(w[1])]] == [[[True, False, True], [False, True, False]]]
    assert skip_table(w.requires_grad_()) == [None]
    with torch.no_grad():
        assert skip_table(w, w * 0) == [[[True, False, True], [False, True, False]], [[True] * 3, [True] * 3]]


def _copy_sliced(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Load a discrete layer from the leading channels of a supernet layer (what elastic width shares)."""
    from hwnas.space.elastic import block_channels
    from hwnas.space.ops import FactorizedReduce

    def conv(d, s):
        out, c_in = d.weight.shape[:2]
        w = s.weight[:out]
        d.weight.copy_(w if d.groups > 1 else w[:, block_channels(s.in_channels, s.in_blocks, c_in)])

    def bn(d, s, idx):
        d.running_mean.copy_(s.running_mean[idx])
        d.running_var.copy_(s.running_var[idx])
        if s.affine:
            d.weight.copy_(s.weight[idx])
            d.bias.copy_(s.bias[idx])

    if isinstance(dst, FactorizedReduce):  # its BatchNorm holds [conv_1's | conv_2's] channels
        conv(dst.conv_1, src.conv_1)
        conv(dst.conv_2, src.conv_2)
        a, b, half = dst.conv_1.out_channels, dst.conv_2.out_channels, src.conv_1.out_channels
        bn(dst.bn, src.bn, torch.cat([torch.arange(a), torch.arange(half, half + b)]))
        return
    for d, s in zip(dst.modules(), src.modules()):
        if isinstance(d, torch.nn.Conv2d):
            conv(d, s)
        elif isinstance(d, torch.nn.BatchNorm2d):
            bn(d, s, slice(0, d.num_features))


def _sliced_network(supernet: Supernet, g: Genotype) -> Network:
    """Network(g) holding the supernet's weights of g's ops at g's width."""
    from hwnas.space.elastic import block_channels
    from hwnas.space.ops import PRIMITIVES
    from hwnas.space.supernet import edge_index

    net = Network(g)
    with torch.no_grad():
        _copy_sliced(net.stem, supernet.stem)
        for cell, scell in zip(net.cells, supernet.cells):
            if not hasattr(cell, "ops"):
                continue  # dropped by the depth
            _copy_sliced(cell.preprocess0, scell.preprocess0)
            _copy_sliced(cell.preprocess1, scell.preprocess1)
            for k, (op, inp) in enumerate(g.reduce if cell.reduction else g.normal):
                _copy_sliced(cell.ops[k], scell.edges[edge_index(k // 2, inp)].ops[PRIMITIVES.index(op)])
        cols = block_channels(supernet.classifier.in_features, 4, net.classifier.in_features)
        net.classifier.weight.copy_(supernet.classifier.weight[:, cols])
        net.classifier.bias.copy_(supernet.classifier.bias)
    return net


WIDE_OPS = ("skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("training", [False, True])
def test_supernet_at_a_width_equals_the_network_at_that_width_with_the_same_weights(rng, backend, training):
    """Elastic width: the supernet run at a genotype's width (leading channels of its weights) computes what
    Network(genotype) computes with those weights, at every width, with cells dropped too, in eval mode and in
    training mode (batch statistics). Pools are left out: the supernet's end in a BatchNorm the network lacks."""
    macro = MacroConfig(C=8, layers=5, resolution=8)
    supernet = Supernet(macro)
    supernet.set_backend(backend)
    with torch.no_grad():
        for m in supernet.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    space = SearchSpace(macro, depth=True, width=True)
    widths = set()
    for _ in range(6):
        g = space.sample(rng)
        cells = [tuple((WIDE_OPS[rng.integers(len(WIDE_OPS))], i) for _, i in c) for c in (g.normal, g.reduce)]
        g = Genotype(cells[0], cells[1], macro, depth=g.depth, width=g.width)
        widths.add(g.width)
        net = _sliced_network(supernet, g)
        supernet.train(training)
        net.train(training)
        x = torch.randn(4, 1, 8, 8)
        with torch.no_grad():
            y = supernet(x, supernet.genotype_weights(g), g.active_cells, g.cell_channels)
            torch.testing.assert_close(y, net(x), rtol=1e-4, atol=1e-5)
    assert len(widths) > 2


def test_a_narrow_step_trains_only_the_leading_channels(rng):
    """Gradients and BatchNorm statistics of a narrow single-path step reach the shared weights' leading
    channels only; channels outside every kept slice are untouched."""
    macro = MacroConfig(C=8, layers=3, resolution=8)
    supernet = Supernet(macro).train()
    g = SearchSpace(macro, width=True).sample(rng)
    g = Genotype(g.normal, g.reduce, macro, width=(0.5, 0.5, 0.5))
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    F.cross_entropy(supernet(torch.randn(4, 1, 8, 8), supernet.genotype_weights(g), None, g.cell_channels),
                    torch.tensor([0, 1, 2, 3])).backward()
    cell0 = supernet.cells[0]
    pre = cell0.preprocess1.op
    assert pre[1].weight.grad[4:].abs().sum() == 0 and pre[1].weight.grad[:4].abs().sum() > 0
    assert torch.equal(pre[2].running_mean[4:], before["cells.0.preprocess1.op.2.running_mean"][4:])
    assert not torch.equal(pre[2].running_mean[:4], before["cells.0.preprocess1.op.2.running_mean"][:4])
    head = supernet.classifier.weight.grad.reshape(10, 4, 32)  # 4 node blocks of the last cell's 32 channels
    assert head[:, :, 16:].abs().sum() == 0 and head[:, :, :16].abs().sum() > 0
    with pytest.raises(ValueError, match="channels must give each of the 3 cells"):
        supernet(torch.randn(1, 1, 8, 8), supernet.genotype_weights(g), None, (4, 8))
