"""Analytic FLOPs of one forward pass of the DARTS supernet and of an evaluation network, per image.

Counted as torch's ``FlopCounterMode`` counts: 2 FLOPs per multiply-accumulate of the convolutions and the
classifier (the matmul-like work). Batch norm, ReLU, pooling and the weighted sums of the mixed ops are memory-bound
elementwise work and are not counted. ``check_against_flop_counter`` compares these formulas with the counter.

    python bench/flops.py                 # the paper's supernet (8 cells, C=16, 32x32) and DARTS_V2 (20 cells, C=36)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from nas.eval_model import image_flops
from nas.genotypes import GENOTYPES, Genotype
from nas.ops import PRIMITIVES
from nas.search_model import reduction_layers


def conv_flops(c_in: int, c_out: int, kernel: int | tuple[int, int], out_h: int, out_w: int, groups: int = 1) -> int:
    """2 · C_out · H_out · W_out · (C_in / groups) · k_h · k_w."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return 2 * c_out * out_h * out_w * (c_in // groups) * kh * kw


def out_size(size: int, stride: int) -> int:
    """Spatial size after a 'same'-padded op of this stride (every op of the search space pads so)."""
    return (size - 1) // stride + 1


def op_flops(name: str, channels: int, size: int, stride: int) -> int:
    """One candidate operation on a ``channels`` × ``size`` × ``size`` input."""
    c, o = channels, out_size(size, stride)
    if name in ("none", "max_pool_3x3", "avg_pool_3x3") or (name == "skip_connect" and stride == 1):
        return 0
    if name == "skip_connect":  # FactorizedReduce(C, C): two stride-2 1x1 convs to C/2 each
        return 2 * conv_flops(c, c // 2, 1, o, o)
    if name.startswith(("sep_conv_", "dil_conv_")):
        k = int(name[-1])
        separable = conv_flops(c, c, k, o, o, groups=c) + conv_flops(c, c, 1, o, o)  # depthwise + pointwise
        return 2 * separable if name.startswith("sep_conv_") else separable
    if name == "conv_7x1_1x7":
        return conv_flops(c, c, (1, 7), size, o) + conv_flops(c, c, (7, 1), o, o)
    raise KeyError(f"no FLOP formula for operation {name!r}")


def preprocess_flops(c_prev_prev: int, c_prev: int, channels: int, size: int, reduction_prev: bool) -> int:
    """The two 1x1 input convolutions of a cell (FactorizedReduce for s0 after a reduction); ``size`` is s1's."""
    # FactorizedReduce: two stride-2 convs to C/2 from an input of twice the size; output ``size``.
    p0 = 2 * conv_flops(c_prev_prev, channels // 2, 1, size, size) if reduction_prev else None
    return (p0 if p0 is not None else conv_flops(c_prev_prev, channels, 1, size, size)) + conv_flops(
        c_prev, channels, 1, size, size
    )


def supernet_flops(
    in_channels: int = 3,
    channels: int = 16,
    num_classes: int = 10,
    layers: int = 8,
    nodes: int = 4,
    primitives: Sequence[str] = PRIMITIVES,
    stem_multiplier: int = 3,
    input_size: int = 32,
) -> int:
    """Forward FLOPs per image of :class:`nas.search_model.SearchNetwork` (every op on every edge)."""
    size = input_size
    c_curr = stem_multiplier * channels
    total = conv_flops(in_channels, c_curr, 3, size, size)
    c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
    reductions, reduction_prev = reduction_layers(layers), False
    for i in range(layers):
        reduction = i in reductions
        if reduction:
            c_curr *= 2
        total += preprocess_flops(c_prev_prev, c_prev, c_curr, size, reduction_prev)
        node_size = out_size(size, 2) if reduction else size  # intermediate nodes are at the cell's output size
        for node in range(nodes):
            for j in range(2 + node):
                stride, at = (2, size) if reduction and j < 2 else (1, node_size)
                total += sum(op_flops(name, c_curr, at, stride) for name in primitives)
        if reduction:
            size = out_size(size, 2)
        reduction_prev = reduction
        c_prev_prev, c_prev = c_prev, nodes * c_curr
    return total + 2 * c_prev * num_classes


def eval_network_flops(
    genotype: Genotype,
    in_channels: int = 3,
    channels: int = 36,
    num_classes: int = 10,
    layers: int = 20,
    stem_multiplier: int = 3,
    input_size: int = 32,
) -> int:
    """Forward FLOPs per image of :class:`nas.eval_model.EvalNetwork` (CIFAR stem; the auxiliary head, a
    training-only branch, is not counted)."""
    size = input_size
    c_curr = stem_multiplier * channels
    total = conv_flops(in_channels, c_curr, 3, size, size)
    c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
    reductions, reduction_prev = reduction_layers(layers), False
    for i in range(layers):
        reduction = i in reductions
        if reduction:
            c_curr *= 2
        edges, concat = (
            (genotype.reduce, genotype.reduce_concat) if reduction else (genotype.normal, genotype.normal_concat)
        )
        total += preprocess_flops(c_prev_prev, c_prev, c_curr, size, reduction_prev)
        node_size = out_size(size, 2) if reduction else size  # intermediate nodes are at the cell's output size
        for name, index in edges:
            stride, at = (2, size) if reduction and index < 2 else (1, node_size)
            total += op_flops(name, c_curr, at, stride)
        if reduction:
            size = out_size(size, 2)
        reduction_prev = reduction
        c_prev_prev, c_prev = c_prev, len(concat) * c_curr
    return total + 2 * c_prev * num_classes


def counted_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """What ``torch.utils.flop_counter.FlopCounterMode`` counts for one forward pass on one image shaped as ``x``'s."""
    return image_flops(model, x.shape[1], x.shape[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--genotype", default="DARTS_V2")
    parser.add_argument("--eval-layers", type=int, default=20)
    parser.add_argument("--eval-channels", type=int, default=36)
    args = parser.parse_args(argv)
    supernet = supernet_flops(channels=args.channels, layers=args.layers, input_size=args.input_size)
    evaluation = eval_network_flops(
        GENOTYPES[args.genotype], channels=args.eval_channels, layers=args.eval_layers, input_size=args.input_size
    )
    print(f"supernet ({args.layers} cells, C={args.channels}, {args.input_size}px): {supernet / 1e9:.3f} GFLOP/image")
    print(f"{args.genotype} ({args.eval_layers} cells, C={args.eval_channels}): {evaluation / 1e9:.3f} GFLOP/image")


if __name__ == "__main__":
    main()
