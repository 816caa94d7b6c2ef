"""The CIFAR model zoo: He et al.'s CIFAR ResNets (option-A shortcuts) and a CIFAR VGG-16 with BN.

The ResNets follow Section 4.2 of He et al., "Deep Residual Learning for Image Recognition" (2016):
a 3x3 stem with 16 filters, three stages of ``n`` basic blocks with 16/32/64 filters (depth
``6n + 2``), global average pooling and one linear layer. Shortcuts that change shape are
parameter-free ("option A"): the identity is subsampled with stride 2 and the new channels are
zero-padded. Module names match the widely used public checkpoints
(``conv1, bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}, linear``), so
:func:`nd_plugin.adapters.load_checkpoint` reads them directly.

The VGG-16 is the usual CIFAR variant: thirteen 3x3 conv + BN + ReLU layers in five stages
(``features``), each stage ending in 2x2 max pooling, then one ``Linear(512, num_classes)``
(``classifier``). Its module layout is that of the common ``pytorch-cifar`` VGG.

Example:
    >>> import torch
    >>> from nd_plugin.adapters.cifar import resnet20
    >>> resnet20(num_classes=10)(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ShortcutA",
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "vgg16_bn",
    "CIFAR_MODELS",
]

_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


def _init_weights(module: nn.Module) -> None:
    """Kaiming-normal init for convs and linears, unit/zero for BN (as in the reference code)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut: strided subsampling plus zero channel padding.

    The identity is subsampled as ``x[:, :, ::stride, ::stride]`` and the ``out_channels -
    in_channels`` new channels are zeros, split evenly before and after the existing ones (the
    layout the public CIFAR ResNet checkpoints were trained with).

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output (``>= in_channels``).
        stride: Spatial subsampling step.

    Example:
        >>> ShortcutA(16, 32, stride=2)(torch.randn(1, 16, 32, 32)).shape
        torch.Size([1, 32, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ShortcutA cannot reduce channels ({in_channels} -> {out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection.

    ``forward`` computes ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``.

    Args:
        in_channels: Input channels.
        channels: Output channels of both convolutions.
        stride: Stride of the first convolution (and of the shortcut).

    Example:
        >>> BasicBlock(16, 32, stride=2)(torch.randn(1, 16, 32, 32)).shape
        torch.Size([1, 32, 16, 16])
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_channels != channels:
            self.shortcut: nn.Module = ShortcutA(in_channels, channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet of depth ``6n + 2`` with option-A shortcuts.

    Args:
        depth: Network depth; ``(depth - 2) % 6 == 0`` (20, 32, 44, 56, 110, 1202).
        num_classes: Outputs of the final linear layer.
        in_chans: Input channels.
        widths: Filters of the three stages.

    Example:
        >>> model = CifarResNet(20, num_classes=10)
        >>> sum(p.numel() for p in model.parameters())
        269722
    """

    default_input_size: tuple[int, int, int] = (3, 32, 32)

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.default_input_size = (in_chans, 32, 32)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_ch = widths[0]
        stages = []
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, width, stride))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the last feature map (before pooling)."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.pool(self.forward_features(x)), 1))


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: conv stages in ``features``, one linear ``classifier``.

    Args:
        cfg: Layer configuration: an int is a 3x3 conv + BN + ReLU with that many filters,
            ``"M"`` a 2x2 max pooling.
        num_classes: Outputs of the classifier.
        in_chans: Input channels.

    Example:
        >>> CifarVGG(num_classes=10)(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    default_input_size: tuple[int, int, int] = (3, 32, 32)

    def __init__(
        self,
        cfg: Sequence[int | str] = _VGG16_CFG,
        num_classes: int = 10,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.default_input_size = (in_chans, 32, 32)
        layers: list[nn.Module] = []
        in_ch = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # a no-op at 32x32 input; allows other sizes
        self.classifier = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def resnet20(num_classes: int = 10, **kwargs) -> CifarResNet:
    """CIFAR ResNet-20 (0.27 M parameters with 10 classes).

    Example:
        >>> resnet20().linear.out_features
        10
    """
    return CifarResNet(20, num_classes=num_classes, **kwargs)


def resnet32(num_classes: int = 10, **kwargs) -> CifarResNet:
    """CIFAR ResNet-32 (0.46 M parameters).

    Example:
        >>> resnet32(num_classes=100).linear.out_features
        100
    """
    return CifarResNet(32, num_classes=num_classes, **kwargs)


def resnet44(num_classes: int = 10, **kwargs) -> CifarResNet:
    """CIFAR ResNet-44 (0.66 M parameters).

    Example:
        >>> len(resnet44().layer1)
        7
    """
    return CifarResNet(44, num_classes=num_classes, **kwargs)


def resnet56(num_classes: int = 10, **kwargs) -> CifarResNet:
    """CIFAR ResNet-56 (0.85 M parameters).

    Example:
        >>> len(resnet56().layer3)
        9
    """
    return CifarResNet(56, num_classes=num_classes, **kwargs)


def resnet110(num_classes: int = 10, **kwargs) -> CifarResNet:
    """CIFAR ResNet-110 (1.7 M parameters).

    Example:
        >>> len(resnet110().layer2)
        18
    """
    return CifarResNet(110, num_classes=num_classes, **kwargs)


def vgg16_bn(num_classes: int = 10, **kwargs) -> CifarVGG:
    """CIFAR VGG-16 with BatchNorm (13 conv layers, one ``Linear(512, num_classes)``).

    Example:
        >>> vgg16_bn().classifier
        Linear(in_features=512, out_features=10, bias=True)
    """
    return CifarVGG(_VGG16_CFG, num_classes=num_classes, **kwargs)


#: Builders of the CIFAR zoo by name (``cifar:NAME`` in the registry). Read-only by convention.
CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg16_bn": vgg16_bn,
}
