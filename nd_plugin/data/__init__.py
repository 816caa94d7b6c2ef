"""Data sets: the embedded default (``digits``), CIFAR-10/100, image folders, synthetic data, and a user's.

:func:`load_data` turns a *spec* string, ``SCHEME[:ARGUMENT]``, into a :class:`DataBundle` (train
and validation splits plus what a model needs to know about them) through the data source
registered for ``SCHEME`` (:func:`register_data_source`; :func:`list_data_sources`). Every data
set yields ``(image, label)`` with ``image`` a normalised ``float32`` tensor ``(C, H, W)`` and
``label`` an ``int``. The built-in sources, registered as a user's are:

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

The package: :mod:`~nd_plugin.data.bundle` (what every source shares: :class:`DataBundle`,
:class:`TensorImageDataset`, the constants, the fixed split), :mod:`~nd_plugin.data.registry`
(:func:`load_data` and the registry), :mod:`~nd_plugin.data.sources` (the built-in sources) and
:mod:`~nd_plugin.data.image_folder` (image folders); the names below are its public face.

Example:
    >>> from nd_plugin.data import load_data
    >>> data = load_data("digits")
    >>> len(data.train), len(data.val), data.num_classes, data.input_size
    (1438, 359, 10, (3, 32, 32))
    >>> x, y = next(iter(data.loader("train", batch_size=8)))
    >>> x.shape
    torch.Size([8, 3, 32, 32])
"""

from nd_plugin.data import sources  # noqa: F401  (registers the built-in data sources)
from nd_plugin.data.bundle import (
    DIGITS_MEAN,
    DIGITS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    TensorImageDataset,
    data_root,
)
from nd_plugin.data.image_folder import ImageFileDataset, image_folder_data, load_image_folder
from nd_plugin.data.registry import (
    DataSource,
    list_data_sources,
    load_data,
    register_data_source,
    unregister_data_source,
)

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataBundle",
    "DataSource",
    "ImageFileDataset",
    "TensorImageDataset",
    "data_root",
    "image_folder_data",
    "list_data_sources",
    "load_data",
    "load_image_folder",
    "register_data_source",
    "unregister_data_source",
]
