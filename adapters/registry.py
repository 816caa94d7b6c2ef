"""Model names -> models, from your factories, the CIFAR zoo, torchvision or timm.

A model name is either *qualified*, ``SOURCE:NAME`` with ``SOURCE`` one of ``registered``,
``cifar``, ``tv`` (alias ``torchvision``) and ``timm``, a ``module:PKG.MOD:FN`` spec, or *bare*.
Like ``torch.hub``'s entry points, a bare name is looked up exactly, in this order, and the first
source that has it wins:

1. factories registered with :func:`register_model` in this process,
2. the CIFAR zoo (``resnet20/32/44/56/110``, ``vgg16_bn``: 32x32 inputs),
3. torchvision's classification models (``resnet18``, ``mobilenet_v2``, ...),
4. timm (``resnet18d``, ``resnet18.a1_in1k``, ``convnext_atto``, ...).

``module:PKG.MOD:FN`` imports ``PKG.MOD`` (from ``sys.path``, then the current directory) and
calls its attribute ``FN``; this is how ``nd decouple module:mypkg.nets:make_net`` trains your own
network. A factory, registered or named by a spec, is called as ``factory(num_classes=K)`` (no
argument when ``num_classes`` is None, and ``pretrained=True`` only when asked for) and must return
an ``nn.Module``.

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
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

import timm
import torch
import torchvision
from torch import nn

from nd_plugin.errors import CheckpointMismatchError, ConfigError, ModelSourceError, UnknownModelError

from .checkpoint import load_checkpoint
from .cifar import CIFAR_MODELS

__all__ = [
    "SOURCES",
    "list_models",
    "resolve_name",
    "create_model",
    "default_input_size",
    "register_model",
    "unregister_model",
]

#: Model sources in bare-name priority order (``module:`` specs are not looked up by bare name).
SOURCES: tuple[str, ...] = ("registered", "cifar", "tv", "timm")
_ALIASES = {"torchvision": "tv", "cifar": "cifar", "tv": "tv", "timm": "timm", "registered": "registered", "module": "module"}
_REGISTERED: dict[str, Callable[..., nn.Module]] = {}
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


def register_model(name: str, factory: Callable[..., nn.Module] | None = None) -> Callable[..., Any]:
    """Makes ``factory`` buildable by name (``create_model(name)``, ``registered:NAME``, ``nd models``).

    The factory is called as ``factory(num_classes=K)`` (without arguments when ``num_classes`` is
    None, so give it a default; with ``pretrained=True`` only when that is asked for) and returns
    an ``nn.Module``. Registered names come first in the bare-name lookup. The registry lives in
    this process: for the ``nd`` commands, import the module that registers it with
    ``nd --import PKG.MOD ...``, or name the factory ``module:PKG.MOD:FN``.

    Args:
        name: the model's name: letters, digits, ``_``, ``-``, ``.``; no ``:``.
        factory: a callable returning the model; omitted, ``register_model(name)`` is a decorator.

    Returns:
        ``factory`` (or the decorator).

    Raises:
        ModelSourceError: ``name`` is taken or malformed, or ``factory`` is not callable.

    Example:
        >>> from torch import nn
        >>> @register_model("tiny_cnn")
        ... def tiny_cnn(num_classes: int = 10) -> nn.Module:
        ...     return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
        >>> resolve_name("tiny_cnn"), create_model("tiny_cnn", num_classes=3)[-1].out_features
        ('registered:tiny_cnn', 3)
        >>> register_model("tiny_cnn", tiny_cnn)
        Traceback (most recent call last):
        ...
        nd_plugin.errors.ModelSourceError: a model named 'tiny_cnn' is already registered (tiny_cnn); choose another name, or call unregister_model('tiny_cnn') first.
        >>> _ = unregister_model("tiny_cnn")
    """
    if factory is None:
        return lambda f: register_model(name, f)
    if not isinstance(name, str) or not name.strip() or ":" in name or any(c.isspace() for c in name):
        raise ModelSourceError(f"cannot register a model named {name!r}: use a non-empty name without ':' or spaces.")
    if not callable(factory):
        raise ModelSourceError(
            f"register_model({name!r}, ...) needs a callable that returns an nn.Module, got {type(factory).__name__}."
        )
    if name in _REGISTERED:
        old = getattr(_REGISTERED[name], "__qualname__", repr(_REGISTERED[name]))
        raise ModelSourceError(
            f"a model named '{name}' is already registered ({old}); choose another name, or call "
            f"unregister_model('{name}') first."
        )
    _REGISTERED[name] = factory
    return factory


def unregister_model(name: str) -> Callable[..., nn.Module]:
    """Removes a name added by :func:`register_model` and returns its factory.

    Raises:
        UnknownModelError: ``name`` is not registered.
    """
    if name not in _REGISTERED:
        raise UnknownModelError(
            f"no model named '{name}' is registered (registered: {', '.join(sorted(_REGISTERED)) or 'none'})."
        )
    return _REGISTERED.pop(name)


def _import(module_name: str, spec: str) -> Any:
    """Imports ``module_name``: from ``sys.path``, then, as ``python -m`` would, the current directory."""
    here = os.getcwd()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.split(".")[0] or here in sys.path or "" in sys.path:
            raise _import_error(module_name, spec, exc) from exc
    except Exception as exc:  # noqa: BLE001 - whatever the user's module raises, it does not import
        raise _import_error(module_name, spec, exc) from exc
    sys.path.append(here)
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - as above
        sys.path.remove(here)
        raise _import_error(module_name, spec, exc) from exc


def _import_error(module_name: str, spec: str, exc: BaseException) -> ModelSourceError:
    first = (str(exc).strip().splitlines() or [""])[0]
    return ModelSourceError(
        f"model '{spec}': cannot import module '{module_name}' ({type(exc).__name__}: {first}); "
        "check the spelling and that it is installed or on PYTHONPATH."
    )


def _module_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable that ``module:PKG.MOD:FN`` names (``spec`` is ``PKG.MOD:FN``)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ModelSourceError(f"model 'module:{spec}' is not of the form module:PKG.MOD:FN (e.g. module:mypkg.nets:make_net).")
    module = _import(module_name, f"module:{spec}")
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:8]
            raise ModelSourceError(
                f"model 'module:{spec}': module '{module_name}' has no attribute '{attr}'"
                f"{'; its callables: ' + ', '.join(public) if public else ''}."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSourceError(
            f"model 'module:{spec}': '{attr}' is a {type(obj).__name__}, not a callable that returns an nn.Module."
        )
    return obj


def _accepts(factory: Callable[..., Any], keyword: str) -> bool | None:
    """Whether ``factory`` takes ``keyword=`` (None: its signature cannot be read)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    return any(p.kind is p.VAR_KEYWORD or (p.name == keyword and p.kind is not p.POSITIONAL_ONLY) for p in params)


