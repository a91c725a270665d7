"""ResNet (torchvision architecture, v1.5: the stride sits on the 3x3 conv of a bottleneck).

resnet50: 25,557,032 parameters, resnet18: 11,689,512 (1000 classes). resnet-tiny is the same
code at toy widths for CPU tests. The unit is one image; FLOPs are counted per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ResNetConfig:
    block: str = "bottleneck"  # "basic" (ResNet-18/34) or "bottleneck" (ResNet-50+)
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64  # channels of the stem and the first stage
    num_classes: int = 1000
    image_size: int = 224


SIZES: dict[str, ResNetConfig] = {
    "resnet50": ResNetConfig(),
    "resnet18": ResNetConfig(block="basic", layers=(2, 2, 2, 2)),
    "resnet-tiny": ResNetConfig(block="basic", layers=(1, 1, 1, 1), width=8, num_classes=10,
                                image_size=32),
}


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = _conv3x3(c_in, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = _shortcut(c_in, c_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = _conv1x1(c_in, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)  # v1.5: stride here, not on conv1
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, c_out)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = _shortcut(c_in, c_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.downsample(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(_conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        block = Bottleneck if cfg.block == "bottleneck" else BasicBlock
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        stages = []
        c_in = w
        for i, num_blocks in enumerate(cfg.layers):
            width = w * 2**i
            blocks = []
            for j in range(num_blocks):
                blocks.append(block(c_in, width, stride=2 if (i > 0 and j == 0) else 1))
                c_in = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c_in, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, w, H/2, W/2)
        x = F.max_pool2d(x, 3, stride=2, padding=1)  # (B, w, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, C, H/32, W/32)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, C)
        return self.fc(x)  # (B, num_classes)


def build(cfg: ResNetConfig) -> ResNet:
    return ResNet(cfg)


def make_batch(
    cfg: ResNetConfig, batch_size: int, image_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random images (B, 3, H, W) and class labels (B,), on the CPU."""
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, cfg.num_classes, (batch_size,), generator=generator)
    return images, labels


def loss(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(model(images), labels)


def _out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def flops_per_sample(cfg: ResNetConfig, image_size: int) -> int:
    """Training FLOPs per image (2 per MAC): 3x the forward, except the stem convolution,
    whose backward computes no gradient for the input images (2x)."""
    def conv(c_in: int, c_out: int, k: int, hw: int) -> int:
        return 2 * c_in * c_out * k * k * hw * hw

    bottleneck = cfg.block == "bottleneck"
    expansion = 4 if bottleneck else 1
    w = cfg.width
    hw = _out(image_size, 7, 2, 3)
    stem = conv(3, w, 7, hw)
    fwd = stem
    hw = _out(hw, 3, 2, 1)  # max pool
    c_in = w
    for i, num_blocks in enumerate(cfg.layers):
        width = w * 2**i
        for j in range(num_blocks):
            stride = 2 if (i > 0 and j == 0) else 1
            hw_out = _out(hw, 3, stride, 1)
            c_out = width * expansion
            if bottleneck:
                fwd += conv(c_in, width, 1, hw) + conv(width, width, 3, hw_out)
                fwd += conv(width, c_out, 1, hw_out)
            else:
                fwd += conv(c_in, width, 3, hw_out) + conv(width, c_out, 3, hw_out)
            if stride != 1 or c_in != c_out:
                fwd += conv(c_in, c_out, 1, hw_out)
            c_in, hw = c_out, hw_out
    fwd += 2 * c_in * cfg.num_classes
    return 3 * fwd - stem
