"""Evaluation networks built from a genotype: the models that are retrained from scratch after the search.

Two settings from the paper: ``stem="cifar"`` (one 3x3 conv stem of 3·C channels, 32x32 inputs) and
``stem="imagenet"`` (the mobile setting: three stride-2 convolutions take 224x224 to 28x28 before the first
cell). Both put reduction cells at 1/3 and 2/3 of the depth and an optional auxiliary head at 2/3.

A :class:`NetworkSpec` is everything that rebuilds a trained network and feeds it: the architecture's arguments
and the data's normalisation, as plain JSON (``spec.model_dump(mode="json")``). ``EvalNetwork.from_spec(spec)``
builds the network (which keeps ``spec`` as ``network.spec``) and ``spec.normalise(images)`` turns raw pixels
into its input, exactly as the training data were turned::

    spec = NetworkSpec.model_validate_json(path.read_text())
    network = EvalNetwork.from_spec(spec)
    logits, _ = network.eval()(spec.normalise(images))  # uint8 in [0, 255] or float in [0, 1], (N, C, H, W)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from nas.genotypes import Genotype
from nas.loop import GenotypeField
from nas.ops import FactorizedReduce, ReLUConvBN, build_op
from nas.search_model import reduction_layers

if TYPE_CHECKING:
    from nas.config import RetrainConfig
    from nas.data import DatasetInfo


class NetworkSpec(BaseModel):
    """What rebuilds an evaluation network and feeds it raw images: its arguments and the data's normalisation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    genotype: GenotypeField
    in_channels: int = Field(gt=0)
    num_classes: int = Field(gt=0)
    layers: int = Field(gt=0)
    channels: int = Field(gt=0)
    stem: Literal["cifar", "imagenet"] = "cifar"
    auxiliary: bool = True
    image_size: int = Field(gt=0, description="height = width of the images the network was trained on")
    mean: list[float] = Field(description="per-channel mean of the training pixels, in [0, 1] units")
    std: list[float] = Field(description="per-channel standard deviation of the training pixels, in [0, 1] units")
    dataset: str = Field(description="the data set's name")

    @classmethod
    def for_retrain(cls, config: RetrainConfig, genotype: Genotype, data_info: DatasetInfo) -> NetworkSpec:
        """The network a retrain with ``config`` trains on data described by ``data_info``."""
        return cls(
            genotype=genotype,
            in_channels=data_info.in_channels,
            num_classes=data_info.num_classes,
            layers=config.layers,
            channels=config.channels,
            stem=config.stem,
            auxiliary=config.auxiliary,
            image_size=data_info.image_size,
            mean=list(data_info.mean),
            std=list(data_info.std),
            dataset=data_info.name,
        )

    def normalise(self, images: torch.Tensor | np.ndarray | Sequence[Any]) -> torch.Tensor:
        """Raw images to the network's input: float32 ``(x - mean) / std`` per channel, as in training.

        ``images`` is (N, C, H, W) with (C, H, W) = (in_channels, image_size, image_size), or (N, H, W) when
        ``in_channels`` is 1; a tensor, numpy array or nested list. uint8 pixels are in [0, 255] and divided by 255
        first; floating-point pixels are taken to be in [0, 1] already. Any other dtype or shape is a ValueError.
        """
        x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div(255.0)
        elif x.is_floating_point():
            x = x.to(torch.float32)
        else:
            raise ValueError(f"expected uint8 pixels in [0, 255] or float pixels in [0, 1], got dtype {x.dtype}")
        if x.ndim == 3 and self.in_channels == 1:
            x = x.unsqueeze(1)
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            allowed = "(N, C, H, W)" + (" or (N, H, W)" if self.in_channels == 1 else "")
            raise ValueError(f"expected images {allowed} with (C, H, W) = {expected}, got shape {tuple(x.shape)}")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


