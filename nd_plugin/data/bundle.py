"""What every data source shares: :class:`DataBundle`, :class:`TensorImageDataset`, the
normalisation constants, the fixed stratified split and the checks of an image size.

The sources (:mod:`nd_plugin.data.sources`, :mod:`nd_plugin.data.image_folder`) import from here;
nothing here imports them.
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

from nd_plugin.errors import DataError

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "SMALL_IMAGE_PX",
    "SPLIT_SEED",
    "DataBundle",
    "TensorImageDataset",
    "checked_size",
    "data_root",
    "stratified_split",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Mean and std of the 1,797 digits after scaling to [0, 1] and bilinear resizing to 32x32.
DIGITS_MEAN: tuple[float, float, float] = (0.3053, 0.3053, 0.3053)
DIGITS_STD: tuple[float, float, float] = (0.3236, 0.3236, 0.3236)

#: Images of at most this many pixels a side are decoded once and kept in memory as tensors.
SMALL_IMAGE_PX = 64
#: The seed of every fixed train/validation split.
SPLIT_SEED = 0
#: The file endings read as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
        >>> from nd_plugin.data import load_data
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
            >>> from nd_plugin.data import load_data
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


def stratified_split(
    targets: Sequence[int], val_fraction: float, seed: int = SPLIT_SEED
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


def checked_size(image_size: int | None) -> tuple[int, int] | None:
    """``(image_size, image_size)``, or None for None; anything but a positive int is a :class:`DataError`."""
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    return (image_size, image_size)
