"""Light backbones built from inverted-residual bottlenecks and a global depthwise (GDC) head.

- `mobilefacenet`: MobileFaceNet (Chen et al., 2018, Table 1), about 1 M parameters at d=128.
- `tinyfacenet`: a small, fast net for CPU tests and the demo; a strided stem reaches 28 x 28 after
  two convs so that most of the work runs on small maps.

Input contract: N x 3 x S x S RGB float, (x - 127.5) / 127.5, S = 112 (tinyfacenet: any multiple of 16
given as `input_size`, the GDC kernel being S/16). Output: N x d raw (un-normalised) embeddings.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from unitsface.errors import UnitsfaceError
from unitsface.models._base import FaceBackbone, register

# A bottleneck stage: (expansion t, output channels c, repeats n, stride of the first repeat s).
Stage = tuple[int, int, int, int]
# Builds the activation for a given channel count; None means a linear (activation-free) layer.
Activation = Optional[Callable[[int], nn.Module]]


def _relu(channels: int) -> nn.Module:
    return nn.ReLU(inplace=True)


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
            act: Activation = nn.PReLU, padding: int | None = None) -> nn.Sequential:
    """Conv (no bias, padding (k-1)/2 unless given) + BN, then `act(cout)` unless `act` is None."""
    pad = (kernel - 1) // 2 if padding is None else padding
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, padding=pad, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """1x1 expand -> depthwise 3x3 (stride) -> linear 1x1 project; residual when shapes are kept."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int, act: Activation) -> None:
        super().__init__()
        hidden = cin * expansion
        self.body = nn.Sequential(
            conv_bn(cin, hidden, 1, act=act),
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act),
            conv_bn(hidden, cout, 1, act=None),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


def bottleneck_stages(cin: int, stages: Sequence[Stage], act: Activation) -> nn.Sequential:
    blocks = []
    for expansion, cout, repeats, stride in stages:
        for index in range(repeats):
            blocks.append(Bottleneck(cin, cout, expansion, stride if index == 0 else 1, act))
            cin = cout
    return nn.Sequential(*blocks)


class GDCHead(nn.Sequential):
    """1x1 conv to `width` + act, global depthwise k x k conv (linear), flatten, Linear to d, BN1d.

    The GDC weighs each spatial position separately (face crops are aligned, so positions mean
    something), unlike global average pooling.
    """

    def __init__(self, cin: int, width: int, kernel: int, embedding_size: int, act: Activation) -> None:
        super().__init__(
            conv_bn(cin, width, 1, act=act),
            nn.Conv2d(width, width, kernel, groups=width, bias=False),  # no padding: k x k -> 1 x 1
            nn.BatchNorm2d(width),
            nn.Flatten(1),
            nn.Linear(width, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )


class _GDCNet(FaceBackbone):
    """stem -> bottleneck stages -> GDC head, with Kaiming (fan-out) conv init as in MobileNetV2."""

    def __init__(self, stem: nn.Sequential, stem_out: int, stages: Sequence[Stage], head_width: int,
                 embedding_size: int, input_size: int, act: Activation) -> None:
        super().__init__(embedding_size, input_size)
        self.stem = stem
        self.stages = bottleneck_stages(stem_out, stages, act)
        self.head = GDCHead(stages[-1][1], head_width, input_size // 16, embedding_size, act)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class MobileFaceNet(_GDCNet):
    """MobileFaceNet: conv3x3 s2 (64) -> depthwise 3x3 (64) -> bottlenecks (t,c,n,s) = (2,64,5,2),
    (4,128,1,2), (2,128,6,1), (4,128,1,2), (2,128,2,1) -> 1x1 conv 512 -> linear GDC 7x7 -> linear to d.

    Input: N x 3 x 112 x 112 RGB, (x - 127.5) / 127.5. Output: N x d raw embeddings.
    """

    family = "mobilefacenet"

    def __init__(self, embedding_size: int = 512) -> None:
        stem = nn.Sequential(conv_bn(3, 64, 3, 2), conv_bn(64, 64, 3, groups=64))
        stages = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))
        super().__init__(stem, 64, stages, 512, embedding_size, 112, nn.PReLU)


class TinyFaceNet(_GDCNet):
    """Small CPU net: a 4x4 stride-4 "patchify" conv (32) reaching S/4 in one step, then bottlenecks
    (t,c,n,s) = (2,64,2,2), (2,128,2,2) to S/16 -> 1x1 conv 256 -> GDC -> linear to d.

    Why this shape: on CPUs the cost of a small face net sits in its full-resolution layers; one
    patchify stem and narrow stages halve the step time of a conv-conv stem with 96/160-wide stages
    (measured: 0.67 vs 1.43 s per forward+backward of 64 images on one core), which is what lets the
    demo and the loss comparison train for real on two cores. Activations are ReLU, not PReLU: on CPU
    the PReLU backward kernel costs about six times a ReLU's.

    Input: N x 3 x S x S RGB, (x - 127.5) / 127.5, S = `input_size` (default 112, any multiple of 16;
    the GDC kernel is S/16, so a model only accepts the size it was built for). Output: N x d raw
    embeddings.
    """

    family = "tinyfacenet"

    def __init__(self, embedding_size: int = 512, input_size: int = 112) -> None:
        if not isinstance(input_size, int) or input_size < 16 or input_size % 16:
            raise UnitsfaceError(f"tinyfacenet input_size must be a positive multiple of 16, got {input_size!r}")
        stem = nn.Sequential(conv_bn(3, 32, 4, 4, act=_relu, padding=0))  # non-overlapping 4x4 patches
        stages = ((2, 64, 2, 2), (2, 128, 2, 2))
        super().__init__(stem, 32, stages, 256, embedding_size, input_size, _relu)


register("mobilefacenet", MobileFaceNet)
register("tinyfacenet", TinyFaceNet)
