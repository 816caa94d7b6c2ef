"""The built-in data sources, registered with :func:`~nd_plugin.data.registry.register_data_source`
as a user's are: ``digits``, ``cifar10``, ``cifar100``, ``imagefolder:PATH`` (through
:mod:`nd_plugin.data.image_folder`) and ``synthetic[:N]``, in that order.

Each is called by :func:`~nd_plugin.data.registry.load_data` as ``source(argument, image_size=...,
train_augment=..., download=...)``; nothing here is imported by name.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from nd_plugin.data.bundle import (
    DIGITS_MEAN,
    DIGITS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    TensorImageDataset,
    checked_size,
    data_root,
    stratified_split,
)
from nd_plugin.data.image_folder import image_folder_data
from nd_plugin.data.registry import register_data_source
from nd_plugin.errors import DataError

__all__: list[str] = []

_SYNTHETIC_SEED = 0
_SYNTHETIC_DEFAULT_N = 1000


@register_data_source("digits")
def _digits(_: None, *, image_size: int | None = None, train_augment: bool = True, download: bool = False) -> DataBundle:
    """scikit-learn's bundled 8x8 handwritten digits (no network), resized, 3 channels, fixed 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = checked_size(image_size) or (32, 32)
    x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp_(0, 1)
    x = x.expand(-1, 3, -1, -1).contiguous()
    y = torch.as_tensor(digits.target, dtype=torch.long)
    tr, va = stratified_split(y.numpy(), 0.2)
    classes = [str(c) for c in digits.target_names]
    kw = dict(mean=DIGITS_MEAN, std=DIGITS_STD, classes=classes)
    pad = max(1, size[0] // 8) if train_augment else 0  # no flips: mirrored digits change meaning
    return DataBundle(
        train=TensorImageDataset(x[tr], y[tr], pad=pad, **kw),
        val=TensorImageDataset(x[va], y[va], **kw),
        num_classes=10,
        classes=classes,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        input_size=(3, *size),
        name="digits",
    )


def _cifar(
    name: str, _: None, *, image_size: int | None = None, train_augment: bool = True, download: bool = False
) -> DataBundle:
    """torchvision's CIFAR-10 / CIFAR-100 under :func:`~nd_plugin.data.bundle.data_root`, decoded into memory."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = data_root()
    splits = {}
    for train in (True, False):
        try:
            splits[train] = cls(str(root), train=train, download=download)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
            raise DataError(
                f"{name} not found (or corrupt) under {root} (ND_DATA_DIR sets the location); "
                f"pass download=True when online, or use imagefolder:PATH for a local copy",
                params=("download",),
            ) from e
        except OSError as e:  # network errors while downloading
            raise DataError(f"could not download {name} to {root}: {e}") from e
    size = checked_size(image_size)
    classes = list(splits[True].classes)

    def tensors(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(ds.targets)

    kw = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, size=size, classes=classes)
    aug = dict(pad=4, flip=True) if train_augment else {}
    return DataBundle(
        train=TensorImageDataset(*tensors(splits[True]), **aug, **kw),
        val=TensorImageDataset(*tensors(splits[False]), **kw),
        num_classes=len(classes),
        classes=classes,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=(3, *(size or (32, 32))),
        name=name,
    )


register_data_source("cifar10", partial(_cifar, "cifar10"))
register_data_source("cifar100", partial(_cifar, "cifar100"))


@register_data_source("imagefolder", argument="PATH")
def _image_folder(path: str, *, image_size: int | None = None, train_augment: bool = True, download: bool = False) -> DataBundle:
    """Class folders under ``PATH`` (:func:`~nd_plugin.data.image_folder.image_folder_data`)."""
    return image_folder_data(path, image_size=image_size, train_augment=train_augment)


@register_data_source("synthetic", argument="N", optional=True)
def _synthetic(
    arg: str | None, *, image_size: int | None = None, train_augment: bool = True, download: bool = False
) -> DataBundle:
    """``N`` (default 1000) random 32x32 images of 10 classes (class colour and pattern, plus noise); deterministic."""
    n = _SYNTHETIC_DEFAULT_N
    if arg is not None:
        try:
            n = int(arg)
        except ValueError:
            n = 0
        if n < 20:
            raise DataError(f"synthetic:N needs an integer N >= 20, got '{arg}'")
    size = checked_size(image_size) or (32, 32)
    g = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    num_classes = 10
    colours = torch.rand(num_classes, 3, 1, 1, generator=g) * 2 - 1
    patterns = F.interpolate(
        torch.rand(num_classes, 3, 4, 4, generator=g) * 2 - 1,
        size=size,
        mode="bilinear",
        align_corners=False,
    )
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    noise = torch.randn(n, 3, *size, generator=g)
    x = (0.5 + 0.2 * colours[y] + 0.15 * patterns[y] + 0.1 * noise).clamp_(0, 1)
    tr, va = stratified_split(y.numpy(), 0.2)
    mean = tuple(round(v, 4) for v in x[tr].mean(dim=(0, 2, 3)).tolist())
    std = tuple(round(v, 4) for v in x[tr].std(dim=(0, 2, 3)).tolist())
    classes = [f"class{i}" for i in range(num_classes)]
    kw = dict(mean=mean, std=std, classes=classes)
    return DataBundle(
        train=TensorImageDataset(x[tr], y[tr], **kw),
        val=TensorImageDataset(x[va], y[va], **kw),
        num_classes=num_classes,
        classes=classes,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        input_size=(3, *size),
        name=f"synthetic:{n}",
    )
