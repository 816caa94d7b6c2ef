"""Image folders: the ``imagefolder:PATH`` data sets of :func:`nd_plugin.data.load_data`.

Class folders (torchvision's ``ImageFolder`` layout) are scanned once; small images (at most
64 px) are decoded in parallel into one tensor and augmented as tensors, larger ones are read per
item through PIL with the usual ImageNet transforms.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nd_plugin.data.bundle import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_IMAGE_PX,
    DataBundle,
    TensorImageDataset,
    checked_size,
    stratified_split,
)
from nd_plugin.errors import DataError

__all__ = ["ImageFileDataset", "image_folder_data", "load_image_folder"]


class ImageFileDataset(Dataset):
    """Images read from files per item (for image folders of large images).

    Args:
        samples: ``(path, label)`` pairs.
        transform: Maps a PIL RGB image to a tensor.
        classes: Class names.

    Example:
        >>> from PIL import Image
        >>> Image.new("RGB", (8, 8), "red").save(tmp / "a.jpg")
        >>> ds = ImageFileDataset([(str(tmp / "a.jpg"), 0)], transform=lambda im: im.size, classes=["red"])
        >>> ds[0], len(ds)
        (((8, 8), 0), 1)
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable[[Any], torch.Tensor],
        classes: list[str] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.classes = classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, target = self.samples[index]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), target


