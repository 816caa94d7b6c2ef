"""Adversarial inputs from `torchattacks <https://github.com/Harry24k/adversarial-attacks-pytorch>`_.

:func:`attack` runs any torchattacks attack, named by its class (``"APGD"``, ``"Square"``;
case-insensitive) or by one of the six short names of :data:`ATTACKS` (``fgsm``, ``pgd``, ``bim``,
``mifgsm``, ``cw``, ``deepfool``, which keep their defaults), on a model that takes *normalised*
inputs, with the budget in [0, 1] pixel units (the model is wrapped in :class:`PixelSpaceModel`).
:func:`resolve_attack` checks a name and its parameters against the attack's ``__init__``
(:class:`AttackSpec`); :func:`parse_attack_args` reads ``NAME=VALUE`` strings (the CLI's
``--attack-arg``).
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from nd_plugin.errors import AttackArgumentError, ConfigError, UnknownAttackError
from nd_plugin.utilities import eval_mode

__all__ = [
    "ATTACKS",
    "AttackSpec",
    "PixelSpaceModel",
    "attack",
    "list_attacks",
    "parse_attack_args",
    "resolve_attack",
    "to_normalised",
    "to_pixels",
]


def _alpha(eps: float, alpha: float | None) -> float:
    return alpha if alpha is not None else eps / 4


#: The short names kept from before: name -> (torchattacks class, its keyword arguments from
#: ``(eps, steps, alpha)``). ``eps`` is the L∞ budget in [0, 1] pixel units; CW and DeepFool are
#: minimum-norm L2 attacks and ignore it. Any other torchattacks class is known by its own name.
ATTACKS: dict[str, tuple[str, Callable[[float, int, float | None], dict[str, Any]]]] = {
    "fgsm": ("FGSM", lambda eps, steps, alpha: {"eps": eps}),
    "pgd": ("PGD", lambda eps, steps, alpha: {"eps": eps, "alpha": _alpha(eps, alpha), "steps": steps, "random_start": True}),
    "bim": ("BIM", lambda eps, steps, alpha: {"eps": eps, "alpha": _alpha(eps, alpha), "steps": steps}),
    "mifgsm": ("MIFGSM", lambda eps, steps, alpha: {"eps": eps, "alpha": _alpha(eps, alpha), "steps": steps}),
    "cw": ("CW", lambda eps, steps, alpha: {"c": 1.0, "kappa": 0.0, "steps": max(steps, 1) * 5, "lr": 0.01}),
    "deepfool": ("DeepFool", lambda eps, steps, alpha: {"steps": max(steps, 1) * 5, "overshoot": 0.02}),
}

#: Python types a parameter's value is checked against (from the docstring's ``name (type)`` or the default).
_SIMPLE_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}
_TYPE_NAMES = {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string", tuple: "a tuple", list: "a list"}


def _key(name: str) -> str:
    return re.sub(r"[-_\s]", "", str(name)).lower()


def _torchattacks() -> Any:
    try:
        import torchattacks
    except ImportError as exc:
        raise ConfigError(
            "attacks need torchattacks, which is not installed: pip install 'torchattacks>=3.5'."
        ) from exc
    return torchattacks


@lru_cache(maxsize=1)
def _classes() -> dict[str, type]:
    """``{normalised class name: class}`` of every torchattacks attack built as ``Class(model, **kwargs)``.

    An attack qualifies when it derives from ``torchattacks.attack.Attack``, its ``__init__`` takes
    ``model`` first and every other parameter has a default (``LGV`` needs a training loader and
    ``MultiAttack`` a list of attacks: neither qualifies).
    """
    ta = _torchattacks()
    from torchattacks.attack import Attack

    out = {}
    for name in dir(ta):
        cls = getattr(ta, name)
        if not (isinstance(cls, type) and issubclass(cls, Attack) and cls is not Attack):
            continue
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        if not params or params[0].name != "model":
            continue
        if any(p.default is inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params[1:]):
            continue
        out[_key(name)] = cls
    return out


def list_attacks() -> list[str]:
    """The torchattacks class names :func:`attack` accepts (besides the short names of :data:`ATTACKS`).

    Example:
        >>> {"FGSM", "PGD", "APGD", "Square", "DeepFool"} <= set(list_attacks())
        True
        >>> "MultiAttack" in list_attacks()  # takes a list of attacks, not a model
        False
    """
    return sorted((c.__name__ for c in _classes().values()), key=str.lower)


def _known() -> str:
    return f"known attacks: {', '.join(ATTACKS)} (short names), and any torchattacks attack by its class name: {', '.join(list_attacks())}"


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    return dict(list(inspect.signature(cls.__init__).parameters.items())[2:])  # drop self, model


def _declared(cls: type) -> dict[str, type]:
    """``{parameter: type}`` from the class docstring's ``name (type):`` lines (torchattacks' convention)."""
    found = re.findall(r"^\s*(\w+)\s*\(([^)]*)\)\s*:", cls.__doc__ or "", re.M)
    return {n: _SIMPLE_TYPES[t.strip()] for n, t in found if t.strip() in _SIMPLE_TYPES}


def _expected_type(cls: type, p: inspect.Parameter) -> type | None:
    """The type a value of ``p`` must have: the docstring's when it agrees with the default, else the default's."""
    default = p.default
    by_default = type(default) if default is not None and type(default) in (bool, int, float, str, tuple, list) else None
    doc = _declared(cls).get(p.name)
    if doc is not None and (by_default is None or by_default is doc or (by_default is int and doc is float)):
        return doc
    return by_default


def _check_value(attack_name: str, name: str, value: Any, expected: type | None, *, none_ok: bool = False) -> Any:
    if expected is None or (value is None and none_ok):
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        str: isinstance(value, str),
        tuple: isinstance(value, (tuple, list)),
        list: isinstance(value, (tuple, list)),
    }[expected]
    if not ok:
        raise AttackArgumentError(
            f"parameter {name!r} of attack {attack_name} takes {_TYPE_NAMES[expected]}, got {value!r} ({type(value).__name__}).",
            parameter=name,
        )
    return expected(value) if expected in (float, tuple, list) else value


@dataclass(frozen=True)
class AttackSpec:
    """A torchattacks attack, checked: its class and every keyword argument it is built with.

    Attributes:
        name: the name results are filed under: the short name (``"pgd"``) or the class name in
            lower case (``"apgd"``).
        cls: the torchattacks class name (``"PGD"``).
        kwargs: every keyword argument of ``torchattacks.<cls>(model, **kwargs)``.
        user_kwargs: the ones the caller set (``attack_kwargs``), a subset of ``kwargs``.
    """

    name: str
    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    user_kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, model: nn.Module, **extra: Any) -> Any:
        """``torchattacks.<cls>(model, **kwargs, **extra)``."""
        return getattr(_torchattacks(), self.cls)(model, **(self.kwargs | extra))

    @property
    def parameters(self) -> list[str]:
        """Every parameter the attack's ``__init__`` takes besides ``model``."""
        return list(_parameters(_classes()[_key(self.cls)]))


