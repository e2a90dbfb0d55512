"""Supernet and evaluation networks: structure, exact published parameter counts, forward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import stochastic_depth

import nas.eval_model
from nas import GENOTYPES, PRIMITIVES, EvalNetwork, SearchNetwork, count_parameters
from nas.eval_model import EvalCell
from nas.search_model import MixedOp, num_edges, reduction_layers


def test_cifar_darts_v2_has_the_papers_3_3m_parameters() -> None:
    net = EvalNetwork(GENOTYPES["DARTS_V2"], channels=36, num_classes=10, layers=20, auxiliary=True)
    assert count_parameters(net) == 3_349_342


def test_imagenet_darts_v2_has_the_papers_4_7m_parameters_and_runs_224() -> None:
    net = EvalNetwork(GENOTYPES["DARTS_V2"], channels=48, num_classes=1000, layers=14, auxiliary=True, stem="imagenet")
    assert count_parameters(net) == 4_718_752
    net.train()
    logits, aux = net(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 1000) and aux is not None and aux.shape == (2, 1000)


def test_search_supernet_has_1_93m_weights_and_alpha_apart() -> None:
    net = SearchNetwork(in_channels=3, channels=16, num_classes=10, layers=8)
    assert sum(p.numel() for p in net.weights()) == 1_930_618
    alphas = list(net.alphas())
    assert [a.shape for a in alphas] == [(14, 8), (14, 8)]
    weight_ids = {id(p) for p in net.weights()}
    assert not weight_ids & {id(a) for a in alphas}
    assert len(weight_ids) + 2 == len(list(net.parameters()))


def test_mixed_op_is_the_softmax_weighted_sum_of_eq_1() -> None:
    torch.manual_seed(0)
    op = MixedOp(4, 1, PRIMITIVES).eval()
    x = torch.randn(2, 4, 6, 6)
    w = torch.softmax(torch.randn(len(PRIMITIVES)), dim=0)
    want = sum(w[i] * o(x) for i, o in enumerate(op.ops))
    assert torch.allclose(op(x, w), want)
    one_hot = torch.zeros(len(PRIMITIVES))
    one_hot[PRIMITIVES.index("skip_connect")] = 1.0
    assert torch.equal(op(x, one_hot), x)


def test_search_network_layout_and_alpha_drive_the_output() -> None:
    torch.manual_seed(0)
    net = SearchNetwork(in_channels=1, channels=4, num_classes=5, layers=5, nodes=3).eval()
    assert reduction_layers(5) == (1, 3) and reduction_layers(8) == (2, 5)
    assert [c.reduction for c in net.cells] == [False, True, False, True, False]
    assert len(net.cells[0].edges) == num_edges(3) == 9
    x = torch.randn(2, 1, 8, 8)
    before = net(x)
    with torch.no_grad():
        net.alpha_normal[:, PRIMITIVES.index("sep_conv_3x3")] += 5.0
    assert not torch.allclose(before, net(x))


def test_genotype_from_supernet_follows_alpha() -> None:
    net = SearchNetwork(in_channels=1, channels=4, num_classes=3, layers=2, nodes=4)
    with torch.no_grad():
        net.alpha_normal.zero_()
        net.alpha_normal[:, PRIMITIVES.index("dil_conv_5x5")] = 3.0
    g = net.genotype()
    assert {op for op, _ in g.normal} == {"dil_conv_5x5"}
    assert g.normal_concat == (2, 3, 4, 5)


@pytest.mark.parametrize("name", sorted(GENOTYPES))
def test_every_zoo_genotype_builds_and_trains_a_step(name: str) -> None:
    torch.manual_seed(0)
    net = EvalNetwork(GENOTYPES[name], in_channels=3, channels=8, num_classes=10, layers=6, drop_path=0.2)
    logits, aux = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and aux.shape == (2, 10)
    (logits.sum() + aux.sum()).backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if "auxiliary" not in n)
    net.eval()
    logits, aux = net(torch.randn(2, 3, 32, 32))
    assert aux is None


def test_no_auxiliary_head_when_disabled() -> None:
    net = EvalNetwork(GENOTYPES["DARTS_V2"], channels=8, layers=6, auxiliary=False)
    assert net.auxiliary_head is None
    assert net(torch.randn(2, 3, 32, 32))[1] is None


def test_drop_path_zeroes_whole_samples_and_keeps_the_mean() -> None:
    """The cells' drop path (torchvision's stochastic depth, by rows): whole samples zeroed, survivors / (1 - p)."""
    torch.manual_seed(0)
    x = torch.ones(4000, 2, 3, 3)
    y = stochastic_depth(x, 0.3, mode="row", training=True)
    per_sample = y.flatten(1)
    assert torch.all((per_sample == 0) | torch.isclose(per_sample, torch.tensor(1 / 0.7)))
    assert torch.all((per_sample == 0).all(1) | (per_sample != 0).all(1))
    assert abs(float(y.mean()) - 1.0) < 0.05
    assert torch.equal(stochastic_depth(x, 0.0, mode="row", training=True), x)


def test_cells_drop_paths_of_every_op_but_identity_and_only_in_training(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[float, str, bool]] = []

    def recording(x: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
        calls.append((p, mode, training))
        return stochastic_depth(x, p, mode, training)

    monkeypatch.setattr(nas.eval_model, "stochastic_depth", recording)
    genotype = GENOTYPES["DARTS_V2"]  # two skip_connect edges in the normal cell: identities at stride 1
    cell = EvalCell(genotype, 8, 8, 4, reduction=False, reduction_prev=False)
    identities = sum(isinstance(op, nn.Identity) for op in cell.ops)
    assert identities == sum(op == "skip_connect" for op, _ in genotype.normal) == 2
    x = torch.randn(2, 8, 6, 6)
    cell.train()(x, x, 0.3)
    assert calls == [(0.3, "row", True)] * (len(cell.ops) - identities)
    calls.clear()
    cell(x, x, 0.0)
    cell.eval()(x, x, 0.3)
    assert calls == []


def test_bad_stem_is_rejected() -> None:
    with pytest.raises(ValueError, match="stem"):
        EvalNetwork(GENOTYPES["DARTS_V2"], stem="mobile")  # type: ignore[arg-type]