def _scan_class_folders(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted subfolders) and ``(file, label)`` pairs of one class-folder root."""
    class_dirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.name,
    )
    if not class_dirs:
        raise DataError(f"empty ImageFolder: {root} has no class subfolders (expected {root}/<class>/<image>)")
    classes = [d.name for d in class_dirs]
    samples = []
    for label, d in enumerate(class_dirs):
        for dirpath, _, files in sorted(os.walk(d, followlinks=True)):
            samples += [
                (os.path.join(dirpath, f), label)
                for f in sorted(files)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
            ]
    if not samples:
        raise DataError(f"empty ImageFolder: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
    return classes, samples


def _decode_all(samples: Sequence[tuple[str, int]], size: tuple[int, int], desc: str) -> torch.Tensor:
    """Decodes images into one ``(N, 3, H, W)`` uint8 tensor, resizing those of another size."""
    from PIL import Image
    from rich.console import Console
    from rich.progress import Progress

    h, w = size
    out = np.empty((len(samples), h, w, 3), dtype=np.uint8)

    def decode(i: int) -> None:
        with Image.open(samples[i][0]) as im:
            im = im.convert("RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            out[i] = np.asarray(im)

    console = Console(file=sys.stderr)
    with (
        Progress(console=console, transient=True, disable=len(samples) < 2000) as progress,
        ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool,
    ):
        task = progress.add_task(desc, total=len(samples))
        for _ in pool.map(decode, range(len(samples)), chunksize=256):
            progress.advance(task)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _folder_datasets(
    splits: Sequence[tuple[Sequence[tuple[str, int]], bool]],
    classes: list[str],
    image_size: int | None,
) -> tuple[list[Dataset], tuple[int, int]]:
    """Builds one dataset per ``(samples, augment)``: in memory for small images, else files."""
    from PIL import Image

    with Image.open(splits[0][0][0][0]) as im:
        native = (im.height, im.width)
    size = checked_size(image_size)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    out: list[Dataset] = []
    if max(native) <= SMALL_IMAGE_PX:
        stored = native if size is None or max(size) > SMALL_IMAGE_PX else size
        for samples, augment in splits:
            x = _decode_all(samples, stored, f"decoding {len(samples)} images")
            aug = dict(pad=4, flip=True) if augment else {}
            out.append(
                TensorImageDataset(
                    x,
                    [t for _, t in samples],
                    mean,
                    std,
                    size=size or native,
                    classes=classes,
                    **aug,
                )
            )
        return out, size or native
    from torchvision import transforms as T

    side = size[0] if size else 224
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose([T.RandomResizedCrop(side), T.RandomHorizontalFlip(), *norm])
    eval_tf = T.Compose([T.Resize(round(side / 0.875)), T.CenterCrop(side), *norm])
    for samples, augment in splits:
        out.append(ImageFileDataset(samples, train_tf if augment else eval_tf, classes))
    return out, (side, side)


def _existing_dir(path_str: str | os.PathLike[str]) -> Path:
    if not str(path_str):
        raise DataError("imagefolder needs a path: imagefolder:PATH")
    path = Path(path_str).expanduser()
    if not path.exists():
        raise DataError(f"image folder not found: {path}")
    if not path.is_dir():
        raise DataError(f"image folder is not a directory: {path}")
    return path


def load_image_folder(path: str | os.PathLike[str], *, image_size: int | None = None, augment: bool = False) -> Dataset:
    """Loads one class-folder root (``PATH/<class>/<image>``) as a single dataset, without a split.

    Use it to evaluate on a held-out folder, e.g. the ``test/`` folder of a data set trained
    with ``imagefolder:DIR/train``. Small images (<= 64 px) are decoded once into memory.

    Args:
        path: The class-folder root.
        image_size: Side of the images yielded (default: the files' own size when <= 64 px,
            else 224).
        augment: Apply training augmentation.

    Returns:
        A dataset yielding ``(normalised float tensor, int label)``; its ``classes`` attribute
        lists the class names (sorted folder names, as in torchvision's ``ImageFolder``).

    Raises:
        DataError: The folder is missing, or has no class folders or no images.

    Example:
        >>> from PIL import Image
        >>> for cls in ("cat", "dog"):
        ...     (tmp / cls).mkdir()
        ...     Image.new("RGB", (32, 32)).save(tmp / cls / "0.jpg")
        >>> test = load_image_folder(tmp)
        >>> len(test), test.classes, test[0][0].shape
        (2, ['cat', 'dog'], torch.Size([3, 32, 32]))
    """
    root = _existing_dir(path)
    classes, samples = _scan_class_folders(root)
    (dataset,), _ = _folder_datasets([(samples, augment)], classes, image_size)
    return dataset


def image_folder_data(path: str | os.PathLike[str], *, image_size: int | None = None, train_augment: bool = True) -> DataBundle:
    """Train and validation splits of class folders: what ``load_data("imagefolder:PATH")`` loads.

    ``PATH/train`` and ``PATH/val`` (or ``PATH/test``) class folders, or one class-folder root
    (``PATH/train`` alone, or ``PATH`` itself) split 90/10 (fixed, stratified).

    Args:
        path: the folder.
        image_size: side of the images yielded (default: the files' own size when <= 64 px, else 224).
        train_augment: augment the training split.

    Raises:
        DataError: the folder is missing, has no class folders or images, validation classes the
            training split lacks, or too few images to split.

    Example:
        >>> from PIL import Image
        >>> for cls in ("cat", "dog"):
        ...     for split in ("train", "val"):
        ...         (tmp / split / cls).mkdir(parents=True)
        ...         Image.new("RGB", (16, 16)).save(tmp / split / cls / "0.png")
        >>> data = image_folder_data(tmp)
        >>> len(data.train), len(data.val), data.classes, data.input_size
        (2, 2, ['cat', 'dog'], (3, 16, 16))
    """
    path = _existing_dir(path)
    val_dir = next((path / d for d in ("val", "test") if (path / d).is_dir()), None)
    if (path / "train").is_dir() and val_dir is not None:
        classes, train_samples = _scan_class_folders(path / "train")
        val_classes, val_raw = _scan_class_folders(val_dir)
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise DataError(f"classes in {val_dir} missing from {path / 'train'}: {', '.join(unknown[:5])}")
        index = {c: i for i, c in enumerate(classes)}
        val_samples = [(f, index[val_classes[t]]) for f, t in val_raw]
    else:
        root = path / "train" if (path / "train").is_dir() else path
        classes, samples = _scan_class_folders(root)
        tr, va = stratified_split([t for _, t in samples], 0.1)
        if len(va) == 0:
            raise DataError(f"too few images in {root} to split off a validation set (need >= 2 per class)")
        train_samples = [samples[i] for i in tr]
        val_samples = [samples[i] for i in va]
    (train, val), size = _folder_datasets([(train_samples, train_augment), (val_samples, False)], classes, image_size)
    return DataBundle(
        train=train,
        val=val,
        num_classes=len(classes),
        classes=classes,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=(3, *size),
        name=f"imagefolder:{path}",
    )