class EvalCell(nn.Module):
    """A discrete cell: each intermediate node sums two operations applied to two earlier nodes."""

    def __init__(
        self, genotype: Genotype, c_prev_prev: int, c_prev: int, channels: int, reduction: bool, reduction_prev: bool
    ):
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, channels)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, channels, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0)
        edges = genotype.reduce if reduction else genotype.normal
        self.concat = tuple(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.indices = tuple(index for _, index in edges)
        self.ops = nn.ModuleList(
            build_op(name, channels, 2 if reduction and index < 2 else 1, affine=True) for name, index in edges
        )
        self.multiplier = len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(len(self.ops) // 2):
            total = 0
            for k in (2 * node, 2 * node + 1):
                op = self.ops[k]
                h = op(states[self.indices[k]])
                if self.training and drop_prob > 0.0 and not isinstance(op, nn.Identity):
                    # ScheduledDropPath: zero whole samples of the branch, scale the survivors by 1 / (1 - p)
                    from torchvision.ops import stochastic_depth  # here: torchvision's import costs a second

                    h = stochastic_depth(h, drop_prob, mode="row", training=True)
                total = total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """Auxiliary classifier on the 2/3-depth features (8x8 for CIFAR, 14x14 for ImageNet)."""

    def __init__(self, channels: int, num_classes: int, imagenet: bool):
        super().__init__()
        self.pool = nn.Sequential(
            nn.ReLU(inplace=False), nn.AvgPool2d(5, stride=2 if imagenet else 3, padding=0, count_include_pad=False)
        )
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=False),
            nn.AdaptiveAvgPool2d(1),  # 1x1 already at the paper's input sizes; keeps smaller inputs working
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inputs smaller than the 5x5 window (small images such as 8x8 digits) are pooled to 2x2 instead.
        x = self.pool(x) if min(x.shape[-2:]) >= 5 else F.adaptive_avg_pool2d(F.relu(x), 2)
        return self.classifier(self.features(x).flatten(1))


class EvalNetwork(nn.Module):
    """The network of stacked genotype cells. ``forward`` returns (logits, auxiliary logits or None)."""

    def __init__(
        self,
        genotype: Genotype,
        in_channels: int = 3,
        channels: int = 36,
        num_classes: int = 10,
        layers: int = 20,
        auxiliary: bool = True,
        drop_path: float = 0.0,
        stem: Literal["cifar", "imagenet"] = "cifar",
        stem_multiplier: int = 3,
    ):
        super().__init__()
        self.spec: NetworkSpec | None = None  # set by from_spec
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if layers < 3 and auxiliary:
            raise ValueError(f"the auxiliary head needs at least 3 layers, got {layers}")
        self.genotype = genotype
        self.layers = layers
        self.drop_path_prob = drop_path
        self.auxiliary_index = 2 * layers // 3
        if stem == "cifar":
            c_curr = stem_multiplier * channels
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
            self.stem_reduce = None
            c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
            reduction_prev = False
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, channels // 2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels // 2),
                nn.ReLU(inplace=False),
                nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
            )
            self.stem_reduce = nn.Sequential(
                nn.ReLU(inplace=False),
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
            )
            c_prev_prev, c_prev, c_curr = channels, channels, channels
            reduction_prev = True  # the two stem outputs differ in size: 56x56 and 28x28
        reductions = reduction_layers(layers)
        cells = []
        c_auxiliary = c_prev
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            cell = EvalCell(genotype, c_prev_prev, c_prev, c_curr, reduction, reduction_prev)
            cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.multiplier * c_curr
            if i == self.auxiliary_index:
                c_auxiliary = c_prev
        self.cells = nn.ModuleList(cells)
        self.auxiliary_head = AuxiliaryHead(c_auxiliary, num_classes, stem == "imagenet") if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    @classmethod
    def from_spec(cls, spec: NetworkSpec, drop_path: float = 0.0) -> EvalNetwork:
        """The network ``spec`` describes (freshly initialised), carrying ``spec`` as ``network.spec``."""
        network = cls(
            spec.genotype,
            in_channels=spec.in_channels,
            channels=spec.channels,
            num_classes=spec.num_classes,
            layers=spec.layers,
            auxiliary=spec.auxiliary,
            drop_path=drop_path,
            stem=spec.stem,
        )
        network.spec = spec
        return network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits_aux = None
        s0 = self.stem(x)
        s1 = self.stem_reduce(s0) if self.stem_reduce is not None else s0
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.auxiliary_index and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), logits_aux


def count_parameters(module: nn.Module, exclude: tuple[str, ...] = ("auxiliary", "alpha")) -> int:
    """Parameter count as the DARTS authors log it: auxiliary head and α left out."""
    return sum(p.numel() for n, p in module.named_parameters() if not any(e in n for e in exclude))


def forward_flops(network: nn.Module, spec: NetworkSpec) -> int:
    """FLOPs of one inference forward pass on one image, as ``torch.utils.flop_counter`` counts them (2 per
    multiply-accumulate of convolutions and the classifier), so cells can be compared by cost as well as accuracy."""
    return image_flops(network, spec.in_channels, spec.image_size)


def image_flops(network: nn.Module, in_channels: int, image_size: int) -> int:
    """:func:`forward_flops` of any network (a supernet too) on one ``in_channels`` x ``image_size``² image, on the
    network's own device: one built on the meta device is costed without allocating or computing anything.

    Only convolutions and linear layers count, as in bench/flops.py: a supernet's α-weighted sum of its candidates
    is elementwise-sized work, not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(network.parameters()).device
    image = torch.zeros(1, in_channels, image_size, image_size, device=device)
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            network(image)
    finally:
        network.train(was_training)
    counted = {torch.ops.aten.convolution, torch.ops.aten.addmm}
    return int(sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if op in counted))
