"""Tests of nd_plugin.data: digits, synthetic, image folders, CIFAR errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nd_plugin.data import (
    DIGITS_MEAN,
    IMAGENET_MEAN,
    DataBundle,
    TensorImageDataset,
    load_data,
    load_image_folder,
)
from nd_plugin.errors import DataError

CLASSES = ["cat", "dog", "frog"]


def make_folder(root: Path, per_class: int, size: int = 16, ext: str = "png", seed: int = 0) -> Path:
    """Writes ``root/<class>/<i>.<ext>`` images whose mean colour depends on the class."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.full((size, size, 3), 40 + 80 * c, dtype=np.uint8)
            pixels = (pixels + rng.integers(0, 30, pixels.shape)).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{ext}")
    return root


# --- digits ---------------------------------------------------------------------------------


def test_digits_shapes_split_and_normalisation() -> None:
    data = load_data("digits")
    assert isinstance(data, DataBundle)
    assert (len(data.train), len(data.val)) == (1438, 359)
    assert data.num_classes == 10 and data.classes == [str(i) for i in range(10)]
    assert data.input_size == (3, 32, 32) and data.mean == DIGITS_MEAN
    x, y = data.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    # stratified: every class in both splits, in about the same proportion
    val_counts = torch.bincount(data.val.targets, minlength=10)
    assert val_counts.min() >= 35 and val_counts.max() <= 37
    # the whole validation split is roughly standardised
    xs = torch.stack([data.val[i][0] for i in range(len(data.val))])
    assert abs(xs.mean().item()) < 0.1 and abs(xs.std().item() - 1) < 0.1


def test_digits_split_is_fixed_and_independent_of_global_rng() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    a = load_data("digits", train_augment=False)
    torch.manual_seed(2)
    np.random.seed(2)
    b = load_data("digits", train_augment=False)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.targets, b.train.targets)
    assert torch.equal(a.train[5][0], b.train[5][0])  # no augmentation: identical items


def test_digits_augmentation_and_image_size() -> None:
    data = load_data("digits", image_size=24)
    assert data.input_size == (3, 24, 24) and data.train[0][0].shape == (3, 24, 24)
    torch.manual_seed(0)
    views = {tuple(data.train[0][0].flatten()[::50].tolist()) for _ in range(8)}
    assert len(views) > 1  # random crops differ
    assert torch.equal(data.val[0][0], data.val[0][0])  # validation is never augmented


def test_loader_defaults() -> None:
    data = load_data("synthetic:100")
    torch.manual_seed(0)
    x, y = next(iter(data.loader("train", batch_size=16)))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,) and y.dtype == torch.long
    val_batches = list(data.loader("val", batch_size=8))
    assert torch.equal(torch.cat([b[1] for b in val_batches]), data.val.targets)  # not shuffled
    sampler = torch.utils.data.SequentialSampler(data.train)
    assert len(data.loader("train", batch_size=10, sampler=sampler)) == 8
    assert len(data.loader("test", batch_size=10)) == 2
    with pytest.raises(DataError, match="unknown split"):
        data.loader("holdout", batch_size=4)


# --- synthetic ------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_learnable() -> None:
    a, b = load_data("synthetic:200"), load_data("synthetic:200")
    assert (len(a.train), len(a.val), a.num_classes, a.input_size) == (160, 40, 10, (3, 32, 32))
    assert torch.equal(a.train.images, b.train.images)
    assert len(load_data("synthetic").train) == 800

    # class structure: a nearest-class-mean classifier on mean colours separates the classes
    def colours(ds: TensorImageDataset) -> torch.Tensor:
        return ds.images.mean(dim=(2, 3))

    means = torch.stack([colours(a.train)[a.train.targets == c].mean(0) for c in range(10)])
    pred = torch.cdist(colours(a.val), means).argmin(1)
    assert (pred == a.val.targets).float().mean() > 0.9


@pytest.mark.parametrize("bad", ["synthetic:x", "synthetic:5", "synthetic:-100"])
def test_synthetic_bad_n(bad: str) -> None:
    with pytest.raises(DataError, match="synthetic:N"):
        load_data(bad)


# --- image folders --------------------------------------------------------------------------


