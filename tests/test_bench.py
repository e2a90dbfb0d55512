"""bench/ helpers: the analytic FLOP count against torch's FlopCounterMode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from nas import GENOTYPES, EvalNetwork, SearchNetwork
from nas.ops import PRIMITIVES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.flops import counted_flops, eval_network_flops, supernet_flops  # noqa: E402


@pytest.mark.parametrize(
    ("layers", "channels", "nodes", "size", "primitives"),
    [(3, 4, 2, 8, PRIMITIVES), (5, 6, 4, 9, PRIMITIVES), (4, 4, 3, 12, ("none", "skip_connect", "conv_7x1_1x7"))],
)
def test_supernet_flops_match_the_flop_counter(layers: int, channels: int, nodes: int, size: int, primitives) -> None:  # noqa: ANN001
    net = SearchNetwork(2, channels, 7, layers, nodes, primitives).eval()
    want = counted_flops(net, torch.randn(1, 2, size, size))
    assert supernet_flops(2, channels, 7, layers, nodes, primitives, input_size=size) == want


@pytest.mark.parametrize("name", ["DARTS_V2", "PC_DARTS", "NASNet"])
def test_eval_network_flops_match_the_flop_counter(name: str) -> None:
    net = EvalNetwork(GENOTYPES[name], in_channels=3, channels=8, num_classes=10, layers=5).eval()
    want = counted_flops(net, torch.randn(1, 3, 16, 16))
    assert eval_network_flops(GENOTYPES[name], 3, 8, 10, 5, input_size=16) == want
