"""Supernet and evaluation networks: structure, exact published parameter counts, forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.ops
from torch import nn
from torchvision.ops import stochastic_depth

from nas import GENOTYPES, PRIMITIVES, EvalNetwork, NetworkSpec, SearchNetwork, count_parameters
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

    monkeypatch.setattr(torchvision.ops, "stochastic_depth", recording)  # what the cell calls (imported there)
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


def _spec(**changes: object) -> NetworkSpec:
    fields = dict(genotype=GENOTYPES["DARTS_V2"], in_channels=3, num_classes=10, layers=6, channels=8, stem="cifar")
    fields |= dict(auxiliary=True, image_size=32, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26], dataset="cifar10")
    return NetworkSpec(**(fields | changes))


def test_network_from_spec_is_the_directly_built_network() -> None:
    spec = _spec()
    torch.manual_seed(0)
    built = EvalNetwork.from_spec(spec, drop_path=0.1)
    torch.manual_seed(0)
    direct = EvalNetwork(GENOTYPES["DARTS_V2"], in_channels=3, channels=8, num_classes=10, layers=6, drop_path=0.1)
    assert built.spec is spec and direct.spec is None and built.drop_path_prob == 0.1
    assert count_parameters(built) == count_parameters(direct)
    assert built.state_dict().keys() == direct.state_dict().keys()
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in built.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(built.eval()(x)[0], direct.eval()(x)[0])
    paper = _spec(layers=20, channels=36)
    assert count_parameters(EvalNetwork.from_spec(paper)) == 3_349_342


def test_network_spec_json_round_trip() -> None:
    spec = _spec(stem="imagenet", auxiliary=False, image_size=224)
    dumped = spec.model_dump(mode="json")
    assert dumped["genotype"] == GENOTYPES["DARTS_V2"].to_dict() and dumped["mean"] == [0.49, 0.48, 0.45]
    assert NetworkSpec.model_validate_json(spec.model_dump_json()) == spec
    assert NetworkSpec.model_validate(dumped) == spec
    assert NetworkSpec.model_validate({**dumped, "genotype": str(GENOTYPES["DARTS_V2"])}) == spec
    with pytest.raises(ValueError, match="stem"):
        NetworkSpec.model_validate({**dumped, "stem": "mobile"})


def test_normalise_takes_uint8_and_float_pixels() -> None:
    spec = _spec()
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(spec.normalise(pixels), (pixels / 255 - mean) / std)
    assert torch.allclose(spec.normalise(pixels.numpy()), (pixels / 255 - mean) / std)
    floats = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    got = spec.normalise(floats.numpy())
    assert got.dtype == torch.float32 and torch.allclose(got, ((floats - mean) / std).float(), atol=1e-6)
    gray = _spec(in_channels=1, image_size=8, mean=[0.3], std=[0.2])
    images = np.random.default_rng(0).random((4, 8, 8), dtype=np.float32)  # (N, H, W) for one channel
    assert torch.allclose(gray.normalise(images), (torch.from_numpy(images).unsqueeze(1) - 0.3) / 0.2)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(2, 3, 32, 32, dtype=torch.int64), "dtype torch.int64"),
        (torch.zeros(2, 1, 32, 32), r"got shape \(2, 1, 32, 32\)"),
        (torch.zeros(2, 3, 16, 16), r"\(C, H, W\) = \(3, 32, 32\)"),
        (np.zeros((3, 32, 32), dtype=np.float32), r"got shape \(3, 32, 32\)"),
    ],
)
def test_normalise_refuses_other_dtypes_and_shapes_in_one_line(images: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        _spec().normalise(images)
    assert "\n" not in str(error.value) and "tensor(" not in str(error.value) and "array(" not in str(error.value)


def test_bad_stem_is_rejected() -> None:
    with pytest.raises(ValueError, match="stem"):
        EvalNetwork(GENOTYPES["DARTS_V2"], stem="mobile")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- PC-DARTS


def test_channel_shuffle_interleaves_the_groups() -> None:
    from nas.search_model import channel_shuffle

    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert channel_shuffle(x, 4).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert channel_shuffle(x, 1).flatten().tolist() == list(range(8))
    images = torch.randn(2, 8, 3, 3)
    shuffled = channel_shuffle(images.contiguous(memory_format=torch.channels_last), 4)
    assert torch.equal(shuffled, channel_shuffle(images, 4))
    assert shuffled.is_contiguous(memory_format=torch.channels_last)  # a channels_last network stays so


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_channel_mixed_op_mixes_a_quarter_and_passes_the_rest(stride: int) -> None:
    from nas.search_model import channel_shuffle

    torch.manual_seed(0)
    op = MixedOp(8, stride, PRIMITIVES, partial=4).eval()
    full = MixedOp(2, stride, PRIMITIVES).eval()  # the same candidates on C/K = 2 channels
    full.load_state_dict(op.state_dict())
    x = torch.randn(2, 8, 6, 6)
    w = torch.softmax(torch.randn(len(PRIMITIVES)), dim=0)
    bypass = x[:, 2:] if stride == 1 else nn.functional.max_pool2d(x[:, 2:], 2, 2)
    want = channel_shuffle(torch.cat([full(x[:, :2], w), bypass], dim=1), 4)
    assert torch.allclose(op(x, w), want)
    assert op(x, w).shape == (2, 8, 6 // stride, 6 // stride)
    assert sum(p.numel() for p in op.parameters()) < sum(p.numel() for p in MixedOp(8, stride, PRIMITIVES).parameters())


def test_edge_normalization_adds_beta_that_weighs_the_edges_and_the_derivation() -> None:
    torch.manual_seed(0)
    net = SearchNetwork(
        in_channels=1, channels=8, num_classes=3, layers=3, nodes=2, partial_channels=4, edge_normalization=True
    )
    assert net.alpha_names() == ("alpha.normal", "alpha.reduce", "alpha.beta_normal", "alpha.beta_reduce")
    assert [tuple(a.shape) for a in net.alphas()] == [(5, 8), (5, 8), (5,), (5,)]
    assert {n for n, _ in net.named_weights()}.isdisjoint(net.alpha_names())
    nn.functional.cross_entropy(net(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in net.alphas())
    with torch.no_grad():  # node 1 (edges 2, 3, 4 from c_{k-2}, c_{k-1}, n0) keeps two of its three inputs
        for a in net.alphas():
            a.zero_()
        net.alpha["normal"][2, PRIMITIVES.index("max_pool_3x3")] = 5.0
        net.alpha["normal"][3, PRIMITIVES.index("sep_conv_3x3")] = 1.0
        net.alpha["normal"][4, PRIMITIVES.index("dil_conv_3x3")] = 0.5  # the weakest edge by α
    assert net.genotype().normal[2:4] == (("max_pool_3x3", 0), ("sep_conv_3x3", 1))  # β uniform: α decides
    with torch.no_grad():
        net.alpha["beta_normal"][4] = 3.0  # β weighs the edge from n0 up: it now beats the edge from c_{k-1}
    assert net.genotype().normal[2:4] == (("max_pool_3x3", 0), ("dil_conv_3x3", 2))


def test_pc_darts_search_steps_and_its_speed_path_equals_the_plain_path() -> None:
    from nas.config import SearchConfig, SpeedConfig
    from nas.search import Searcher
    from nas.search_model import PLAIN

    def three_steps(speed: SpeedConfig) -> list[torch.Tensor]:
        cfg = SearchConfig(layers=3, channels=8, nodes=2, partial_channels=4, edge_normalization=True, speed=speed)
        torch.manual_seed(0)
        searcher = Searcher(cfg, in_channels=1, num_classes=3)
        gen = torch.Generator().manual_seed(1)
        start = [a.detach().clone() for a in searcher.network.alphas()]
        for _ in range(3):
            x_w, x_a = (torch.randn(8, 1, 8, 8, generator=gen) for _ in range(2))
            y_w, y_a = (torch.randint(0, 3, (8,), generator=gen) for _ in range(2))
            searcher.step(x_w, y_w, x_a, y_a)
        assert searcher.architect.second_order_steps == 3
        assert all(not torch.equal(s, a) for s, a in zip(start, searcher.network.alphas()))  # β moves too
        return [a.detach().clone() for a in searcher.network.alphas()] + [
            p.detach() for p in searcher.network.weights()
        ]

    for got, want in zip(three_steps(SpeedConfig()), three_steps(PLAIN)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_partial_channels_must_divide_the_channels() -> None:
    from nas.config import SearchConfig

    with pytest.raises(ValueError, match="multiple of partial_channels"):
        SearchConfig(channels=6, partial_channels=4)
