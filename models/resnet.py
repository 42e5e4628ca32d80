"""AV-HuBERT's visual front-end: a 3-D convolutional stem and a ResNet-18 trunk.

Parameter names follow facebookresearch/av_hubert `avhubert/resnet.py`
(`frontend3D.{0,1,2}`, `trunk.layerN.B.{conv1,bn1,relu1,conv2,bn2,relu2,downsample.{0,1}}`)
so released checkpoints load without renaming. Unlike the original, the stem
channels and the four stage widths are constructor arguments: the original fixes
them at 64 / [64, 128, 256, 512]; the embedded CPU-sized model uses smaller ones.

Input  [B, 1, T, H, W] grayscale mouth ROIs (88x88 in AV-HuBERT).
Output [B, T, widths[-1]] one vector per frame (global average pool).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def _activation(relu_type: str, channels: int) -> nn.Module:
    if relu_type == "prelu":
        return nn.PReLU(num_parameters=channels)
    if relu_type == "relu":
        return nn.ReLU()
    raise ValueError(f"resnet relu_type must be 'prelu' or 'relu', got {relu_type!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34 block)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, relu_type: str = "prelu"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = _activation(relu_type, channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = _activation(relu_type, channels)
        # A 1x1 projection whenever the residual changes shape, as in the original _make_layer.
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + residual)


class ResNetTrunk(nn.Module):
    """Four stages of BasicBlocks, then a global average pool."""

    def __init__(self, in_channels: int, widths: Sequence[int], blocks: Sequence[int] = (2, 2, 2, 2),
                 relu_type: str = "prelu"):
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError(f"ResNet trunk needs 4 stage widths and 4 block counts, got {list(widths)} / {list(blocks)}")
        channels = in_channels
        for stage, (width, count) in enumerate(zip(widths, blocks), start=1):
            stride = 1 if stage == 1 else 2
            stage_blocks = [BasicBlock(channels, width, stride, relu_type)]
            stage_blocks += [BasicBlock(width, width, 1, relu_type) for _ in range(count - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*stage_blocks))
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_channels = channels
        # He-normal convolutions and unit BatchNorm, the original trunk initialisation.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


class ResEncoder(nn.Module):
    """3-D stem (5x7x7 conv, stride 1x2x2, max-pool) + per-frame 2-D ResNet trunk."""

    def __init__(self, stem_channels: int = 64, widths: Sequence[int] = (64, 128, 256, 512),
                 relu_type: str = "prelu"):
        super().__init__()
        self.frontend3D = nn.Sequential(
            nn.Conv3d(1, stem_channels, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False),
            nn.BatchNorm3d(stem_channels),
            _activation(relu_type, stem_channels),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )
        self.trunk = ResNetTrunk(stem_channels, widths, relu_type=relu_type)
        self.out_channels = self.trunk.out_channels

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() != 5 or video.size(1) != 1:
            raise ValueError(f"video must be [B, 1, T, H, W] grayscale frames, got shape {tuple(video.shape)}")
        batch = video.size(0)
        x = self.frontend3D(video)  # [B, C, T, H', W']; the temporal stride is 1 so T is kept
        frames = x.size(2)
        x = x.transpose(1, 2).reshape(batch * frames, x.size(1), x.size(3), x.size(4))
        x = self.trunk(x)
        return x.view(batch, frames, -1)
