"""The detector extension point: the :class:`Detector` base class, what it reads (:class:`DetectorInput`), the registry.

A detector is one row of ``nd detect``'s table. Like torch-pruning's ``Importance``, it is a small
class: :meth:`Detector.features` reads some inputs and returns either scores (unsupervised;
higher = more likely adversarial) or features that a regression fitted on attacked against clean
inputs turns into scores (supervised); :meth:`Detector.evaluate` measures it on the protocol's
splits. Like timm's ``register_model``, :func:`register_detector` files a class under a name;
the built-in detectors (:mod:`nd_plugin.detect.builtin`) are registered exactly so, and
:func:`~nd_plugin.detect.protocol.evaluate` and ``nd detect`` measure whatever is registered.

Example:
    >>> import numpy as np
    >>> @register_detector("max_logit")
    ... class MaxLogit(Detector):
    ...     '''Minus the largest logit: attacked inputs sit near a decision boundary.'''
    ...
    ...     def features(self, inputs: DetectorInput) -> np.ndarray:
    ...         return -inputs.probe.logits.max(1)
    >>> "max_logit" in list_detectors(), create_detector("max_logit").name
    (True, 'max_logit')
    >>> _ = unregister_detector("max_logit")
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import numpy as np
import torch
from torch import nn

from nd_plugin.detect.features import Probe
from nd_plugin.detect.metrics import Splits, evaluate_supervised, evaluate_unsupervised
from nd_plugin.errors import ConfigError, UnknownDetectorError

if TYPE_CHECKING:
    from nd_plugin.detect.protocol import FittedDetectors

__all__ = [
    "READS",
    "Detector",
    "DetectorInput",
    "Features",
    "create_detector",
    "list_detectors",
    "register_detector",
    "resolve_detectors",
    "unregister_detector",
]

#: What a detector may read beyond the forward pass's path and logits (:attr:`Detector.reads`):
#: the penultimate features, the pooled stage features, extra passes through the model.
READS = frozenset({"features", "stages", "model"})

#: What :meth:`Detector.features` returns: ``(N,)`` scores, ``(N, F)`` features, ``{choice: (N, F)}``
#: features per value of one hyperparameter, or anything its own :meth:`Detector.candidates` reads
#: (LID: per-layer stage features), hence ``Any``.
Features: TypeAlias = Any

_REGISTRY: dict[str, type[Detector]] = {}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class DetectorInput:
    """What a detector may read of some inputs (clean or attacked).

    Attributes:
        probe: their forward pass (:class:`~nd_plugin.detect.features.Probe`: predictions, logits,
            gates and soft paths, and the penultimate and stage features when collected).
        fitted: the clean statistics fitted on training inputs
            (:class:`~nd_plugin.detect.protocol.FittedDetectors`: the path detector, the penultimate
            Mahalanobis baseline, Lee's Gaussians), or ``None``.
        dm: the decoupled model, for detectors that run extra passes (``"model"`` in
            :attr:`Detector.reads`), or ``None``.
        x: the normalised inputs, for the same detectors, or ``None``.
        std: the data normalisation's per-channel std (a pixel step ``ε`` is ``ε / std`` there).
        batch_size: inputs per extra pass.
    """

    probe: Probe
    fitted: FittedDetectors | None = None
    dm: nn.Module | None = None
    x: torch.Tensor | None = None
    std: Sequence[float] = ()
    batch_size: int = 200

    @cached_property
    def path_features(self) -> np.ndarray:
        """``(N, L·2K)`` the fitted path detector's per-layer path features, computed once for
        every detector that reads them (:meth:`~nd_plugin.detect.detectors.PathDetector.path_features`)."""
        return self.fitted.path.path_features(self.probe)


class Detector(ABC):
    """A detector of adversarial inputs, as the protocol measures it (the base of every registered detector).

    Subclasses implement :meth:`features`. An unsupervised detector (``supervised = False``)
    returns ``(N,)`` scores, higher = more likely adversarial, measured as they are. A supervised
    one returns ``(N, F)`` features, or ``{choice: (N, F)}`` when one hyperparameter is chosen on
    held-out data (as Lee et al. choose a preprocessing magnitude); :meth:`evaluate` fits Lee's
    logistic regression on attacked against clean inputs of each split's fit part, keeps the
    choice that scores best on its choice part, and tests on the rest. Override
    :meth:`candidates` to build the choices from clean and attacked features together (LID does),
    or :meth:`evaluate` to measure otherwise.

    Attributes:
        name: the name it is registered (and reported) under; set by :func:`register_detector`
            (a subclass inherits it until registered under its own).
        supervised: whether its features go through the regression.
        reads: what it reads beyond the path and logits (a subset of :data:`READS`); a probe or a
            :class:`DetectorInput` without them can still feed the detectors that read nothing more.
    """

    name: ClassVar[str] = ""
    supervised: ClassVar[bool] = False
    reads: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def features(self, inputs: DetectorInput) -> Features:
        """What the detector reads of ``inputs``: scores (unsupervised) or features (supervised)."""

    def candidates(self, clean: Features, adv: Features, adv_index: np.ndarray) -> dict[Hashable, tuple[np.ndarray, np.ndarray]]:
        """``{choice: (clean (N, F), attacked (M, F))}``: what the regression chooses among.

        Args:
            clean: :meth:`features` of the clean inputs.
            adv: :meth:`features` of the attacked inputs.
            adv_index: ``(M,)`` the clean input each attacked one was made from.

        Example:
            >>> from nd_plugin.detect.builtin import MaxSoftmax
            >>> c, a = np.zeros((3, 2)), np.ones((2, 2))
            >>> list(MaxSoftmax().candidates(c, a, np.arange(2))), list(MaxSoftmax().candidates({0.1: c}, {0.1: a}, np.arange(2)))
            ([None], [0.1])
        """
        if isinstance(clean, Mapping):
            return {k: (clean[k], adv[k]) for k in clean}
        return {None: (clean, adv)}

    def evaluate(
        self,
        clean: Features,
        adv: Features,
        adv_index: np.ndarray,
        splits: Splits | Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
        *,
        transfer: tuple[Features, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """The detector on ``splits`` (:func:`~nd_plugin.detect.protocol.plan`'s, or Lee's).

        Args:
            clean: :meth:`features` of the clean inputs; adv: of the attacked ones.
            adv_index: ``(M,)`` the clean input each attacked one was made from.
            splits: ``(fit, choice, test)`` indices of clean inputs (their attacks follow them).
            transfer: ``(adv2, adv_index2)``: features of another attack on the same clean inputs
                to test on, the regression being fitted on ``adv`` (supervised detectors only).

        Returns:
            ``{"auroc", "auroc_std", "tpr_at_5fpr", "tpr_at_5fpr_std", "seeds"[, "chosen"]}``.
        """
        if not self.supervised:
            if transfer is not None:
                raise ConfigError(f"{self.name or type(self).__name__} is unsupervised: it has nothing fitted to transfer.")
            return evaluate_unsupervised(clean, adv, adv_index, splits)
        kw: dict[str, Any] = {}
        if transfer is not None:
            kw = {"test_candidates": self.candidates(clean, transfer[0], transfer[1]), "test_adv_index": transfer[1]}
        return evaluate_supervised(self.candidates(clean, adv, adv_index), adv_index, splits, **kw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, supervised={self.supervised})"


def register_detector(name: str, cls: type[Detector] | None = None) -> Any:
    """Files a :class:`Detector` subclass under ``name``: the protocol and ``nd detect`` measure it.

    Detectors are listed (and measured, and tabled) in the order they were registered; the
    built-in ones come first. The registry lives in this process: for the ``nd`` commands, import
    the module that registers it with ``nd --import PKG.MOD ...``.

    Args:
        name: letters, digits, ``_``, ``.``, ``-``.
        cls: the class; omitted, ``register_detector(name)`` is a class decorator.

    Returns:
        ``cls`` (with :attr:`Detector.name` set), or the decorator.

    Raises:
        ConfigError: the name is malformed or taken, or ``cls`` is not a :class:`Detector` subclass.

    Example:
        >>> register_detector("path", Detector)
        Traceback (most recent call last):
        ...
        nd_plugin.errors.ConfigError: a detector named 'path' is already registered (PathDistance); choose another name, or call unregister_detector('path') first.
    """
    if cls is None:
        return lambda c: register_detector(name, c)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"a detector name is letters, digits, '_', '.' or '-', got {name!r}.")
    if not (isinstance(cls, type) and issubclass(cls, Detector)):
        raise ConfigError(f"register_detector({name!r}) needs a subclass of nd_plugin.detect.Detector, got {cls!r}.")
    if name in _REGISTRY:
        raise ConfigError(
            f"a detector named {name!r} is already registered ({_REGISTRY[name].__name__}); choose another name, "
            f"or call unregister_detector({name!r}) first."
        )
    bad = set(cls.reads) - READS
    if bad:
        raise ConfigError(f"{cls.__name__}.reads holds {sorted(bad)}; known: {sorted(READS)}.")
    cls.name = name
    _REGISTRY[name] = cls
    return cls


def unregister_detector(name: str) -> type[Detector]:
    """Removes ``name`` from the registry and returns its class (which no longer carries the name).

    Raises:
        UnknownDetectorError: nothing is registered under ``name``.
    """
    if name not in _REGISTRY:
        raise _unknown(name)
    cls = _REGISTRY.pop(name)
    if cls.__dict__.get("name") == name:  # the name register_detector gave it
        del cls.name
    return cls


def list_detectors(*, supervised: bool | None = None, reads: Iterable[str] | None = None) -> list[str]:
    """The registered detectors' names, in registration order (the built-in ones first).

    Args:
        supervised: only the supervised (``True``) or the unsupervised (``False``) ones.
        reads: only those that read nothing beyond the path, the logits and these (e.g. ``()``:
            the detectors a bare forward pass feeds).

    Example:
        >>> list_detectors(supervised=False)
        ['path', 'mahalanobis_penultimate', 'max_softmax']
        >>> list_detectors(reads=())
        ['path', 'path_supervised', 'path_supervised_raw', 'path_supervised_full', 'max_softmax']
    """
    allowed = None if reads is None else frozenset(reads)
    return [
        n
        for n, c in _REGISTRY.items()
        if (supervised is None or c.supervised == supervised) and (allowed is None or c.reads <= allowed)
    ]


def create_detector(name: str, **options: Any) -> Detector:
    """The detector registered under ``name``, built with ``options`` (its ``__init__``'s keyword arguments).

    Example:
        >>> create_detector("mahalanobis_lee", magnitudes=(0.0, 0.001)).magnitudes
        (0.0, 0.001)
        >>> create_detector("odin")
        Traceback (most recent call last):
        ...
        nd_plugin.errors.UnknownDetectorError: unknown detector 'odin'; known detectors: path, path_supervised, path_supervised_raw, path_supervised_full, combined, mahalanobis_lee, lid, mahalanobis_penultimate, max_softmax.
    """
    key = str(name).strip()
    if key not in _REGISTRY:
        raise _unknown(key)
    return _REGISTRY[key](**options)


def resolve_detectors(
    detectors: Iterable[str | Detector] | None = None, options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Detector]:
    """Detector names (or instances, kept as they are) as instances, checked before any work.

    Args:
        detectors: names or :class:`Detector` instances; ``None``: every registered detector.
        options: per name, the keyword arguments to build it with (e.g.
            ``{"mahalanobis_lee": {"magnitudes": (0.0, 0.001)}}``); names not measured are ignored.

    Raises:
        UnknownDetectorError: a name is not registered, or none is named.
        ConfigError: a detector is named twice, or an instance has no name (register its class).

    Example:
        >>> [d.name for d in resolve_detectors(["path", "lid"])]
        ['path', 'lid']
    """
    options = options or {}
    items = list(_REGISTRY) if detectors is None else list(detectors)
    out = [d if isinstance(d, Detector) else create_detector(d, **options.get(str(d).strip(), {})) for d in items]
    if not out:
        raise UnknownDetectorError(f"no detector named; known detectors: {', '.join(_REGISTRY)}.")
    names = [d.name for d in out]
    if "" in names:
        bad = type(out[names.index("")]).__name__
        raise ConfigError(f"a {bad} has no name: register its class (register_detector) or set its name.")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"detector {twice[0]!r} is named twice; each is measured once.")
    return out


def _unknown(name: str) -> UnknownDetectorError:
    return UnknownDetectorError(f"unknown detector {name!r}; known detectors: {', '.join(_REGISTRY)}.")
