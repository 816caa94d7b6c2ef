"""Data specs -> data sets: the data-source registry behind :func:`load_data`.

A spec is ``SCHEME`` or ``SCHEME:ARGUMENT`` (``digits``, ``cifar10``, ``imagefolder:/data/cifar``,
``synthetic:200``). Each scheme is a *data source*, a function registered with
:func:`register_data_source`, called as ``source(argument, image_size=..., train_augment=...,
download=...)`` (``argument`` is ``None`` when the spec has no ``:``) and returning a
:class:`~nd_plugin.data.bundle.DataBundle`. The built-in sources (:mod:`nd_plugin.data.sources`)
are registered exactly so; a user registers ``mydata`` the same way, and ``load_data("mydata:...")``,
``TrainConfig(data="mydata:...")`` and a run's ``config.json`` then name it.

Example:
    >>> import torch
    >>> from nd_plugin.data import DataBundle, TensorImageDataset
    >>> @register_data_source("noise", argument="N", optional=True)
    ... def noise(n, *, image_size=None, train_augment=True, download=False):
    ...     n = int(n or 40)
    ...     ds = TensorImageDataset(torch.rand(n, 3, 8, 8), torch.arange(n) % 2, mean=(0.5,) * 3, std=(0.3,) * 3)
    ...     return DataBundle(ds, ds, 2, ["a", "b"], (0.5,) * 3, (0.3,) * 3, (3, 8, 8), name=f"noise:{n}")
    >>> len(load_data("noise:10").train), list_data_sources()[-1]
    (10, 'noise[:N]')
    >>> _ = unregister_data_source("noise")
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from nd_plugin.data.bundle import DataBundle
from nd_plugin.errors import DataError, UnknownDataSourceError

__all__ = ["DataSource", "list_data_sources", "load_data", "register_data_source", "unregister_data_source"]

#: A data source: ``source(argument, *, image_size, train_augment, download) -> DataBundle``.
DataSource = Callable[..., DataBundle]
_SCHEME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


@dataclass(frozen=True)
class _Entry:
    source: DataSource
    argument: str | None
    optional: bool

    def usage(self, scheme: str) -> str:
        if self.argument is None:
            return scheme
        return f"{scheme}[:{self.argument}]" if self.optional else f"{scheme}:{self.argument}"


_SOURCES: dict[str, _Entry] = {}


def register_data_source(
    scheme: str, source: DataSource | None = None, *, argument: str | None = None, optional: bool = False
) -> DataSource | Callable[[DataSource], DataSource]:
    """Makes ``SCHEME[:ARGUMENT]`` a data spec that :func:`load_data` (and every command) loads.

    The source is called as ``source(argument, image_size=..., train_augment=..., download=...)``
    (``argument``: the text after the first ``:``, or ``None`` without one; ``image_size``: the side
    the images should have, ``None`` for their own; ``train_augment``: augment the training split;
    ``download``: fetching is allowed) and returns a :class:`~nd_plugin.data.bundle.DataBundle`.
    Sources are listed in registration order, the built-in ones first. The registry lives in this
    process: for the ``nd`` commands, import the module that registers it with ``nd --import PKG.MOD ...``.

    Args:
        scheme: lower-case letters, digits, ``_``, ``.``, ``-`` (specs are matched case-insensitively).
        source: the function; omitted, ``register_data_source(scheme, ...)`` is a decorator.
        argument: what follows ``SCHEME:`` (e.g. ``"PATH"``; for messages and listings); ``None``:
            the scheme takes no argument.
        optional: the argument may be left out.

    Returns:
        ``source``, or the decorator.

    Raises:
        DataError: the scheme is malformed or taken, or ``source`` is not callable.
    """
    if source is None:
        return lambda f: register_data_source(scheme, f, argument=argument, optional=optional)  # type: ignore[return-value]
    if not isinstance(scheme, str) or not _SCHEME.fullmatch(scheme):
        raise DataError(f"a data-source scheme is lower-case letters, digits, '_', '.' or '-', got {scheme!r}.")
    if scheme in _SOURCES:
        raise DataError(
            f"a data source named {scheme!r} is already registered; choose another scheme, or call "
            f"unregister_data_source({scheme!r}) first."
        )
    if not callable(source):
        raise DataError(f"register_data_source({scheme!r}) needs a callable, got {source!r}.")
    _SOURCES[scheme] = _Entry(source, argument, bool(optional))
    return source


def unregister_data_source(scheme: str) -> DataSource:
    """Removes ``scheme`` from the registry and returns its source.

    Raises:
        UnknownDataSourceError: nothing is registered under ``scheme``.
    """
    if scheme not in _SOURCES:
        raise UnknownDataSourceError(f"unknown data source '{scheme}'; known: {', '.join(list_data_sources())}")
    return _SOURCES.pop(scheme).source


def list_data_sources() -> list[str]:
    """How each registered scheme is written, in registration order.

    Example:
        >>> list_data_sources()
        ['digits', 'cifar10', 'cifar100', 'imagefolder:PATH', 'synthetic[:N]']
    """
    return [entry.usage(scheme) for scheme, entry in _SOURCES.items()]


def load_data(
    spec: str,
    *,
    image_size: int | None = None,
    train_augment: bool = True,
    download: bool = False,
) -> DataBundle:
    """Loads a data set by spec: ``SCHEME[:ARGUMENT]`` of a registered data source.

    Args:
        spec: ``digits``, ``cifar10``, ``cifar100``, ``imagefolder:PATH``, ``synthetic[:N]``, or a
            scheme registered with :func:`register_data_source`.
        image_size: Side of the (square) images yielded; None keeps the data set's own size
            (32 for digits, CIFAR and synthetic; the files' size for small image folders; 224 for
            large image folders).
        train_augment: Augment the training split (random crop and flip); the validation split
            is never augmented.
        download: Download CIFAR when it is not under :func:`~nd_plugin.data.bundle.data_root`
            (needs network).

    Returns:
        The :class:`~nd_plugin.data.bundle.DataBundle`.

    Raises:
        UnknownDataSourceError: no data source is registered for the spec's scheme (the message
            lists the registered ones).
        DataError: an argument given to a scheme that takes none (or missing where one is
            needed), missing or empty data, bad ``image_size``.

    Example:
        >>> data = load_data("synthetic:200", image_size=16)
        >>> data.input_size, data.num_classes
        ((3, 16, 16), 10)
        >>> load_data("imagenet")
        Traceback (most recent call last):
        ...
        nd_plugin.errors.UnknownDataSourceError: unknown data set 'imagenet'; known: digits, cifar10, cifar100, imagefolder:PATH, synthetic[:N]
    """
    known = ", ".join(list_data_sources())
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data spec must be a non-empty string; known: {known}")
    spec = spec.strip()
    scheme, sep, arg = spec.partition(":")
    scheme = scheme.lower()
    entry = _SOURCES.get(scheme)
    if entry is None:
        hint = " (for a folder of images write imagefolder:PATH)" if os.path.isdir(spec) else ""
        raise UnknownDataSourceError(f"unknown data set '{spec}'{hint}; known: {known}")
    if sep and entry.argument is None:
        raise DataError(f"{scheme} takes no argument, got '{spec}'; known: {known}")
    if not sep and entry.argument is not None and not entry.optional:
        raise DataError(f"{scheme} needs an argument: {entry.usage(scheme)}")
    bundle = entry.source(arg if sep else None, image_size=image_size, train_augment=train_augment, download=download)
    if not isinstance(bundle, DataBundle):
        raise DataError(f"the data source {scheme!r} returned a {type(bundle).__name__}, not a DataBundle.")
    return bundle