def _build_factory(qualified: str, factory: Callable[..., Any], num_classes: int | None, pretrained: bool) -> nn.Module:
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if pretrained:
        kwargs["pretrained"] = True
    for keyword in kwargs:
        if _accepts(factory, keyword) is False:
            raise ModelSourceError(
                f"model '{qualified}': {getattr(factory, '__qualname__', factory)} takes no '{keyword}' "
                f"argument; a factory is called as factory(num_classes=K{', pretrained=True' if pretrained else ''})."
            )
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSourceError(
            f"model '{qualified}': {getattr(factory, '__qualname__', factory)} returned a {type(model).__name__}, "
            "not an nn.Module; the factory must return the network."
        )
    return model


def _names(source: str) -> list[str]:
    if source == "registered":
        return sorted(_REGISTERED)
    if source == "cifar":
        return sorted(CIFAR_MODELS)
    if source == "tv":
        return _tv_names()
    return timm.list_models()


def _has(source: str, name: str) -> bool:
    if source == "registered":
        return name in _REGISTERED
    if source == "cifar":
        return name in CIFAR_MODELS
    if source == "tv":
        return name in _tv_names()
    return timm.is_model(name)  # also accepts pretrained tags, e.g. "resnet18.a1_in1k"


def list_models(pattern: str | None = None) -> list[str]:
    """Lists qualified model names, optionally filtered by a shell-style pattern.

    The pattern is matched (case-insensitively, :mod:`fnmatch` syntax) against both the qualified
    and the bare name. Results are grouped by source in priority order (cifar, tv, timm), each
    group sorted. ``module:`` specs are not listed (any importable factory is one).

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
            if pat is None or fnmatch.fnmatchcase(qualified.lower(), pat) or fnmatch.fnmatchcase(name.lower(), pat):
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
    return UnknownModelError(f"unknown model '{name}' in {where}{hint}; run `nd models '*{stem}*'` to list models")


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
                f"{', '.join(SOURCES)} (e.g. tv:resnet18), module:PKG.MOD:FN, or a bare name"
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
        ModelSourceError: A ``module:`` spec that does not import or names no callable.

    Example:
        >>> resolve_name("resnet56"), resolve_name("resnet18"), resolve_name("resnet18d")
        ('cifar:resnet56', 'tv:resnet18', 'timm:resnet18d')
    """
    source, bare = _split(name)
    if source == "module":
        _module_factory(bare)  # it imports and names a callable
        return f"module:{bare}"
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
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)):
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
        f"they need network access once: run without pretrained or pass a checkpoint",
        params=("pretrained", "checkpoint"),
    )


def _build_cifar(name: str, num_classes: int | None, pretrained: bool) -> nn.Module:
    builder: Callable[..., nn.Module] = CIFAR_MODELS[name]
    if not pretrained:
        return builder(num_classes=num_classes or 10)
    url = _CIFAR_WEIGHTS.get(name)
    if url is None:
        raise ConfigError(
            f"no pretrained weights are published for cifar:{name}; run without pretrained or pass a checkpoint",
            params=("pretrained", "checkpoint"),
        )
    model = builder(num_classes=10)
    try:
        obj = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as e:  # network, hash or file errors: one clear line
        raise _pretrained_error(f"cifar:{name}", e) from e
    state = obj.get("state_dict", obj)
    result = model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointMismatchError(
            f"the published weights of cifar:{name} do not fit the model (missing {len(result.missing_keys)} keys, "
            f"e.g. {result.missing_keys[:2]}; unexpected {len(result.unexpected_keys)}, e.g. {result.unexpected_keys[:2]}); "
            "report this, and pass a checkpoint meanwhile",
            params=("checkpoint",),
        )
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
    "registered": lambda name, n, pre: _build_factory(f"registered:{name}", _REGISTERED[name], n, pre),
    "module": lambda spec, n, pre: _build_factory(f"module:{spec}", _module_factory(spec), n, pre),
}


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Creates a model by name: a registered factory, the CIFAR zoo, torchvision, timm or a module.

    Args:
        name: Qualified (``cifar:resnet20``, ``tv:resnet18``, ``timm:resnet18``,
            ``registered:mynet``), ``module:PKG.MOD:FN``, or a bare name; bare names resolve in
            the order registered, cifar, tv, timm (see the module docstring).
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
        ModelSourceError: A ``module:`` spec or factory that gives no model (see
            :func:`register_model`).

    Example:
        >>> model = create_model("resnet18", num_classes=10)  # torchvision, random weights
        >>> model.fc.out_features
        10
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
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