def resolve_attack(
    name: str,
    eps: float = 8 / 255,
    *,
    steps: int = 10,
    alpha: float | None = None,
    attack_kwargs: Mapping[str, Any] | None = None,
) -> AttackSpec:
    """Checks an attack name and its parameters; returns what :func:`attack` builds.

    A short name of :data:`ATTACKS` starts from its defaults; any other torchattacks class starts
    from ``eps`` (and ``alpha = eps / 4``, ``steps``) where its ``__init__`` takes them, and its own
    defaults otherwise. ``attack_kwargs`` are applied last (they win over ``eps``, ``steps`` and
    ``alpha``), each checked against the attack's signature (:func:`inspect.signature`) and the
    type of its default (or of its docstring, where they agree: ``CW(c=1)`` is documented as a float).

    Args:
        name: a short name (``fgsm``, ``pgd``, ``bim``, ``mifgsm``, ``cw``, ``deepfool``) or a
            torchattacks class name (case-insensitive; ``-``/``_`` ignored: ``MI-FGSM`` is ``mifgsm``).
        eps: L∞ budget in (0, 1] pixel units.
        steps: iterations of the iterative attacks.
        alpha: step size of the iterative attacks (default ``eps / 4``).
        attack_kwargs: more keyword arguments of the attack's ``__init__`` (``{"steps": 20}``).

    Returns:
        The :class:`AttackSpec`.

    Raises:
        UnknownAttackError: torchattacks has no such attack (the message lists the known ones).
        AttackArgumentError: a parameter the attack does not take (the message lists the ones it
            takes), ``model``, or a value of the wrong type (the message names the parameter).
        ConfigError: ``eps`` outside (0, 1], or torchattacks not installed.

    Example:
        >>> resolve_attack("pgd", 8 / 255, steps=20).kwargs["steps"]
        20
        >>> spec = resolve_attack("apgd", 0.05, attack_kwargs={"loss": "dlr", "n_restarts": 2})
        >>> spec.name, spec.cls, spec.kwargs["eps"], spec.kwargs["loss"]
        ('apgd', 'APGD', 0.05, 'dlr')
        >>> resolve_attack("pgd", attack_kwargs={"stepz": 3})
        Traceback (most recent call last):
        ...
        nd_plugin.errors.AttackArgumentError: attack PGD takes no parameter 'stepz'; its parameters: eps, alpha, steps, random_start.
    """
    key = _key(name)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or not 0.0 < eps <= 1.0:
        if key in ATTACKS or key in _classes():
            raise ConfigError(
                f"eps must be in (0, 1] (an L∞ budget in [0, 1] pixel units, e.g. 8/255 = {8 / 255:.4f}), got {eps!r}."
            )
    if key in ATTACKS:
        cls_name, defaults = ATTACKS[key]
        kwargs = defaults(float(eps), int(steps), alpha)
    elif key in _classes():
        cls_name = _classes()[key].__name__
        params = _parameters(_classes()[key])
        base = {"eps": float(eps), "alpha": _alpha(float(eps), alpha), "steps": int(steps)}
        kwargs = {k: v for k, v in base.items() if k in params and _expected_type(_classes()[key], params[k]) in (int, float, None)}
    else:
        raise UnknownAttackError(f"unknown attack {name!r}; {_known()}.")
    cls = _classes()[_key(cls_name)]
    params = _parameters(cls)
    user = {}
    for k, v in dict(attack_kwargs or {}).items():
        if k == "model":
            raise AttackArgumentError("parameter 'model' of an attack is the model under attack; it cannot be set.", parameter="model")
        if k not in params:
            raise AttackArgumentError(
                f"attack {cls_name} takes no parameter {k!r}; its parameters: {', '.join(params) or 'none'}.", parameter=k
            )
        v = _check_value(cls_name, k, v, _expected_type(cls, params[k]), none_ok=params[k].default is None)
        if k == "eps" and not (isinstance(v, float) and v > 0):
            raise AttackArgumentError(f"parameter 'eps' of attack {cls_name} must be positive, got {v!r}.", parameter="eps")
        user[k] = v
    return AttackSpec(key, cls_name, kwargs | user, user)


