"""Adversarial samples and their detection from calculation paths (seed §C, Figs. G–H).

An attacked input is pushed into a class whose clean inputs take other paths than it does: the
attack changes the low-level statistics first, so the gates of the bottom layers already disagree
with the clean paths of the class the input ends up in. This module provides

- :func:`attack`: adversarial inputs from `torchattacks <https://github.com/Harry24k/adversarial-attacks-pytorch>`_
  (FGSM, PGD, BIM, MI-FGSM, CW, DeepFool) for a model that takes *normalised* inputs;
- :class:`PathDetector`: per-class statistics of clean paths and a score of how unlike them an
  input's path is (per layer and overall), at the cost of the forward pass that makes the
  prediction;
- baselines on the same model and inputs: :func:`msp_score` (maximum softmax probability) and
  :class:`MahalanobisDetector` (class means and a shared covariance on penultimate features);
- :func:`run_detection`: what ``nd detect`` does — attack, score, measure, write ``detect.json``
  and figures.

Scores follow one convention: higher means "more likely adversarial".

Example:
    >>> det = PathDetector().fit(dm, clean_loader)  # doctest: +SKIP
    >>> s = det.score(x)  # doctest: +SKIP
    >>> s.overall.shape, s.per_layer.shape  # doctest: +SKIP
    ((64,), (64, 18))
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nd_plugin._hooks import ForwardHooks, HookOwner
from nd_plugin.errors import ConfigError, DetectionError, RunDirError, UnknownAttackError
from nd_plugin.gates import ACM

__all__ = [
    "ATTACKS",
    "DetectionResult",
    "MahalanobisDetector",
    "PathDetector",
    "PathScore",
    "PixelSpaceModel",
    "Probe",
    "attack",
    "attack_and_probe",
    "collect_probe",
    "detection_metrics",
    "find_feature_layer",
    "msp_score",
    "run_detection",
    "to_normalised",
    "to_pixels",
]

# --------------------------------------------------------------------------------------------
# attacks
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# one forward pass: prediction, path, soft gate logits, penultimate features
# --------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """What one forward pass over some inputs shows.

    Attributes:
        logits: ``(N, K)``.
        labels: ``(N,)`` true labels (-1 when unknown).
        gates: per gated layer, ``(N, C_l)`` binary gates (the calculation path).
        z: per gated layer, ``(N, C_l)`` gate logits before binarisation (``α = 1[z > 0]``).
        features: ``(N, D)`` inputs of the final linear layer, or ``None``.
        gate_inputs: per gated layer, ``(N, C_in)`` global average pool of what the layer's gate
            reads, when asked for (a diagnostic: features, not the path).
    """

    logits: np.ndarray
    labels: np.ndarray
    gates: list[np.ndarray]
    z: list[np.ndarray]
    features: np.ndarray | None = None
    gate_inputs: list[np.ndarray] | None = None

    @property
    def preds(self) -> np.ndarray:
        """``(N,)`` predicted classes."""
        return self.logits.argmax(1)

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def select(self, index: np.ndarray) -> Probe:
        """The probe restricted to some inputs (boolean mask or indices)."""
        return Probe(
            self.logits[index],
            self.labels[index],
            [g[index] for g in self.gates],
            [z[index] for z in self.z],
            None if self.features is None else self.features[index],
            None if self.gate_inputs is None else [g[index] for g in self.gate_inputs],
        )

    @staticmethod
    def concat(parts: Sequence[Probe]) -> Probe:
        """Concatenates probes of the same model along the input axis."""
        if not parts:
            raise ValueError("no probes to concatenate")
        feats = None if any(p.features is None for p in parts) else np.concatenate([p.features for p in parts])
        gin = None
        if all(p.gate_inputs is not None for p in parts):
            gin = [np.concatenate(g) for g in zip(*(p.gate_inputs for p in parts))]
        return Probe(
            np.concatenate([p.logits for p in parts]),
            np.concatenate([p.labels for p in parts]),
            [np.concatenate(g) for g in zip(*(p.gates for p in parts))],
            [np.concatenate(z) for z in zip(*(p.z for p in parts))],
            feats,
            gin,
        )


def _outside_acm_linears(model: nn.Module) -> dict[str, nn.Linear]:
    inside = {id(m) for acm in model.modules() if isinstance(acm, ACM) for m in acm.modules()}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside}


def find_feature_layer(model: nn.Module, example: torch.Tensor) -> str:
    """Finds the classifier layer: the last ``nn.Linear`` (outside the gates' ACMs) that runs.

    One forward pass on ``example`` with hooks that record execution order; the hooks are removed
    before returning, also on error.

    Args:
        model: the network (for a DecoupledModel pass ``dm.model``).
        example: a small input batch.

    Returns:
        The qualified name of the layer whose *input* are the penultimate features.

    Raises:
        DetectionError: the model runs no ``nn.Linear``.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> find_feature_layer(net, torch.randn(1, 4))
        '3'
    """
    order: list[str] = []
    linears = _outside_acm_linears(model)
    names = {mod: name for name, mod in linears.items()}
    with ForwardHooks(linears.values(), lambda m, _i, _o: order.append(names[m])), torch.no_grad():
        model(example)
    if not order:
        raise DetectionError(
            f"{type(model).__name__} runs no nn.Linear layer: the Mahalanobis baseline needs the classifier's input features."
        )
    return order[-1]


class _ProbeHooks(HookOwner):
    """Owns the hooks that read gate logits (ACM outputs) and penultimate features; removed on exit."""

    def __init__(self, sites: Sequence[nn.Module], feature_module: nn.Module | None, gate_inputs: bool = False) -> None:
        super().__init__()
        self.sites = list(sites)
        self.feature_module = feature_module
        self.gate_inputs_enabled = gate_inputs
        self.gate_inputs: list[torch.Tensor | None] = [None] * len(self.sites)
        self.z: list[torch.Tensor | None] = [None] * len(self.sites)
        self.features: torch.Tensor | None = None

    def register(self) -> None:
        for i, site in enumerate(self.sites):
            self.keep(site.acm.register_forward_hook(self._z_hook(i)))
            if self.gate_inputs_enabled:
                self.keep(site.acm.register_forward_pre_hook(self._input_hook(i)))
        if self.feature_module is not None:
            self.keep(self.feature_module.register_forward_hook(self._feature_hook))

    def _z_hook(self, i: int) -> Callable:
        def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            self.z[i] = out.detach()

        return hook

    def _input_hook(self, i: int) -> Callable:
        def hook(_m: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach()
            self.gate_inputs[i] = x.mean(dim=tuple(range(2, x.ndim))) if x.ndim > 2 else x

        return hook

    def _feature_hook(self, _m: nn.Module, inputs: tuple, _out: object) -> None:
        self.features = inputs[0].detach().flatten(1)


def _batches(data: torch.Tensor | Iterable, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            xb = data[i : i + batch_size]
            yield xb, torch.full((xb.shape[0],), -1, dtype=torch.long)
    else:
        for batch in data:
            if isinstance(batch, (tuple, list)):
                yield batch[0], batch[1]
            else:
                yield batch, torch.full((batch.shape[0],), -1, dtype=torch.long)


@torch.no_grad()
def collect_probe(
    dm: nn.Module,
    data: torch.Tensor | Iterable,
    *,
    feature_layer: str | None = None,
    max_samples: int | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    gate_inputs: bool = False,
) -> Probe:
    """Runs the decoupled model once over ``data`` and keeps prediction, path, gate logits, features.

    Args:
        dm: a :class:`~nd_plugin.decoupled.DecoupledModel`.
        data: a tensor of normalised inputs, or a loader of ``(inputs, labels)``.
        feature_layer: name (in ``dm.model``) of the layer whose input to keep as features;
            ``None`` keeps none.
        max_samples: stop after this many inputs.
        batch_size: batch size when ``data`` is a tensor.
        device: where to run (default: the model's device).
        gate_inputs: also keep the pooled input of every gate (a diagnostic).

    Returns:
        The :class:`Probe` (numpy arrays on the CPU).
    """
    device = torch.device(device) if device is not None else next(dm.parameters()).device
    was_training = dm.training
    dm.eval()
    feature_module = dm.model.get_submodule(feature_layer) if feature_layer else None
    parts: list[Probe] = []
    seen = 0
    try:
        with _ProbeHooks(dm.sites(), feature_module, gate_inputs) as hooks:
            for xb, yb in _batches(data, batch_size):
                if max_samples is not None and seen >= max_samples:
                    break
                if max_samples is not None:
                    xb, yb = xb[: max_samples - seen], yb[: max_samples - seen]
                logits, path = dm(xb.to(device), return_path=True)
                gates = [path[name].detach().cpu().numpy() > 0.5 for name in dm.site_names]
                z = [
                    (t if t is not None else torch.full_like(path[name], 1e3)).float().cpu().numpy()
                    for t, name in zip(hooks.z, dm.site_names)
                ]
                feats = hooks.features.float().cpu().numpy() if feature_module is not None else None
                gin = [t.float().cpu().numpy() for t in hooks.gate_inputs] if gate_inputs else None
                parts.append(Probe(logits.float().cpu().numpy(), np.asarray(yb.cpu().numpy(), dtype=np.int64), gates, z, feats, gin))
                seen += xb.shape[0]
                hooks.z = [None] * len(hooks.z)
    finally:
        dm.train(was_training)
    if not parts:
        raise DetectionError("no inputs to score: the data yielded no batches.")
    return Probe.concat(parts)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def detection_metrics(clean: np.ndarray, adversarial: np.ndarray, *, fpr: float = 0.05) -> dict[str, float]:
    """AUROC and TPR at a fixed FPR of scores where higher means "adversarial".

    Args:
        clean: scores of clean inputs (the negatives).
        adversarial: scores of attacked inputs (the positives).
        fpr: the false-positive rate at which to read the true-positive rate.

    Returns:
        ``{"auroc": ..., "tpr_at_fpr": ...}`` computed with ``sklearn.metrics``; TPR is the
        highest true-positive rate among thresholds whose FPR does not exceed ``fpr``.

    Raises:
        DetectionError: one of the two sets is empty.

    Example:
        >>> detection_metrics(np.array([0.0, 1.0]), np.array([2.0, 3.0]))
        {'auroc': 1.0, 'tpr_at_fpr': 1.0}
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    clean, adversarial = np.asarray(clean, dtype=np.float64), np.asarray(adversarial, dtype=np.float64)
    if clean.size == 0 or adversarial.size == 0:
        raise DetectionError(
            f"cannot measure detection with {clean.size} clean and {adversarial.size} attacked inputs (both must be non-empty)."
        )
    y = np.r_[np.zeros(clean.size), np.ones(adversarial.size)]
    s = np.nan_to_num(np.r_[clean, adversarial], nan=0.0, posinf=1e300, neginf=-1e300)
    f, t, _ = roc_curve(y, s)
    return {"auroc": float(roc_auc_score(y, s)), "tpr_at_fpr": float(t[f <= fpr + 1e-12].max())}


def msp_score(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Baseline: one minus the maximum softmax probability (higher = more likely adversarial).

    Example:
        >>> msp_score(np.array([[0.0, 0.0], [10.0, 0.0]])).round(3).tolist()
        [0.5, 0.0]
    """
    t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return (1.0 - torch.softmax(t, dim=1).max(1).values).numpy()


# --------------------------------------------------------------------------------------------
# path detector
# --------------------------------------------------------------------------------------------


@dataclass
class PathScore:
    """Scores of some inputs (higher = more unlike the clean paths of the predicted class).

    Attributes:
        overall: ``(N,)`` the combined score.
        per_layer: ``(N, L)`` each gated layer's score, standardised on clean held-out inputs
            (0 mean, unit spread for clean inputs).
        preds: ``(N,)`` the predicted classes the scores refer to.
        logits: ``(N, K)`` the logits of the same forward pass.
    """

    overall: np.ndarray
    per_layer: np.ndarray
    preds: np.ndarray
    logits: np.ndarray


def _whitener(x: np.ndarray, centred: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """(scale (d,), W (d, d)) with ``((v / scale) @ W)²`` summing to the Mahalanobis distance."""
    scale = centred.std(0)
    scale = np.where(scale > 1e-12 * max(scale.max(), 1e-30), scale, 1.0)
    c = centred / scale
    corr = c.T @ c / max(c.shape[0] - 1, 1)
    vals, vecs = np.linalg.eigh(corr + ridge * np.eye(corr.shape[0]))
    return scale, vecs / np.sqrt(np.maximum(vals, ridge))[None, :]


class PathDetector:
    """Scores how unlike the clean calculation paths of its predicted class an input's path is.

    ``fit`` runs the decoupled model over clean inputs (their true labels), keeps 80% for the
    per-class path statistics and 20% to standardise each layer's score on clean inputs; ``score``
    runs the model once and reads the path that comes with the prediction.

    Per-layer scores (``method``), for the gates ``α`` and gate logits ``z`` (``α = 1[z > 0]``) of
    one layer and the predicted class ``c``:

    - ``"bernoulli"``: mean over filters of ``−log p_c(α_f)``, ``p_c`` the class's smoothed
      on-frequency (Laplace smoothing ``smoothing``);
    - ``"hamming"``: mean ``|α_f − p_c,f|``, the expected Hamming distance to a clean path of ``c``;
    - ``"gauss"``: Mahalanobis distance of the soft path ``z`` to the class mean (shared
      covariance, ridge-regularised correlation), divided by the layer width;
    - ``"joint"`` (default, chosen by measurement, see ``docs``): the same Mahalanobis distance
      on the whole soft path, every layer at once, so that a path whose bottom layers do not fit
      its top layers' class is caught; its per-layer scores are those of ``"gauss"`` and
      ``combine`` does not apply to it;
    - ``"knn"``: squared distance, in the same whitened space, to the ``k``-th nearest clean soft
      path of class ``c``;
    - ``"pathclf"``: ``−log q_l(c | z)`` of a per-layer logistic regression trained on clean soft
      paths to predict the class (a path that does not look like its predicted class).

    Every variant is fitted on clean inputs only (unsupervised with respect to attacks). Layer
    scores are standardised with clean held-out means/stds and combined (``combine``) as their
    mean, their maximum, or a mean weighted by each layer's class-specificity on clean held-out data
    (AUROC of the score under the true class against a wrong class, minus 0.5).

    Args:
        method: default per-layer score (see above).
        combine: ``"mean"``, ``"max"`` or ``"weighted"``.
        smoothing: Laplace smoothing of the Bernoulli frequencies.
        ridge: ridge added to the correlation matrix of each layer's ``z`` (small: the directions
            of small clean variance are where attacks show; 1e-6 measured better than 1e-3).
        k: neighbours of ``"knn"``.
        knn_per_class: clean soft paths kept per class for ``"knn"``.
        holdout: fraction of the fit inputs used only for standardisation and weights.
        seed: seed of the held-out split and the kNN subsample.

    Example:
        >>> det = PathDetector(method="gauss").fit(dm, train_loader)  # doctest: +SKIP
        >>> det.score(x).overall  # doctest: +SKIP
        >>> det.save("runs/r20/detector.npz")  # doctest: +SKIP
    """

    METHODS = ("joint", "gauss", "bernoulli", "hamming", "knn", "pathclf")
    COMBINES = ("mean", "max", "weighted")

    def __init__(
        self,
        method: str = "joint",
        combine: str = "mean",
        *,
        smoothing: float = 1.0,
        ridge: float = 1e-6,
        k: int = 10,
        knn_per_class: int = 256,
        holdout: float = 0.2,
        seed: int = 0,
    ) -> None:
        if method not in self.METHODS:
            raise ConfigError(f"unknown path score {method!r}; known: {', '.join(self.METHODS)}.")
        if combine not in self.COMBINES:
            raise ConfigError(f"unknown combination {combine!r}; known: {', '.join(self.COMBINES)}.")
        if not 0.0 < holdout < 1.0:
            raise ConfigError(f"holdout must be in (0, 1), got {holdout!r}.")
        self.method, self.combine = method, combine
        self.smoothing, self.ridge, self.k, self.knn_per_class = float(smoothing), float(ridge), int(k), int(knn_per_class)
        self.holdout, self.seed = float(holdout), int(seed)
        self.site_names: list[str] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.meta: dict[str, str] = {}
        self.model: nn.Module | None = None

    # -- fitting ---------------------------------------------------------------------------

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`load`) has run."""
        return bool(self.arrays)

    @property
    def num_layers(self) -> int:
        return len(self.site_names)

    def fit(
        self,
        dm: nn.Module,
        loader: Iterable,
        *,
        max_samples: int | None = None,
        device: torch.device | str | None = None,
    ) -> PathDetector:
        """Learns per-class clean path statistics from a loader of clean ``(inputs, labels)``.

        Args:
            dm: the :class:`~nd_plugin.decoupled.DecoupledModel`.
            loader: clean, normalised inputs with their true labels.
            max_samples: use at most this many inputs.
            device: where to run.

        Returns:
            ``self``, attached to ``dm`` for :meth:`score`.
        """
        probe = collect_probe(dm, loader, max_samples=max_samples, device=device)
        self.fit_probe(probe, dm.site_names)
        self.model = dm
        return self

    def fit_probe(self, probe: Probe, site_names: Sequence[str]) -> PathDetector:
        """Fits from a :class:`Probe` of clean inputs with known labels (see :meth:`fit`)."""
        labels = probe.labels
        if (labels < 0).any():
            raise DetectionError("fitting a path detector needs the true labels of the clean inputs.")
        n, k = len(probe), probe.logits.shape[1]
        if n < 4:
            raise DetectionError(f"fitting a path detector needs at least 4 clean inputs, got {n}.")
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(n)
        n_hold = min(max(1, int(round(self.holdout * n))), n - 2)
        hold, train = order[:n_hold], order[n_hold:]
        self.site_names = list(site_names)
        a: dict[str, np.ndarray] = {"num_classes": np.array(k)}
        y = labels[train]
        counts_n = np.bincount(y, minlength=k).astype(np.float64)
        for l in range(len(self.site_names)):
            g = probe.gates[l][train].astype(np.float64)
            cc = np.zeros((k, g.shape[1]))
            np.add.at(cc, y, g)
            a[f"freq_{l}"] = (cc + self.smoothing) / (counts_n[:, None] + 2 * self.smoothing)
            zt = probe.z[l][train].astype(np.float64)
            mu = np.zeros((k, zt.shape[1]))
            np.add.at(mu, y, zt)
            mu /= np.maximum(counts_n, 1)[:, None]
            mu[counts_n == 0] = zt.mean(0)
            scale, w = _whitener(zt, zt - mu[y], self.ridge)
            a[f"mu_{l}"], a[f"scale_{l}"], a[f"white_{l}"] = mu, scale, w
            white = (zt / scale) @ w
            keep = np.concatenate(
                [rng.permutation(np.flatnonzero(y == c))[: self.knn_per_class] for c in range(k)]
            ).astype(np.int64)
            a[f"knn_x_{l}"], a[f"knn_y_{l}"] = white[keep].astype(np.float32), y[keep]
            a[f"clf_w_{l}"], a[f"clf_b_{l}"] = self._fit_classifier(white, y, k)
        zt = np.concatenate([z[train] for z in probe.z], axis=1).astype(np.float64)
        mu = np.zeros((k, zt.shape[1]))
        np.add.at(mu, y, zt)
        mu /= np.maximum(counts_n, 1)[:, None]
        mu[counts_n == 0] = zt.mean(0)
        a["joint_mu"] = mu
        a["joint_scale"], a["joint_white"] = _whitener(zt, zt - mu[y], self.ridge)
        self.arrays = a
        # standardise each method's layer scores on clean held-out inputs (scored under their predictions)
        hp = probe.select(hold)
        wrong = (hp.labels + rng.integers(1, k, size=len(hp))) % k if k > 1 else hp.labels
        joint = self._joint(hp, hp.preds)
        a["cal_joint"] = np.array([joint.mean(), max(joint.std(), 1e-12)])
        for m in self.METHODS:
            if m == "joint":
                continue
            raw = self._raw(hp, m, hp.preds)
            mean, std = raw.mean(0), raw.std(0)
            a[f"cal_mean_{m}"], a[f"cal_std_{m}"] = mean, np.where(std > 1e-12, std, 1.0)
            true_s, wrong_s = self._raw(hp, m, hp.labels), self._raw(hp, m, wrong)
            a[f"weight_{m}"] = np.array(
                [max(_auroc(true_s[:, l], wrong_s[:, l]) - 0.5, 0.0) for l in range(self.num_layers)]
            )
        return self

    @staticmethod
    def _fit_classifier(x: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        present = np.unique(y)
        w, b = np.zeros((k, x.shape[1])), np.full(k, -1e3)
        if present.size < 2:
            b[present] = 0.0
            return w, b
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        with warnings.catch_warnings():  # an unconverged fit is still a usable (fallback) score
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(max_iter=300, C=1.0).fit(x, y)
        if present.size == 2:  # binary sklearn models keep one row
            w[present[1]], b[present[1]] = clf.coef_[0], clf.intercept_[0]
            b[present[0]] = 0.0
        else:
            w[clf.classes_], b[clf.classes_] = clf.coef_, clf.intercept_
        return w, b

    # -- scoring ---------------------------------------------------------------------------

    def _joint(self, probe: Probe, cls: np.ndarray) -> np.ndarray:
        """``(N,)`` Mahalanobis distance of the whole soft path to the mean of classes ``cls``."""
        a = self.arrays
        z = np.concatenate(probe.z, axis=1).astype(np.float64)
        d = ((z - a["joint_mu"][cls]) / a["joint_scale"]) @ a["joint_white"]
        return (d**2).sum(1) / z.shape[1]

    def _raw(self, probe: Probe, method: str, cls: np.ndarray) -> np.ndarray:
        """``(N, L)`` raw per-layer scores of ``method`` under classes ``cls``."""
        a = self.arrays
        out = np.empty((len(probe), self.num_layers))
        for l in range(self.num_layers):
            if method in ("bernoulli", "hamming"):
                p = a[f"freq_{l}"][cls]
                g = probe.gates[l].astype(np.float64)
                if method == "bernoulli":
                    out[:, l] = -(g * np.log(p) + (1 - g) * np.log1p(-p)).mean(1)
                else:
                    out[:, l] = np.abs(g - p).mean(1)
                continue
            z = probe.z[l].astype(np.float64)
            w, scale = a[f"white_{l}"], a[f"scale_{l}"]
            if method == "gauss":
                d = ((z - a[f"mu_{l}"][cls]) / scale) @ w
                out[:, l] = (d**2).sum(1) / z.shape[1]
            elif method == "knn":
                white = (z / scale) @ w
                ref, ref_y = a[f"knn_x_{l}"].astype(np.float64), a[f"knn_y_{l}"]
                for c in np.unique(cls):
                    rows, pool = np.flatnonzero(cls == c), ref[ref_y == c]
                    if pool.shape[0] == 0:
                        out[rows, l] = np.inf
                        continue
                    d2 = ((white[rows, None, :] - pool[None]) ** 2).sum(-1)
                    kk = min(self.k, pool.shape[0]) - 1
                    out[rows, l] = np.partition(d2, kk, axis=1)[:, kk] / z.shape[1]
            else:  # pathclf
                white = (z / scale) @ w
                logit = white @ a[f"clf_w_{l}"].T + a[f"clf_b_{l}"]
                logit -= logit.max(1, keepdims=True)
                out[:, l] = -(logit[np.arange(len(cls)), cls] - np.log(np.exp(logit).sum(1)))
        return out

    def score_probe(self, probe: Probe, *, method: str | None = None, combine: str | None = None) -> PathScore:
        """Scores inputs whose forward pass is already in ``probe`` (no model call).

        Args:
            probe: from :func:`collect_probe`.
            method: per-layer score (default: the detector's).
            combine: combination of the layers (default: the detector's).
        """
        self._check_fitted()
        method, combine = method or self.method, combine or self.combine
        if method not in self.METHODS or combine not in self.COMBINES:
            raise ConfigError(f"method must be one of {self.METHODS} and combine one of {self.COMBINES}.")
        preds = probe.preds
        a = self.arrays
        layer_method = "gauss" if method == "joint" else method
        per_layer = (self._raw(probe, layer_method, preds) - a[f"cal_mean_{layer_method}"]) / a[f"cal_std_{layer_method}"]
        if method == "joint":
            overall = (self._joint(probe, preds) - a["cal_joint"][0]) / a["cal_joint"][1]
        elif combine == "mean":
            overall = per_layer.mean(1)
        elif combine == "max":
            overall = per_layer.max(1)
        else:
            w = a[f"weight_{method}"]
            w = w / w.sum() if w.sum() > 0 else np.full_like(w, 1.0 / w.size)
            overall = per_layer @ w
        return PathScore(overall, per_layer, preds, probe.logits)

    def score(self, x: torch.Tensor, *, batch_size: int = 256) -> PathScore:
        """Scores normalised inputs with one forward pass each (the path comes with the prediction).

        Args:
            x: normalised inputs ``(N, C, H, W)``.
            batch_size: inputs per forward pass.

        Returns:
            The :class:`PathScore` (overall, per layer, predictions, logits).

        Raises:
            DetectionError: not fitted, or no model attached (use :meth:`attach` after :meth:`load`).
        """
        self._check_fitted()
        if self.model is None:
            raise DetectionError("this PathDetector has no model: call detector.attach(dm) after loading it.")
        return self.score_probe(collect_probe(self.model, x, batch_size=batch_size))

    def attach(self, dm: nn.Module) -> PathDetector:
        """Attaches the decoupled model to score with, checking that its gated layers match."""
        names = list(getattr(dm, "site_names", []))
        if self.fitted and names != self.site_names:
            raise DetectionError(
                f"the detector was fitted on gated layers {self.site_names[:3]}... but the model has {names[:3]}...; refit it."
            )
        self.model = dm
        return self

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise DetectionError("this PathDetector is not fitted: call fit(dm, clean_loader) or PathDetector.load(path).")

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike, **meta: str) -> None:
        """Writes the fitted detector to ``.npz`` (no pickle), atomically.

        Args:
            path: destination, e.g. ``RUN/detector.npz``.
            **meta: extra strings to store (e.g. ``data="cifar10"``), read back by :meth:`load`.
        """
        self._check_fitted()
        path = Path(path)
        header = {
            "method": self.method, "combine": self.combine, "smoothing": self.smoothing, "ridge": self.ridge,
            "k": self.k, "knn_per_class": self.knn_per_class, "holdout": self.holdout, "seed": self.seed,
            "site_names": self.site_names, "meta": meta, "format": 1,
        }
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, header=np.array(json.dumps(header)), **self.arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, dm: nn.Module | None = None) -> PathDetector:
        """Reads a detector written by :meth:`save` (optionally attaching ``dm``)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                arrays = {k: z[k] for k in z.files if k != "header"}
        except (OSError, ValueError, KeyError) as exc:
            raise RunDirError(f"{path} is not a saved PathDetector ({exc}); delete it to refit.") from exc
        det = cls(
            header["method"], header["combine"], smoothing=header["smoothing"], ridge=header["ridge"], k=header["k"],
            knn_per_class=header["knn_per_class"], holdout=header["holdout"], seed=header["seed"],
        )
        det.site_names, det.arrays, det.meta = list(header["site_names"]), arrays, dict(header.get("meta", {}))
        if dm is not None:
            det.attach(dm)
        return det


def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if neg.size == 0 or pos.size == 0:
        return 0.5
    s = np.nan_to_num(np.r_[neg, pos], posinf=1e300)
    return float(roc_auc_score(np.r_[np.zeros(neg.size), np.ones(pos.size)], s))


# --------------------------------------------------------------------------------------------
# Mahalanobis baseline
# --------------------------------------------------------------------------------------------


class MahalanobisDetector:
    """Baseline: Mahalanobis distance of the penultimate features to the closest class mean.

    Class means and one shared covariance (Lee et al., 2018, without input pre-processing or
    layer ensembles) fitted on clean features; the features are the input of the classifier layer
    (the last ``nn.Linear`` that runs, found by :func:`find_feature_layer` and read with a
    forward hook that is removed after each pass). Score: ``min_c (f − μ_c)ᵀ Σ⁻¹ (f − μ_c)``.

    Args:
        ridge: ridge added to the correlation matrix.

    Example:
        >>> maha = MahalanobisDetector().fit(dm, train_loader)  # doctest: +SKIP
        >>> maha.score(x)  # doctest: +SKIP
    """

    def __init__(self, ridge: float = 1e-6) -> None:
        self.ridge = float(ridge)
        self.feature_layer: str | None = None
        self.means: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.white: np.ndarray | None = None
        self.model: nn.Module | None = None

    def fit(self, dm: nn.Module, loader: Iterable, *, max_samples: int | None = None) -> MahalanobisDetector:
        """Fits class means and the shared covariance on clean ``(inputs, labels)``."""
        layer = self.feature_layer or find_feature_layer(dm.model, _first_batch(loader).to(next(dm.parameters()).device))
        probe = collect_probe(dm, loader, feature_layer=layer, max_samples=max_samples)
        self.fit_probe(probe, layer)
        self.model = dm
        return self

    def fit_probe(self, probe: Probe, feature_layer: str) -> MahalanobisDetector:
        """Fits from a :class:`Probe` that holds features and true labels."""
        if probe.features is None:
            raise DetectionError("the probe holds no features; collect it with feature_layer=...")
        f, y, k = probe.features.astype(np.float64), probe.labels, probe.logits.shape[1]
        mu = np.zeros((k, f.shape[1]))
        cnt = np.bincount(y, minlength=k)
        np.add.at(mu, y, f)
        mu /= np.maximum(cnt, 1)[:, None]
        mu[cnt == 0] = np.inf
        self.scale, self.white = _whitener(f, f - mu[y], self.ridge)
        self.means, self.feature_layer = mu, feature_layer
        return self

    def score_probe(self, probe: Probe) -> np.ndarray:
        """``(N,)`` scores of inputs whose features are in ``probe``."""
        if self.means is None or probe.features is None:
            raise DetectionError("the Mahalanobis detector is not fitted, or the probe holds no features.")
        wf = (probe.features.astype(np.float64) / self.scale) @ self.white
        finite = np.isfinite(self.means).all(1)
        wm = (self.means[finite] / self.scale) @ self.white
        d = ((wf[:, None, :] - wm[None]) ** 2).sum(-1)
        return d.min(1)

    def score(self, x: torch.Tensor) -> np.ndarray:
        """``(N,)`` scores of normalised inputs (one forward pass)."""
        if self.model is None:
            raise DetectionError("this MahalanobisDetector has no model: fit it or attach a model.")
        return self.score_probe(collect_probe(self.model, x, feature_layer=self.feature_layer))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the fitted baseline to ``.npz`` (no pickle), atomically."""
        if self.means is None:
            raise DetectionError("the Mahalanobis detector is not fitted.")
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(
            tmp, feature_layer=np.array(self.feature_layer), ridge=np.array(self.ridge),
            means=self.means, scale=self.scale, white=self.white,
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, dm: nn.Module | None = None) -> MahalanobisDetector:
        """Reads a baseline written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                det = cls(float(z["ridge"]))
                det.feature_layer = str(z["feature_layer"])
                det.means, det.scale, det.white = z["means"], z["scale"], z["white"]
        except (OSError, ValueError, KeyError) as exc:
            raise RunDirError(f"{path} is not a saved MahalanobisDetector ({exc}); delete it to refit.") from exc
        det.model = dm
        return det


def _first_batch(loader: Iterable) -> torch.Tensor:
    for xb, _ in _batches(loader, 2):
        return xb[:2]
    raise DetectionError("the loader yielded no batches.")


# --------------------------------------------------------------------------------------------
# nd detect
# --------------------------------------------------------------------------------------------

DETECTOR_FILE = "detector.npz"
MAHALANOBIS_FILE = "detector_mahalanobis.npz"


@dataclass
class DetectionResult:
    """What :func:`run_detection` measured (also written as ``detect.json``).

    Attributes:
        attack: attack name; eps: its budget; n: clean inputs drawn; correct: of those, correctly
        classified; successful: of those, misclassified after the attack; success_rate:
        ``successful / correct``; detectors: ``{name: {"auroc", "tpr_at_5fpr"}}`` for the path
        detector (``"path"``) and the baselines; path_variants: the same for every per-layer score
        and combination of :class:`PathDetector`; per_layer: per gated layer, the mean standardised
        path score of clean and attacked inputs and the layer's AUROC; out_dir: where the files went.
    """

    attack: str
    eps: float
    steps: int
    n: int
    correct: int
    successful: int
    success_rate: float
    clean_accuracy: float
    detectors: dict[str, dict[str, float]]
    path_variants: dict[str, dict[str, float]]
    per_layer: list[dict[str, Any]]
    detector: dict[str, Any]
    out_dir: str
    figures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _metrics(clean: np.ndarray, adv: np.ndarray) -> dict[str, float]:
    m = detection_metrics(clean, adv)
    return {"auroc": round(m["auroc"], 4), "tpr_at_5fpr": round(m["tpr_at_fpr"], 4)}


def _subset_loader(dataset: Any, n: int | None, batch_size: int, seed: int):
    from torch.utils.data import DataLoader, Subset

    total = len(dataset)
    idx = np.random.default_rng(seed).permutation(total)[: (total if n is None else min(n, total))]
    return DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, shuffle=False)


def run_detection(
    run: Any,
    attack: str = "fgsm",
    eps: float = 8 / 255,
    n: int = 1000,
    data: str | None = None,
    *,
    steps: int = 10,
    fit_n: int = 10000,
    refit: bool = False,
    out: str | os.PathLike | None = None,
    batch_size: int = 200,
    device: str = "cpu",
    seed: int = 0,
    figures: bool = True,
    log: Callable[[str], None] | None = None,
) -> DetectionResult:
    """Attacks clean test inputs of a run, scores clean vs attacked, and writes ``detect.json``.

    Steps: rebuild the decoupled model from ``RUN``; load ``RUN/detector.npz`` (and the
    Mahalanobis baseline) or, when absent or fitted on other data, fit both on ``fit_n`` inputs of
    the training split (no augmentation) and save them; draw ``n`` inputs of the validation split
    (seeded); keep the correctly classified ones, attack them, keep the successful attacks; score
    clean and attacked inputs with the path detector, max-softmax and Mahalanobis (one forward pass
    per input serves all three); write ``detect.json`` and PNG figures.

    Args:
        run: a run directory (path or :class:`~nd_plugin.run.Run`).
        attack: attack name (:data:`ATTACKS`).
        eps: L∞ budget in (0, 1] pixel units.
        n: clean test inputs to draw.
        data: data spec to use instead of the run's.
        steps: iterations of iterative attacks.
        fit_n: training inputs used to fit the detectors when they must be fitted.
        refit: fit the detectors even when saved ones exist.
        out: output directory (default ``RUN/detect/<attack>-eps<eps>``).
        batch_size: inputs per forward pass / attack batch.
        device: where to run.
        seed: seed of the input draw and the attack.
        figures: write the PNG figures.
        log: receives progress lines.

    Returns:
        The :class:`DetectionResult`.

    Raises:
        UnknownAttackError, ConfigError: bad attack name or eps (checked before anything loads).
        RunDirError: not a run directory, or no checkpoint.
        DetectionError: no correctly classified input or no successful attack.

    Example:
        >>> res = run_detection("runs/r20", attack="fgsm", eps=8 / 255, n=1000)  # doctest: +SKIP
        >>> res.detectors["path"]["auroc"]  # doctest: +SKIP
    """
    from nd_plugin.run import Run, atomic_write_text, open_run

    key = _check_attack(attack, eps)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive number of inputs, got {n!r}.")
    say = log or (lambda _s: None)
    run = run if isinstance(run, Run) else open_run(run)
    cfg = run.config
    dm = run.build_model(device)
    bundle = run.data(data, train_augment=False)
    mean = cfg.get("mean") or list(bundle.mean)
    std = cfg.get("std") or list(bundle.std)
    data_spec = data or cfg.get("data", "")

    # detectors: load or fit from the training split
    det_file, maha_file = run.path / DETECTOR_FILE, run.path / MAHALANOBIS_FILE
    detector = maha = None
    if not refit and det_file.is_file() and maha_file.is_file():
        try:
            detector = PathDetector.load(det_file, dm)
            maha = MahalanobisDetector.load(maha_file, dm)
            if getattr(detector, "meta", {}).get("data") != data_spec:
                detector = maha = None
        except (RunDirError, DetectionError):
            detector = maha = None
    if detector is None or maha is None:
        fit_loader = _subset_loader(bundle.train, fit_n, batch_size, seed)
        say(f"fitting the path detector and the Mahalanobis baseline on {len(fit_loader.dataset)} training inputs")
        layer = find_feature_layer(dm.model, _first_batch(fit_loader).to(device))
        probe = collect_probe(dm, fit_loader, feature_layer=layer, device=device)
        detector = PathDetector().fit_probe(probe, dm.site_names).attach(dm)
        maha = MahalanobisDetector().fit_probe(probe, layer)
        maha.model = dm
        detector.save(det_file, data=data_spec)
        maha.save(maha_file)

    # clean inputs, attacks
    test_loader = _subset_loader(bundle.val, n, batch_size, seed)
    say(f"attacking {len(test_loader.dataset)} test inputs with {key} (eps={eps:.4g})")
    clean, adv, drawn, correct = attack_and_probe(
        dm, test_loader, key, eps, mean=mean, std=std, steps=steps, feature_layer=maha.feature_layer,
        seed=seed, device=device,
    )
    successful = len(adv)

    # scores
    cs, as_ = detector.score_probe(clean), detector.score_probe(adv)
    detectors = {
        "path": _metrics(cs.overall, as_.overall),
        "mahalanobis": _metrics(maha.score_probe(clean), maha.score_probe(adv)),
        "max_softmax": _metrics(msp_score(clean.logits), msp_score(adv.logits)),
    }
    variants = {}
    for m in PathDetector.METHODS:
        for c in PathDetector.COMBINES if m != "joint" else ("mean",):
            variants[m if m == "joint" else f"{m}/{c}"] = _metrics(
                detector.score_probe(clean, method=m, combine=c).overall,
                detector.score_probe(adv, method=m, combine=c).overall,
            )
    per_layer = [
        {
            "layer": name,
            "clean_mean": round(float(cs.per_layer[:, l].mean()), 4),
            "attacked_mean": round(float(as_.per_layer[:, l].mean()), 4),
            "auroc": round(_auroc(cs.per_layer[:, l], as_.per_layer[:, l]), 4),
        }
        for l, name in enumerate(detector.site_names)
    ]
    eps_tag = f"{eps:.4f}".rstrip("0").rstrip(".")
    out_dir = Path(out) if out is not None else run.path / "detect" / f"{key}-eps{eps_tag}"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = DetectionResult(
        attack=key, eps=float(eps), steps=int(steps), n=drawn, correct=correct, successful=successful,
        success_rate=round(successful / correct, 4), clean_accuracy=round(correct / drawn, 4),
        detectors=detectors, path_variants=variants, per_layer=per_layer,
        detector={"method": detector.method, "combine": detector.combine, "file": str(det_file)},
        out_dir=str(out_dir),
    )
    if figures:
        result.figures = _figures(out_dir, detector, maha, clean, adv, cs, as_, key, eps)
    atomic_write_text(out_dir / "detect.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def attack_and_probe(
    dm: nn.Module,
    loader: Iterable,
    attack: str,
    eps: float,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    steps: int = 10,
    feature_layer: str | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    gate_inputs: bool = False,
) -> tuple[Probe, Probe, int, int]:
    """Attacks the correctly classified inputs of ``loader`` and probes clean and attacked inputs.

    Returns:
        ``(clean, attacked, drawn, correct)``: the probes of the correctly classified clean inputs
        and of the *successful* attacks on them (misclassified afterwards), the number of inputs
        drawn and the number classified correctly.

    Raises:
        DetectionError: no input classified correctly, or no attack succeeded (success rate 0).
    """
    key = _check_attack(attack, eps)
    clean_parts, adv_parts = [], []
    drawn = correct = 0
    for b, (xb, yb) in enumerate(loader):
        xb, yb = xb.to(device), yb.to(device)
        cp = collect_probe(dm, [(xb, yb)], feature_layer=feature_layer, device=device, gate_inputs=gate_inputs)
        ok = cp.preds == cp.labels
        drawn, correct = drawn + len(cp), correct + int(ok.sum())
        if not ok.any():
            continue
        idx = torch.as_tensor(np.flatnonzero(ok), device=xb.device)
        adv = attack_fn(dm, xb[idx], yb[idx], key, eps, mean=mean, std=std, steps=steps, seed=seed + b)
        ap = collect_probe(dm, [(adv, yb[idx])], feature_layer=feature_layer, device=device, gate_inputs=gate_inputs)
        clean_parts.append(cp.select(ok))
        fooled = ap.preds != ap.labels
        if fooled.any():
            adv_parts.append(ap.select(fooled))
    if correct == 0:
        raise DetectionError(f"the model classifies none of the {drawn} test inputs correctly: nothing to attack.")
    if not adv_parts:
        raise DetectionError(
            f"attack {key} at eps={eps:.4g} succeeded on none of the {correct} correctly classified inputs "
            "(success rate 0): nothing to detect; raise --eps or use a stronger attack (e.g. pgd)."
        )
    return Probe.concat(clean_parts), Probe.concat(adv_parts), drawn, correct


attack_fn = attack  # run_detection's parameter `attack` shadows the function


def _figures(
    out_dir: Path, detector: PathDetector, maha: MahalanobisDetector, clean: Probe, adv: Probe,
    cs: PathScore, as_: PathScore, attack: str, eps: float,
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    files = []
    title = f"{attack.upper()} eps={eps * 255:.3g}/255: {len(clean)} clean vs {len(adv)} attacked"
    # ROC curves
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, c, a in (
        ("path detector", cs.overall, as_.overall),
        ("Mahalanobis (penultimate)", maha.score_probe(clean), maha.score_probe(adv)),
        ("max softmax", msp_score(clean.logits), msp_score(adv.logits)),
    ):
        y = np.r_[np.zeros(len(c)), np.ones(len(a))]
        f, t, _ = roc_curve(y, np.nan_to_num(np.r_[c, a], posinf=1e300))
        ax.plot(f, t, label=f"{label} (AUROC {_auroc(c, a):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.axvline(0.05, color="grey", lw=0.5)
    ax.set(xlabel="false-positive rate (clean flagged)", ylabel="true-positive rate (attacks flagged)", title=title)
    ax.title.set_fontsize(9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=120)
    plt.close(fig)
    files.append(str(out_dir / "roc.png"))
    # per-layer divergence (Fig. G-style: where the attacked paths leave the clean ones)
    L = detector.num_layers
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * L), 4))
    xs = np.arange(L)
    for label, s, col in (("clean", cs.per_layer, "tab:blue"), ("attacked", as_.per_layer, "tab:red")):
        m, sd = s.mean(0), s.std(0)
        ax.plot(xs, m, "o-", color=col, label=f"{label} (mean ± std)")
        ax.fill_between(xs, m - sd, m + sd, color=col, alpha=0.15)
    ax.set_xticks(xs, detector.site_names, rotation=70, fontsize=7)
    ax.set_ylabel(f"standardised path score ({'gauss' if detector.method == 'joint' else detector.method})")
    ax2 = ax.twinx()
    ax2.plot(xs, [_auroc(cs.per_layer[:, l], as_.per_layer[:, l]) for l in range(L)], "s--", color="k", ms=3, label="layer AUROC")
    ax2.set_ylim(0.4, 1.0)
    ax2.set_ylabel("AUROC of the layer alone")
    ax.set_title(f"Path divergence per gated layer, {title}", fontsize=9)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_dir / "layers.png", dpi=120)
    plt.close(fig)
    files.append(str(out_dir / "layers.png"))
    # Fig. H-style: mean binary paths by predicted class, clean vs attacked
    k = clean.logits.shape[1]
    if k <= 100:
        def class_paths(p: Probe) -> np.ndarray:
            g = np.concatenate(p.gates, axis=1).astype(np.float64)
            m = np.full((k, g.shape[1]), np.nan)
            for c in np.unique(p.preds):
                m[c] = g[p.preds == c].mean(0)
            return m

        fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
        for axx, (label, p) in zip(axes, (("clean, by predicted class", clean), ("attacked, by predicted class", adv))):
            im = axx.imshow(class_paths(p), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
            axx.set_ylabel(label, fontsize=8)
        bounds = np.cumsum([g.shape[1] for g in clean.gates])[:-1]
        for axx in axes:
            for b in bounds:
                axx.axvline(b - 0.5, color="w", lw=0.4)
        axes[-1].set_xlabel("gated filters (layers separated by white lines)")
        fig.colorbar(im, ax=axes, label="fraction of inputs with the gate on")
        fig.suptitle(f"Class paths, {title}", fontsize=9)
        fig.savefig(out_dir / "paths.png", dpi=120)
        plt.close(fig)
        files.append(str(out_dir / "paths.png"))
    return files
