"""Data sets: the embedded default (``digits``), CIFAR-10/100, image folders and synthetic data.

:func:`load_data` turns a *spec* string into a :class:`DataBundle` (train and validation splits
plus what a model needs to know about them). Every data set yields ``(image, label)`` with
``image`` a normalised ``float32`` tensor ``(C, H, W)`` and ``label`` an ``int``.

==========================  ========================================================================
spec                        what
==========================  ========================================================================
``digits``                  scikit-learn's bundled 8x8 handwritten digits (1,797 images, no
                            network): scaled to [0, 1], resized to 32x32 (bilinear), 3 channels,
                            fixed stratified 80/20 split.
``cifar10``, ``cifar100``   torchvision's CIFAR under ``$ND_DATA_DIR`` (default
                            ``~/.cache/nd-plugin/data``); ``download=True`` fetches them.
``imagefolder:PATH``        ``PATH/train`` + ``PATH/val`` (or ``PATH/test``) class folders, or one
                            class-folder root split 90/10 (fixed, stratified).
``synthetic[:N]``           ``N`` (default 1000) random 32x32 images, 10 classes, class-dependent
                            colour and pattern plus noise; deterministic. For tests.
==========================  ========================================================================

Small images (CIFAR, digits, image folders of at most 64 px) are decoded once and kept in memory
as tensors; training augmentation (random crop with 4 px zero padding, horizontal flip except for
digits) runs on those tensors. Larger image folders are read per item through PIL with the usual
ImageNet transforms.

Normalisation: natural images (CIFAR, image folders) use the ImageNet mean/std
(0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), which the public CIFAR ResNet weights expect;
digits use fixed constants measured on the whole resized set (mean 0.3053, std 0.3236 per
channel); synthetic data uses the mean/std of its own training split.

Example:
    >>> from nd_plugin.data import load_data
    >>> data = load_data("digits")
    >>> len(data.train), len(data.val), data.num_classes, data.input_size
    (1438, 359, 10, (3, 32, 32))
    >>> x, y = next(iter(data.loader("train", batch_size=8)))
    >>> x.shape
    torch.Size([8, 3, 32, 32])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DataError

__all__ = [
    "DataBundle",
    "TensorImageDataset",
    "load_data",
    "data_root",
    "KNOWN_SPECS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DIGITS_MEAN",
    "DIGITS_STD",
]

#: The specs :func:`load_data` understands (for messages and ``--help``).
KNOWN_SPECS: tuple[str, ...] = (
    "digits", "cifar10", "cifar100", "imagefolder:PATH", "synthetic[:N]",
)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Mean and std of the 1,797 digits after scaling to [0, 1] and bilinear resizing to 32x32.
DIGITS_MEAN: tuple[float, float, float] = (0.3053, 0.3053, 0.3053)
DIGITS_STD: tuple[float, float, float] = (0.3236, 0.3236, 0.3236)

_SMALL_IMAGE_PX = 64
_SPLIT_SEED = 0
_SYNTHETIC_SEED = 0
_SYNTHETIC_DEFAULT_N = 1000
_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class DataBundle:
    """Train and validation splits of one data set, with what a model needs to know about them.

    Attributes:
        train: Training split, yielding ``(normalised float tensor (C, H, W), int label)``.
        val: Validation (or test) split, without augmentation.
        num_classes: Number of classes.
        classes: Class names, indexed by label.
        mean: Per-channel mean used for normalisation.
        std: Per-channel std used for normalisation.
        input_size: ``(C, H, W)`` of the images yielded.
        name: The spec the bundle was loaded from (e.g. ``"digits"``).

    Example:
        >>> data = load_data("synthetic:100")
        >>> xb, yb = next(iter(data.loader("val", batch_size=4)))
        >>> xb.shape, yb.dtype
        (torch.Size([4, 3, 32, 32]), torch.int64)
    """

    train: Dataset
    val: Dataset
    num_classes: int
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int, int]
    name: str

    def loader(
        self,
        split: str,
        batch_size: int,
        shuffle: bool | None = None,
        num_workers: int = 0,
        sampler: Sampler | None = None,
        **kwargs: Any,
    ) -> DataLoader:
        """Returns a :class:`~torch.utils.data.DataLoader` over one split.

        Args:
            split: ``"train"`` or ``"val"`` (``"test"`` is accepted for ``"val"``).
            batch_size: Samples per batch.
            shuffle: Defaults to True for ``"train"`` and False otherwise; ignored (False) when a
                ``sampler`` is given.
            num_workers: Loader worker processes.
            sampler: e.g. a ``DistributedSampler``.
            **kwargs: Passed on to ``DataLoader`` (``drop_last``, ``generator``, ...).

        Example:
            >>> data = load_data("synthetic:100")
            >>> len(data.loader("train", batch_size=10))
            8
        """
        if split not in ("train", "val", "test"):
            raise DataError(f"unknown split '{split}'; use 'train' or 'val'")
        dataset = self.train if split == "train" else self.val
        if sampler is not None:
            shuffle = False
        elif shuffle is None:
            shuffle = split == "train"
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            **kwargs,
        )


class TensorImageDataset(Dataset):
    """Images held in memory as one tensor, normalised (and optionally augmented) per item.

    Args:
        images: ``(N, C, H, W)`` ``uint8`` (0..255) or floating point (0..1) tensor.
        targets: ``(N,)`` integer labels.
        mean: Per-channel mean.
        std: Per-channel std.
        pad: Random-crop padding in pixels (zeros); 0 disables cropping.
        flip: Random horizontal flips.
        size: Output ``(H, W)``; images of another size are resized (bilinear) per item.
        classes: Class names.

    Example:
        >>> ds = TensorImageDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4),
        ...                         (0.5,) * 3, (0.5,) * 3)
        >>> ds[1][0].shape, ds[1][1]
        (torch.Size([3, 8, 8]), 1)
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        pad: int = 0,
        flip: bool = False,
        size: tuple[int, int] | None = None,
        classes: list[str] | None = None,
    ) -> None:
        if images.ndim != 4:
            raise DataError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        if len(self.targets) != len(images):
            raise DataError(f"{len(images)} images but {len(self.targets)} labels")
        c = images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(c, 1, 1)
        self.pad = pad
        self.flip = flip
        self.size = tuple(size) if size is not None else tuple(images.shape[-2:])
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False)[0]
        if self.pad:
            h, w = x.shape[-2:]
            p = self.pad
            x = F.pad(x, (p, p, p, p))
            i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = x[:, i : i + h, j : j + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std, int(self.targets[index])


def data_root() -> Path:
    """Where downloadable data sets live: ``$ND_DATA_DIR`` or ``~/.cache/nd-plugin/data``.

    Example:
        >>> isinstance(data_root(), Path)
        True
    """
    return Path(os.environ.get("ND_DATA_DIR") or "~/.cache/nd-plugin/data").expanduser()


def _stratified_split(
    targets: Sequence[int], val_fraction: float, seed: int = _SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split (independent of global RNGs); each class keeps >= 1 train sample."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def _checked_size(image_size: int | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    return (image_size, image_size)


def _digits(image_size: int | None, train_augment: bool) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = _checked_size(image_size) or (32, 32)
    x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp_(0, 1)
    x = x.expand(-1, 3, -1, -1).contiguous()
    y = torch.as_tensor(digits.target, dtype=torch.long)
    tr, va = _stratified_split(y.numpy(), 0.2)
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


def _synthetic(n: int, image_size: int | None) -> DataBundle:
    size = _checked_size(image_size) or (32, 32)
    g = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    num_classes = 10
    colours = torch.rand(num_classes, 3, 1, 1, generator=g) * 2 - 1
    patterns = F.interpolate(
        torch.rand(num_classes, 3, 4, 4, generator=g) * 2 - 1, size=size, mode="bilinear",
        align_corners=False,
    )
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    noise = torch.randn(n, 3, *size, generator=g)
    x = (0.5 + 0.2 * colours[y] + 0.15 * patterns[y] + 0.1 * noise).clamp_(0, 1)
    tr, va = _stratified_split(y.numpy(), 0.2)
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


def _cifar(name: str, image_size: int | None, train_augment: bool, download: bool) -> DataBundle:
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
                f"pass --download when online, or use imagefolder:PATH for a local copy"
            ) from e
        except OSError as e:  # network errors while downloading
            raise DataError(f"could not download {name} to {root}: {e}") from e
    size = _checked_size(image_size)
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


def load_data(
    spec: str,
    *,
    image_size: int | None = None,
    train_augment: bool = True,
    download: bool = False,
) -> DataBundle:
    """Loads a data set by spec (see the module docstring for the specs).

    Args:
        spec: ``digits``, ``cifar10``, ``cifar100``, ``imagefolder:PATH`` or ``synthetic[:N]``.
        image_size: Side of the (square) images yielded; None keeps the data set's own size
            (32 for digits, CIFAR and synthetic; the files' size for small image folders; 224 for
            large image folders).
        train_augment: Augment the training split (random crop and flip); the validation split
            is never augmented.
        download: Download CIFAR when it is not under :func:`data_root` (needs network).

    Returns:
        The :class:`DataBundle`.

    Raises:
        DataError: Unknown spec, missing or empty data, bad ``image_size``.

    Example:
        >>> data = load_data("synthetic:200", image_size=16)
        >>> data.input_size, data.num_classes
        ((3, 16, 16), 10)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data spec must be a non-empty string; known: {', '.join(KNOWN_SPECS)}")
    spec = spec.strip()
    kind, sep, arg = spec.partition(":")
    kind = kind.lower()
    if kind == "digits" and not sep:
        return _digits(image_size, train_augment)
    if kind in ("cifar10", "cifar100") and not sep:
        return _cifar(kind, image_size, train_augment, download)
    if kind == "imagefolder":
        from .image_folder import _imagefolder

        return _imagefolder(arg, image_size, train_augment)
    if kind == "synthetic":
        n = _SYNTHETIC_DEFAULT_N
        if sep:
            try:
                n = int(arg)
            except ValueError:
                n = 0
            if n < 20:
                raise DataError(f"synthetic:N needs an integer N >= 20, got '{arg}'")
        return _synthetic(n, image_size)
    hint = " (for a folder of images write imagefolder:PATH)" if os.path.isdir(spec) else ""
    raise DataError(f"unknown data set '{spec}'{hint}; known: {', '.join(KNOWN_SPECS)}")


def __getattr__(name: str) -> Any:
    # the image-folder readers live in nd_plugin.image_folder (which imports this module)
    if name in ("ImageFileDataset", "load_image_folder"):
        from . import image_folder

        return getattr(image_folder, name)
    raise AttributeError(f"module 'nd_plugin.data' has no attribute {name!r}")
