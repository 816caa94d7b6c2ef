"""Adversarial inputs from `torchattacks <https://github.com/Harry24k/adversarial-attacks-pytorch>`_.

:func:`attack` runs FGSM, PGD, BIM, MI-FGSM, CW or DeepFool on a model that takes *normalised*
inputs, with the budget in [0, 1] pixel units (the model is wrapped in :class:`PixelSpaceModel`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from nd_plugin.errors import ConfigError, UnknownAttackError

__all__ = ["ATTACKS", "PixelSpaceModel", "attack", "to_normalised", "to_pixels"]


def _alpha(eps: float, alpha: float | None) -> float:
    return alpha if alpha is not None else eps / 4


#: Known attacks: name -> builder(model, eps, steps, alpha) of a torchattacks attack. ``eps`` is
#: the L∞ budget in [0, 1] pixel units; CW and DeepFool are minimum-norm L2 attacks and ignore it.
ATTACKS: dict[str, Callable[..., Any]] = {
    "fgsm": lambda ta, m, eps, steps, alpha: ta.FGSM(m, eps=eps),
    "pgd": lambda ta, m, eps, steps, alpha: ta.PGD(m, eps=eps, alpha=_alpha(eps, alpha), steps=steps, random_start=True),
    "bim": lambda ta, m, eps, steps, alpha: ta.BIM(m, eps=eps, alpha=_alpha(eps, alpha), steps=steps),
    "mifgsm": lambda ta, m, eps, steps, alpha: ta.MIFGSM(m, eps=eps, alpha=_alpha(eps, alpha), steps=steps),
    "cw": lambda ta, m, eps, steps, alpha: ta.CW(m, c=1.0, kappa=0.0, steps=max(steps, 1) * 5, lr=0.01),
    "deepfool": lambda ta, m, eps, steps, alpha: ta.DeepFool(m, steps=max(steps, 1) * 5, overshoot=0.02),
}


def _check_attack(name: str, eps: float) -> str:
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key not in ATTACKS:
        raise UnknownAttackError(f"unknown attack {name!r}; known attacks: {', '.join(ATTACKS)}.")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or not 0.0 < eps <= 1.0:
        raise ConfigError(
            f"eps must be in (0, 1] (an L∞ budget in [0, 1] pixel units, e.g. 8/255 = {8 / 255:.4f}), got {eps!r}."
        )
    return key


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
    name: str,
    eps: float,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    steps: int = 10,
    alpha: float | None = None,
    seed: int = 0,
    tolerance: float = 1e-3,
) -> torch.Tensor:
    """Attacks normalised inputs with a torchattacks attack and returns normalised adversarial inputs.

    The inputs are mapped back to [0, 1] pixels, attacked there through a
    :class:`PixelSpaceModel` (normalisation inside the model), and normalised again. We do not use
    torchattacks' ``set_normalization_used``: in 3.5.x it means "the *inputs* are normalised" and
    works by toggling a private flag around ``forward`` (its meaning changed between releases, and
    an exception inside the attack leaves the flag flipped). Normalising inside the model gives the
    same gradients, puts the budget in pixel units for every attack of the library, and keeps no
    state on the attack object.

    The model is put in eval mode during the attack and its mode restored afterwards; the global
    RNG is left untouched (PGD's random start draws from a forked, seeded RNG).

    Args:
        model: takes normalised inputs, returns logits (a :class:`~nd_plugin.decoupled.DecoupledModel`
            or any classifier).
        inputs: normalised inputs ``(N, C, H, W)``.
        labels: true labels ``(N,)``.
        name: one of :data:`ATTACKS` (``fgsm``, ``pgd``, ``bim``, ``mifgsm``, ``cw``, ``deepfool``).
        eps: L∞ budget in (0, 1] pixel units (8/255 is the CIFAR convention); CW and DeepFool are
            minimum-norm attacks and ignore it.
        mean: per-channel mean of the data normalisation.
        std: per-channel standard deviation of the data normalisation.
        steps: iterations of the iterative attacks (PGD-10 by default; CW/DeepFool get 5×).
        alpha: step size of the iterative attacks (default ``eps / 4``).
        seed: seed of the attack's randomness.
        tolerance: how far outside [0, 1] the un-normalised inputs may fall before ``mean``/``std``
            are declared wrong (JPEG round trips stay within 1e-5).

    Returns:
        Adversarial inputs, normalised like ``inputs``, on the same device.

    Raises:
        UnknownAttackError: ``name`` is not a known attack (the message lists them).
        ConfigError: ``eps`` outside (0, 1], ``mean``/``std`` that do not fit the inputs, or
            torchattacks not installed.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> x = to_normalised(torch.rand(2, 3, 8, 8), (0.5,) * 3, (0.25,) * 3)
        >>> adv = attack(net, x, torch.tensor([0, 1]), "fgsm", 8 / 255, mean=(0.5,) * 3, std=(0.25,) * 3)
        >>> bool((to_pixels(adv - x, (0,) * 3, (0.25,) * 3).abs().max() <= 8 / 255 + 1e-5))
        True
    """
    key = _check_attack(name, eps)
    try:
        import torchattacks
    except ImportError as exc:
        raise ConfigError(
            "attacks need torchattacks, which is not installed: pip install 'torchattacks>=3.5'."
        ) from exc

    pixels = to_pixels(inputs.detach(), mean, std)
    low, high = float(pixels.min()), float(pixels.max())
    if low < -tolerance or high > 1 + tolerance:
        raise ConfigError(
            f"un-normalised inputs span [{low:.3f}, {high:.3f}], not [0, 1]: pass the mean/std the data were "
            "normalised with (a run's config.json has them)."
        )
    pixels = pixels.clamp(0.0, 1.0)
    wrapped = PixelSpaceModel(model, mean, std)
    was_training = model.training
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            atk = ATTACKS[key](torchattacks, wrapped, float(eps), int(steps), alpha)
            adv = atk(pixels, labels.to(inputs.device))
    finally:
        model.train(was_training)
    return to_normalised(adv.detach().clamp(0.0, 1.0), mean, std)


