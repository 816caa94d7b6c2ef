"""Model names -> models, from the CIFAR zoo, torchvision or timm.

A model name is either *qualified*, ``SOURCE:NAME`` with ``SOURCE`` one of ``cifar``, ``tv``
(alias ``torchvision``) and ``timm``, or *bare*. Like ``torch.hub``'s entry points, a bare name
is looked up exactly, in this order, and the first source that has it wins:

1. the CIFAR zoo (``resnet20/32/44/56/110``, ``vgg16_bn``: 32x32 inputs),
2. torchvision's classification models (``resnet18``, ``mobilenet_v2``, ...),
3. timm (``resnet18d``, ``resnet18.a1_in1k``, ``convnext_atto``, ...).

So ``resnet18`` is torchvision's ResNet-18 and ``vgg16_bn`` is the CIFAR VGG-16; write
``tv:vgg16_bn`` or ``timm:resnet18`` for the others. A name found nowhere raises
:class:`~nd_plugin.errors.UnknownModelError` with close candidates.

Models start from random weights unless ``pretrained=True`` (which needs network access, or a
populated torch hub / Hugging Face cache) or a ``checkpoint`` is given.

Example:
    >>> from nd_plugin.adapters import create_model, resolve_name
    >>> resolve_name("resnet18")
    'tv:resnet18'
    >>> create_model("cifar:resnet20", num_classes=100).linear.out_features
    100
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from typing import Callable

import timm
import torch
import torchvision
from torch import nn

from nd_plugin.errors import ConfigError, UnknownModelError

from .checkpoint import load_checkpoint
from .cifar import CIFAR_MODELS

__all__ = ["SOURCES", "list_models", "resolve_name", "create_model", "default_input_size"]

#: Model sources in bare-name priority order.
SOURCES: tuple[str, ...] = ("cifar", "tv", "timm")
_ALIASES = {"torchvision": "tv", "cifar": "cifar", "tv": "tv", "timm": "timm"}
_MAX_CANDIDATES = 8

# Public CIFAR ResNet weights (Yerlan Idelbayev, BSD-2-Clause); the hash prefix in each file name
# is checked by torch.hub.
_CIFAR_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
_CIFAR_WEIGHTS = {
    "resnet20": _CIFAR_URL + "resnet20-12fca82f.th",
    "resnet32": _CIFAR_URL + "resnet32-d509ac18.th",
    "resnet44": _CIFAR_URL + "resnet44-014dd654.th",
    "resnet56": _CIFAR_URL + "resnet56-4bfd9763.th",
    "resnet110": _CIFAR_URL + "resnet110-1d1ed7c2.th",
}


def _tv_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _names(source: str) -> list[str]:
    if source == "cifar":
        return sorted(CIFAR_MODELS)
    if source == "tv":
        return _tv_names()
    return timm.list_models()


def _has(source: str, name: str) -> bool:
    if source == "cifar":
        return name in CIFAR_MODELS
    if source == "tv":
        return name in _tv_names()
    return timm.is_model(name)  # also accepts pretrained tags, e.g. "resnet18.a1_in1k"


def list_models(pattern: str | None = None) -> list[str]:
    """Lists qualified model names, optionally filtered by a shell-style pattern.

    The pattern is matched (case-insensitively, :mod:`fnmatch` syntax) against both the qualified
    and the bare name. Results are grouped by source in priority order (cifar, tv, timm), each
    group sorted.

    Args:
        pattern: e.g. ``"resnet*"``, ``"tv:*"``, ``"*efficientnet_b[01]"``; None lists all.

    Returns:
        Qualified names such as ``"cifar:resnet20"``, ``"tv:resnet18"``, ``"timm:resnet18"``.

    Example:
        >>> list_models("resnet2*")[:2]
        ['cifar:resnet20', 'timm:resnet26']
    """
    pat = pattern.lower() if pattern else None
    out = []
    for source in SOURCES:
        for name in _names(source):
            qualified = f"{source}:{name}"
            if pat is None or fnmatch.fnmatchcase(qualified.lower(), pat) or fnmatch.fnmatchcase(
                name.lower(), pat
            ):
                out.append(qualified)
    return out


def _candidates(name: str, sources: tuple[str, ...]) -> list[str]:
    pool = [(s, n) for s in sources for n in _names(s)]
    bare = name.lower().split(".")[0]
    by_bare: dict[str, list[str]] = {}
    for s, n in pool:
        by_bare.setdefault(n.lower(), []).append(f"{s}:{n}")
    close = difflib.get_close_matches(bare, list(by_bare), n=_MAX_CANDIDATES, cutoff=0.6)
    found: list[str] = [q for c in close for q in by_bare[c]]
    if len(bare) >= 3:
        found += [f"{s}:{n}" for s, n in pool if bare in n.lower()]
    return list(dict.fromkeys(found))[:_MAX_CANDIDATES]


def _unknown(name: str, sources: tuple[str, ...]) -> UnknownModelError:
    where = "any source" if len(sources) > 1 else f"source '{sources[0]}'"
    cands = _candidates(name, sources)
    hint = f"; close matches: {', '.join(cands)}" if cands else ""
    stem = name.split(".")[0] or name
    return UnknownModelError(
        f"unknown model '{name}' in {where}{hint}; run `nd models '*{stem}*'` to list models"
    )


def _split(name: str) -> tuple[str | None, str]:
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    if ":" in name:
        prefix, rest = name.split(":", 1)
        source = _ALIASES.get(prefix.lower())
        if source is None:
            raise UnknownModelError(
                f"unknown model source '{prefix}' in '{name}'; known sources: "
                f"{', '.join(SOURCES)} (e.g. tv:resnet18), or a bare name"
            )
        if not rest:
            raise UnknownModelError(f"model name missing after '{prefix}:'")
        return source, rest
    return None, name


def resolve_name(name: str) -> str:
    """Returns the qualified name (``SOURCE:NAME``) that ``name`` refers to.

    Args:
        name: A qualified or bare model name (see the module docstring for the lookup order).

    Returns:
        The qualified name.

    Raises:
        UnknownModelError: The name or its source is unknown; the message lists close matches.

    Example:
        >>> resolve_name("resnet56"), resolve_name("resnet18"), resolve_name("resnet18d")
        ('cifar:resnet56', 'tv:resnet18', 'timm:resnet18d')
    """
    source, bare = _split(name)
    if source is not None:
        if not _has(source, bare):
            raise _unknown(bare, (source,))
        return f"{source}:{bare}"
    for source in SOURCES:
        if _has(source, bare):
            return f"{source}:{bare}"
    raise _unknown(bare, SOURCES)


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Replaces the last classifier layer (Linear, or 1x1 Conv2d as in SqueezeNet) of a model."""
    last = None
    for qual, module in model.named_modules():
        if isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
        ):
            last = (qual, module)
    if last is None:
        raise ConfigError(f"cannot find a classifier layer to resize in {type(model).__name__}")
    qual, old = last
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None)
    parent_name, _, attr = qual.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes


def _pretrained_error(qualified: str, err: Exception) -> ConfigError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ConfigError(
        f"could not get pretrained weights for {qualified} ({type(err).__name__}: {first}); "
        f"they need network access once: run without --pretrained or pass a --checkpoint"
    )


def _build_cifar(name: str, num_classes: int | None, pretrained: bool) -> nn.Module:
    builder: Callable[..., nn.Module] = CIFAR_MODELS[name]
    if not pretrained:
        return builder(num_classes=num_classes or 10)
    url = _CIFAR_WEIGHTS.get(name)
    if url is None:
        raise ConfigError(
            f"no pretrained weights are published for cifar:{name}; "
            f"run without --pretrained or pass a --checkpoint"
        )
    model = builder(num_classes=10)
    try:
        obj = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", check_hash=True, weights_only=True
        )
    except Exception as e:  # network, hash or file errors: one clear line
        raise _pretrained_error(f"cifar:{name}", e) from e
    state = obj.get("state_dict", obj)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=False)
    if num_classes is not None and num_classes != 10:
        _replace_head(model, num_classes)
    return model


def _build_tv(name: str, num_classes: int | None, pretrained: bool) -> nn.Module:
    if not pretrained:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return torchvision.models.get_model(name, weights=None, **kwargs)
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT")
    except Exception as e:
        raise _pretrained_error(f"tv:{name}", e) from e
    if num_classes is not None:
        _replace_head(model, num_classes)
    return model


def _build_timm(name: str, num_classes: int | None, pretrained: bool) -> nn.Module:
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:
        raise _pretrained_error(f"timm:{name}", e) from e


_BUILDERS: dict[str, Callable[[str, int | None, bool], nn.Module]] = {
    "cifar": _build_cifar,
    "tv": _build_tv,
    "timm": _build_timm,
}


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Creates a model by name from the CIFAR zoo, torchvision or timm.

    Args:
        name: Qualified (``cifar:resnet20``, ``tv:resnet18``, ``timm:resnet18``) or bare name;
            bare names resolve in the order cifar, tv, timm (see the module docstring).
        num_classes: Outputs of the classifier; None keeps the source's default (10 for the
            CIFAR zoo, 1000 for torchvision and timm).
        pretrained: Start from the source's published weights (needs network access once).
            With ``num_classes`` different from the weights', the classifier is replaced by a
            freshly initialised one.
        checkpoint: A checkpoint file to load after creation (see :func:`load_checkpoint`).

    Returns:
        The model, in training mode.

    Raises:
        UnknownModelError: The name cannot be resolved.
        ConfigError: Invalid ``num_classes``, pretrained weights that cannot be fetched, or a
            checkpoint path that does not exist.
        CheckpointMismatchError: The checkpoint does not fit the model.

    Example:
        >>> model = create_model("resnet18", num_classes=10)  # torchvision, random weights
        >>> model.fc.out_features
        10
    """
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    source, bare = resolve_name(name).split(":", 1)
    model = _BUILDERS[source](bare, num_classes, pretrained)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=True)
    return model


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """Returns the ``(C, H, W)`` input size a model expects by default.

    timm models: ``model.pretrained_cfg["input_size"]``; models with a ``default_input_size``
    attribute (the CIFAR zoo): that; anything else: 224x224 (299x299 for Inception v3). The
    channel count is read from the first ``Conv2d`` when there is one (so a timm model created
    with ``in_chans=1`` reports 1 channel).

    Args:
        model: Any image model.

    Returns:
        ``(channels, height, width)``.

    Example:
        >>> default_input_size(create_model("cifar:resnet20"))
        (3, 32, 32)
        >>> default_input_size(create_model("tv:resnet18"))
        (3, 224, 224)
    """
    size: tuple[int, ...] | None = None
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        size = tuple(int(v) for v in cfg["input_size"])
    elif getattr(model, "default_input_size", None):
        size = tuple(int(v) for v in model.default_input_size)
    elif isinstance(model, torchvision.models.Inception3):
        size = (3, 299, 299)
    else:
        size = (3, 224, 224)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else size[0]
    return (channels, size[-2], size[-1])
