"""Tests of the data-source registry: the built-in sources, a user's source, the errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from nd_plugin.data import (
    DataBundle,
    TensorImageDataset,
    list_data_sources,
    load_data,
    register_data_source,
    unregister_data_source,
)
from nd_plugin.errors import DataError, NDError, UnknownDataSourceError

BUILTIN = ["digits", "cifar10", "cifar100", "imagefolder:PATH", "synthetic[:N]"]


def stripes(arg: str | None, *, image_size: int | None = None, train_augment: bool = True, download: bool = False) -> DataBundle:
    """A user's source: ``N`` (default 30) 8x8 images of two classes, vertical or horizontal stripes."""
    n = int(arg or 30)
    y = torch.arange(n) % 2
    x = torch.zeros(n, 3, 8, 8)
    x[y == 0, :, :, ::2] = 1.0
    x[y == 1, :, ::2, :] = 1.0
    mean, std = (0.5,) * 3, (0.5,) * 3
    ds = TensorImageDataset(x, y, mean, std, classes=["vertical", "horizontal"])
    return DataBundle(ds, ds, 2, ["vertical", "horizontal"], mean, std, (3, 8, 8), name=f"stripes:{n}")


@pytest.fixture()
def register() -> Iterator[Callable[..., Callable[..., DataBundle]]]:
    """``register(scheme, source, **kw)``: :func:`register_data_source`, undone after the test (pass or fail)."""
    schemes: list[str] = []

    def _register(scheme: str, source: Callable[..., DataBundle], **kw) -> Callable[..., DataBundle]:
        out = register_data_source(scheme, source, **kw)
        schemes.append(scheme)
        return out

    yield _register
    for scheme in schemes:
        unregister_data_source(scheme)


def test_builtin_sources_are_registered_in_order():
    assert list_data_sources() == BUILTIN


@pytest.mark.parametrize("spec, n", [("stripes:12", 12), ("Stripes:40", 40), ("stripes", 30), (" stripes:20 ", 20)])
def test_a_users_source_loads_by_its_scheme(register, spec, n):
    register("stripes", stripes, argument="N", optional=True)
    assert list_data_sources() == [*BUILTIN, "stripes[:N]"]
    data = load_data(spec)
    assert (len(data.train), data.num_classes, data.input_size, data.name) == (n, 2, (3, 8, 8), f"stripes:{n}")
    x, y = data.train[1]
    assert x.shape == (3, 8, 8) and y == 1


def test_a_users_source_trains_a_run_and_the_run_reloads_it(register, tmp_path: Path):
    """Registered without editing the library: TrainConfig names it, the run directory records it, open_run reloads it."""
    from nd_plugin import TrainConfig, decouple, open_run

    register("stripes", stripes, argument="N", optional=True)
    cfg = TrainConfig(model="cifar:resnet20", data="stripes:32", epochs=1, warmup_epochs=0, batch_size=16, device="cpu")
    summary = decouple(cfg, tmp_path / "run", progress=False)
    assert 0.0 <= summary["top1"] <= 1.0
    run = open_run(tmp_path / "run")
    assert run.config["data"] == "stripes:32" and run.config["classes"] == ["vertical", "horizontal"]
    assert len(run.data().val) == 32


@pytest.mark.parametrize("spec", ["imagenet", "stripe:3", "mydata:x"])
def test_unknown_scheme_is_a_typed_error_listing_the_registered(register, spec):
    register("stripes", stripes, argument="N", optional=True)
    with pytest.raises(
        UnknownDataSourceError,
        match=r"unknown data set .*; known: digits, cifar10, cifar100, imagefolder:PATH, synthetic\[:N\], stripes\[:N\]$",
    ):
        load_data(spec)
    assert issubclass(UnknownDataSourceError, DataError) and issubclass(UnknownDataSourceError, NDError)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("digits:3", "digits takes no argument"),
        ("cifar10:x", "cifar10 takes no argument"),
        ("imagefolder", "needs an argument: imagefolder:PATH"),
    ],
)
def test_an_argument_where_none_is_taken_or_missing_where_one_is_needed(spec, message):
    with pytest.raises(DataError, match=message):
        load_data(spec)


@pytest.mark.parametrize(
    "scheme, source, message",
    [
        ("digits", stripes, "already registered"),
        ("My Data", stripes, "lower-case letters"),
        ("my:data", stripes, "lower-case letters"),
        ("", stripes, "lower-case letters"),
        ("notcallable", 3, "needs a callable"),
    ],
)
def test_registration_errors(scheme, source, message):
    with pytest.raises(DataError, match=message):
        register_data_source(scheme, source)
    assert list_data_sources() == BUILTIN  # nothing half-registered


def test_a_source_that_returns_no_bundle_and_unregistering_the_unknown(register):
    register("broken", lambda arg, **kw: [1, 2, 3])
    with pytest.raises(DataError, match="'broken' returned a list, not a DataBundle"):
        load_data("broken")
    with pytest.raises(UnknownDataSourceError, match="known: digits"):
        unregister_data_source("nothing")