_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


def parse_attack_args(pairs: Iterable[str] | None) -> dict[str, Any]:
    """``NAME=VALUE`` strings (the CLI's ``--attack-arg``) as keyword arguments.

    Values are read as Python literals where they are one (``10`` → int, ``0.5`` and ``1e-3`` →
    float, ``(2, 10)`` → tuple, ``None``), ``true``/``false``/``yes``/``no``/``on``/``off`` (any
    case) as bools, and as strings otherwise (``dlr``, ``L2``). :func:`resolve_attack` then checks
    each against the attack's parameters.

    Raises:
        AttackArgumentError: a string that is not ``NAME=VALUE``, or a name given twice.

    Example:
        >>> parse_attack_args(["steps=20", "eps=0.5", "random_start=False", "norm=L2", "loss='ce'"])
        {'steps': 20, 'eps': 0.5, 'random_start': False, 'norm': 'L2', 'loss': 'ce'}
    """
    out: dict[str, Any] = {}
    for pair in pairs or ():
        name, sep, text = str(pair).partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name.isidentifier():
            raise AttackArgumentError(
                f"an attack argument takes NAME=VALUE (e.g. steps=20), got {pair!r}.", parameter=name or None
            )
        if name in out:
            raise AttackArgumentError(f"attack parameter {name!r} is given twice.", parameter=name)
        if text.lower() in _BOOLS:
            value: Any = _BOOLS[text.lower()]
        elif text.lower() == "none":
            value = None
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                value = text
            if not isinstance(value, (int, float, str, tuple, list)) or isinstance(value, complex):
                value = text
        out[name] = value
    return out


