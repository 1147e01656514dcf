"""The two "improved residual" (IR) ResNet families used for face recognition.

- `iresnet*`: insightface arcface_torch `backbones/iresnet.py` (ArcFace, UNPG, MagFace, VPL ...).
- `lresnet*e_ir`: LResNet-E-IR as in the CVI-SZU (UniTSFace, UniFace) and EPL code (methods.md §9.3).

Both share the block and the trunk (3x3 stem, four stride-2 stages 112 -> 7, widths 64..512) but differ
in the strided convs (3x3 + 1x1 shortcut vs 2x2 + 2x2 shortcut), the head and the initialisation, so
their weights are not interchangeable. Module names follow each upstream code exactly so that released
checkpoints load with plain `load_state_dict`.

Input contract (both): N x 3 x 112 x 112 RGB float, (x - 127.5) / 127.5; output N x d raw embeddings.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from unitsface.models._base import FaceBackbone, register

_WIDTHS = (64, 128, 256, 512)
_STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")
_FINAL_MAP = 7  # 112 / 2**4: the heads below are sized for 112 x 112 inputs


class _IRBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv(stride) -> BN, plus a shortcut; no activation after the sum.

    Subclasses choose only the attribute names of the six branch layers (the upstream checkpoint keys)
    and the kernels of the strided branch conv and of the strided shortcut conv.
    """

    LAYER_NAMES: tuple[str, ...]
    DOWN_KERNEL: int
    SHORTCUT_KERNEL: int

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        kernel = 3 if stride == 1 else self.DOWN_KERNEL
        branch = (
            nn.BatchNorm2d(inplanes),
            nn.Conv2d(inplanes, planes, 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(planes),
            nn.PReLU(planes),
            nn.Conv2d(planes, planes, kernel, stride, padding=(kernel - 1) // 2, bias=False),
            nn.BatchNorm2d(planes),
        )
        for name, layer in zip(self.LAYER_NAMES, branch):
            self.add_module(name, layer)
        # Every stage starts with a stride-2 block and only there do the widths change.
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(inplanes, planes, self.SHORTCUT_KERNEL, stride, bias=False), nn.BatchNorm2d(planes)
            )
            if stride != 1
            else None
        )

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        """The branch's final BN: zero-initialising its gamma makes the block start as the identity."""
        return getattr(self, self.LAYER_NAMES[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name in self.LAYER_NAMES:
            out = getattr(self, name)(out)
        return out + (x if self.downsample is None else self.downsample(x))


class _InsightfaceBlock(_IRBlock):
    LAYER_NAMES = ("bn1", "conv1", "bn2", "prelu", "conv2", "bn3")
    DOWN_KERNEL = 3
    SHORTCUT_KERNEL = 1


class _EIRBlock(_IRBlock):
    LAYER_NAMES = ("bn0", "conv1", "bn1", "prelu", "conv2", "bn2")
    DOWN_KERNEL = 2
    SHORTCUT_KERNEL = 2


def _frozen_gamma_bn1d(features: int) -> nn.BatchNorm1d:
    """BN1d whose gamma stays at 1 (no gradient) and whose beta learns, as in both upstream heads."""
    bn = nn.BatchNorm1d(features)
    bn.weight.requires_grad_(False)
    return bn


class _IRNet(FaceBackbone):
    """Stem (conv3x3 s1 + BN + PReLU, no max-pool) and four stages: 112 -> 56 -> 28 -> 14 -> 7."""

    BLOCK: type[_IRBlock]

    def __init__(self, layers: Sequence[int], embedding_size: int) -> None:
        super().__init__(embedding_size)
        self.conv1 = nn.Conv2d(3, _WIDTHS[0], 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_WIDTHS[0])
        self.prelu = nn.PReLU(_WIDTHS[0])
        inplanes = _WIDTHS[0]
        for name, planes, depth in zip(_STAGE_NAMES, _WIDTHS, layers):
            blocks = [self.BLOCK(inplanes, planes, 2)] + [self.BLOCK(planes, planes, 1) for _ in range(depth - 1)]
            self.add_module(name, nn.Sequential(*blocks))
            inplanes = planes

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        for name in _STAGE_NAMES:
            x = getattr(self, name)(x)
        return x


class IResNet(_IRNet):
    """insightface iresnet: trunk -> BN2d -> flatten -> dropout -> Linear(512*7*7, d) -> BN1d (gamma frozen).

    Input: N x 3 x 112 x 112 RGB, (x - 127.5) / 127.5. Output: N x d raw embeddings. Convs start from
    N(0, 0.1) and no residual BN is zero-initialised, as upstream.
    """

    family = "iresnet"
    BLOCK = _InsightfaceBlock

    def __init__(self, layers: Sequence[int], embedding_size: int = 512, dropout: float = 0.0) -> None:
        super().__init__(layers, embedding_size)
        self.bn2 = nn.BatchNorm2d(_WIDTHS[-1])
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(_WIDTHS[-1] * _FINAL_MAP * _FINAL_MAP, embedding_size)
        self.features = _frozen_gamma_bn1d(embedding_size)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.bn2(self.trunk(x)), 1)
        return self.features(self.fc(self.dropout(x)))


class LResNetEIR(_IRNet):
    """LResNet-E-IR (UniTSFace/UniFace/EPL): trunk -> BN2d -> Dropout(0.4) -> 7x7 conv 512->d (no bias)
    -> flatten -> BN1d (gamma frozen at 1, beta learnt).

    Input: N x 3 x 112 x 112 RGB, (x - 127.5) / 127.5. Output: N x d raw embeddings (no flip-sum here:
    evaluation adds it). Init: Kaiming normal (a=1, fan-in) convs, PReLU 0.25, BN 1/0, and the last BN
    gamma of every block zeroed so each block starts as the identity.
    """

    family = "lresnet"
    BLOCK = _EIRBlock

    def __init__(self, layers: Sequence[int], embedding_size: int = 512, dropout: float = 0.4) -> None:
        super().__init__(layers, embedding_size)
        self.bn4 = nn.BatchNorm2d(_WIDTHS[-1])
        self.dropout = nn.Dropout(dropout)
        self.fc5 = nn.Conv2d(_WIDTHS[-1], embedding_size, _FINAL_MAP, bias=False)
        self.bn5 = _frozen_gamma_bn1d(embedding_size)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
            elif isinstance(module, nn.PReLU):
                nn.init.constant_(module.weight, 0.25)
            elif isinstance(module, _IRBlock):
                nn.init.zeros_(module.last_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc5(self.dropout(self.bn4(self.trunk(x))))
        return self.bn5(torch.flatten(x, 1))


for _depth, _layers in {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3),
                        200: (6, 26, 60, 6)}.items():
    register(f"iresnet{_depth}", IResNet, layers=_layers)
for _depth, _layers in {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3),
                        200: (3, 33, 60, 3)}.items():
    register(f"lresnet{_depth}e_ir", LResNetEIR, layers=_layers)