def test_imagefolder_class_root_split(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", per_class=10)
    data = load_data(f"imagefolder:{tmp_path / 'imgs'}")
    assert data.classes == CLASSES and data.num_classes == 3
    assert (len(data.train), len(data.val)) == (27, 3)  # 90/10 per class
    assert data.input_size == (3, 16, 16) and data.mean == IMAGENET_MEAN
    assert sorted(data.val.targets.tolist()) == [0, 1, 2]
    x, y = data.val[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    again = load_data(f"imagefolder:{tmp_path / 'imgs'}")
    assert torch.equal(data.val.images, again.val.images)  # fixed split


def test_imagefolder_train_val_folders(tmp_path: Path) -> None:
    make_folder(tmp_path / "ds" / "train", per_class=4, ext="jpg")
    make_folder(tmp_path / "ds" / "val", per_class=2, ext="jpg", seed=1)
    data = load_data(f"imagefolder:{tmp_path / 'ds'}", train_augment=False)
    assert (len(data.train), len(data.val)) == (12, 6)
    # class-dependent brightness survives decoding and normalisation
    means = [data.val[i][0].mean().item() for i in range(len(data.val))]
    labels = data.val.targets.tolist()
    darkest = max(m for m, t in zip(means, labels) if t == 0)
    assert darkest < min(m for m, t in zip(means, labels) if t == 2)


def test_imagefolder_test_folder_and_val_class_subset(tmp_path: Path) -> None:
    make_folder(tmp_path / "ds" / "train", per_class=3)
    (tmp_path / "ds" / "test" / "dog").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "ds" / "test" / "dog" / "a.png")
    data = load_data(f"imagefolder:{tmp_path / 'ds'}")
    assert len(data.val) == 1 and data.val[0][1] == CLASSES.index("dog")


def test_imagefolder_resizes_and_converts_mixed_images(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", per_class=3, size=16)
    Image.new("L", (20, 12)).save(root / "cat" / "gray.png")  # other size, grayscale
    data = load_data(f"imagefolder:{root}", image_size=8)
    assert data.input_size == (3, 8, 8)
    assert all(data.train[i][0].shape == (3, 8, 8) for i in range(len(data.train)))


def test_imagefolder_large_images_read_per_item(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "big", per_class=2, size=80, ext="jpg")
    data = load_data(f"imagefolder:{root}", image_size=48)
    assert data.input_size == (3, 48, 48)
    assert data.train[0][0].shape == (3, 48, 48) and data.val[0][0].shape == (3, 48, 48)


def test_load_image_folder_without_split(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "test", per_class=5)
    ds = load_image_folder(root)
    assert len(ds) == 15 and ds.classes == CLASSES


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found: .*missing"):
        load_data(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty ImageFolder.*no class subfolders"):
        load_data(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "noimgs" / "cat").mkdir(parents=True)
    (tmp_path / "noimgs" / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="empty ImageFolder.*no images"):
        load_data(f"imagefolder:{tmp_path / 'noimgs'}")
    (tmp_path / "one" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "cat" / "a.png")
    with pytest.raises(DataError, match="too few images"):
        load_data(f"imagefolder:{tmp_path / 'one'}")
    with pytest.raises(DataError, match="needs a path"):
        load_data("imagefolder:")


# --- other specs ----------------------------------------------------------------------------


def test_cifar_absent_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ND_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"cifar10 not found .*pass download=True .*imagefolder:PATH") as info:
        load_data("cifar10")
    assert info.value.params == ("download",)
    with pytest.raises(DataError, match="cifar100 not found"):
        load_data("cifar100")


def test_cifar_from_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny fake CIFAR-10 in torchvision's on-disk format loads through the in-memory path."""
    import pickle

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        with open(base / fname, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setenv("ND_DATA_DIR", str(tmp_path))
    import torchvision.datasets.cifar

    # the fake files have other checksums than the real ones
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kw: True)
    data = load_data("cifar10")
    assert (len(data.train), len(data.val), data.num_classes) == (20, 4, 10)
    assert data.train[0][0].shape == (3, 32, 32) and data.mean == IMAGENET_MEAN


@pytest.mark.parametrize("spec", ["imagenet", "digits:3", "", "cifar10:x"])
def test_unknown_spec_lists_known(spec: str) -> None:
    with pytest.raises(DataError, match="digits, cifar10, cifar100, imagefolder:PATH, synthetic"):
        load_data(spec)


def test_bad_image_size() -> None:
    with pytest.raises(DataError, match="image_size"):
        load_data("synthetic:100", image_size=0)


@pytest.mark.parametrize("size", [32, 48])
def test_run_data_comes_back_at_the_trained_input_size(tmp_path, size: int) -> None:
    import json

    from nd_plugin.run import open_run

    (tmp_path / "config.json").write_text(
        json.dumps({"model": "resnet18", "data": "digits", "num_classes": 10, "input_size": [3, size, size]})
    )
    bundle = open_run(tmp_path).data()
    assert bundle.input_size == (3, size, size)
    assert bundle.val[0][0].shape == (3, size, size)