def _stats(values: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.repeat(x.shape[1])
    if t.numel() != x.shape[1]:
        raise ConfigError(f"mean/std have {t.numel()} values but the inputs have {x.shape[1]} channels.")
    return t.view(1, -1, *([1] * (x.ndim - 2)))


def to_pixels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undoes the data normalisation: ``x · std + mean`` (pixel values in [0, 1]).

    Example:
        >>> to_pixels(torch.zeros(1, 3, 1, 1), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).flatten().tolist()
        [0.5, 0.5, 0.5]
    """
    return x * _stats(std, x) + _stats(mean, x)


def to_normalised(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Applies the data normalisation: ``(x − mean) / std``; the inverse of :func:`to_pixels`.

    Example:
        >>> to_normalised(torch.full((1, 3, 1, 1), 0.5), (0.5,) * 3, (0.25,) * 3).flatten().tolist()
        [0.0, 0.0, 0.0]
    """
    return (x - _stats(mean, x)) / _stats(std, x)


class PixelSpaceModel(nn.Module):
    """A model that takes [0, 1] pixels and normalises them itself before calling ``model``.

    Attacks run on this wrapper, so their budget, step size and clipping are in pixel units while
    the wrapped model still sees the normalised inputs it was trained on.

    Args:
        model: a module taking normalised inputs and returning logits.
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.

    Example:
        >>> m = PixelSpaceModel(nn.Flatten(), (0.5,), (0.5,))
        >>> m(torch.ones(1, 1, 1, 1))
        tensor([[1.]])
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model((x - self.mean.to(x)) / self.std.to(x))
        return out[0] if isinstance(out, tuple) else out


def attack(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    name: str | AttackSpec,
    eps: float = 8 / 255,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    steps: int = 10,
    alpha: float | None = None,
    attack_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    tolerance: float = 1e-3,
) -> torch.Tensor:
    """Attacks normalised inputs with a torchattacks attack and returns normalised adversarial inputs.

    The attack is built the way torchattacks builds it, ``torchattacks.<Class>(model,
    **kwargs)`` (:func:`resolve_attack` checks the name and ``kwargs``). The inputs are mapped back
    to [0, 1] pixels, attacked there through a :class:`PixelSpaceModel` (normalisation inside the
    model), and normalised again. We do not use torchattacks' ``set_normalization_used``: in 3.5.x
    it means "the *inputs* are normalised" and works by toggling a private flag around ``forward``
    (its meaning changed between releases, and an exception inside the attack leaves the flag
    flipped). Normalising inside the model gives the same gradients, puts the budget in pixel units
    for every attack of the library, and keeps no state on the attack object.

    An attack whose ``__init__`` takes ``n_classes`` (APGDT, FAB, AutoAttack; torchattacks'
    default is 10) gets the model's number of outputs unless ``attack_kwargs`` sets it.

    The model is put in eval mode during the attack and its mode restored afterwards; the global
    RNG is left untouched (random starts draw from a forked, seeded RNG).

    Args:
        model: takes normalised inputs, returns logits (a :class:`~nd_plugin.decoupled.DecoupledModel`
            or any classifier).
        inputs: normalised inputs ``(N, C, H, W)``.
        labels: true labels ``(N,)``.
        name: a short name of :data:`ATTACKS` (``fgsm``, ``pgd``, ``bim``, ``mifgsm``, ``cw``,
            ``deepfool``), any torchattacks class name (``"APGD"``, ``"square"``;
            :func:`list_attacks`), or an :class:`AttackSpec` (then ``eps``, ``steps``, ``alpha``
            and ``attack_kwargs`` are its own).
        eps: L∞ budget in (0, 1] pixel units (8/255 is the CIFAR convention), passed to attacks
            that take ``eps``; CW and DeepFool are minimum-norm attacks and ignore it.
        mean: per-channel mean of the data normalisation.
        std: per-channel standard deviation of the data normalisation.
        steps: iterations of the iterative attacks (PGD-10 by default; CW/DeepFool get 5×).
        alpha: step size of the iterative attacks (default ``eps / 4``).
        attack_kwargs: more keyword arguments of the attack's ``__init__``, e.g. ``{"steps": 20}``
            or ``{"norm": "L2", "eps": 0.5}``; they win over ``eps``, ``steps`` and ``alpha``.
        seed: seed of the attack's randomness.
        tolerance: how far outside [0, 1] the un-normalised inputs may fall before ``mean``/``std``
            are declared wrong (JPEG round trips stay within 1e-5).

    Returns:
        Adversarial inputs, normalised like ``inputs``, on the same device.

    Raises:
        UnknownAttackError: ``name`` is not a torchattacks attack (the message lists them).
        AttackArgumentError: a parameter the attack does not take, or a value of the wrong type
            (the message names the parameter).
        ConfigError: ``eps`` outside (0, 1], ``mean``/``std`` that do not fit the inputs, or
            torchattacks not installed.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> x = to_normalised(torch.rand(2, 3, 8, 8), (0.5,) * 3, (0.25,) * 3)
        >>> adv = attack(net, x, torch.tensor([0, 1]), "fgsm", 8 / 255, mean=(0.5,) * 3, std=(0.25,) * 3)
        >>> bool((to_pixels(adv - x, (0,) * 3, (0.25,) * 3).abs().max() <= 8 / 255 + 1e-5))
        True
        >>> adv = attack(net, x, torch.tensor([0, 1]), "BIM", 0.1, mean=(0.5,) * 3, std=(0.25,) * 3,
        ...              attack_kwargs={"steps": 2})
        >>> bool((to_pixels(adv - x, (0,) * 3, (0.25,) * 3).abs().max() <= 0.1 + 1e-5))
        True
    """
    spec = name if isinstance(name, AttackSpec) else resolve_attack(name, eps, steps=steps, alpha=alpha, attack_kwargs=attack_kwargs)
    pixels = to_pixels(inputs.detach(), mean, std)
    low, high = float(pixels.min()), float(pixels.max())
    if low < -tolerance or high > 1 + tolerance:
        raise ConfigError(
            f"un-normalised inputs span [{low:.3f}, {high:.3f}], not [0, 1]: pass the mean/std the data were "
            "normalised with (a run's config.json has them)."
        )
    pixels = pixels.clamp(0.0, 1.0)
    wrapped = PixelSpaceModel(model, mean, std)
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    with eval_mode(model):
        extra = {}
        if "n_classes" in spec.parameters and "n_classes" not in spec.kwargs:
            with torch.no_grad():
                extra["n_classes"] = int(wrapped.eval()(pixels[:1]).shape[1])
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            atk = spec.build(wrapped, **extra)
            adv = atk(pixels, labels.to(inputs.device))
    return to_normalised(adv.detach().clamp(0.0, 1.0), mean, std)
