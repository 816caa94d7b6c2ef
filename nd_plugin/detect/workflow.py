"""``nd detect``'s orchestration on a run directory: fit (or load) the detectors, attack, evaluate, write ``detect.json``."""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nd_plugin.detect.attacks import _check_attack
from nd_plugin.detect.baselines import LEE_MAGNITUDES
from nd_plugin.detect.features import Probe
from nd_plugin.detect.metrics import _auroc
from nd_plugin.detect.protocol import (
    SUPERVISED,
    AttackedSet,
    FittedDetectors,
    attack_set,
    check_detectors,
    detector_features,
    evaluate,
    fit_detectors,
)
from nd_plugin.errors import ConfigError, DetectionError, RunDirError

__all__ = ["DetectionResult", "attack_and_probe", "mi_weights_of", "run_detection"]

DETECTOR_FILE = "detector.npz"
MAHALANOBIS_FILE = "detector_mahalanobis.npz"


@dataclass
class DetectionResult:
    """What :func:`run_detection` measured (also written as ``detect.json``).

    Attributes:
        attack, eps, steps: the attack; n: clean inputs drawn; correct: of those, correctly
        classified (the negatives); successful: of those, misclassified after the attack (the
        positives); success_rate: ``successful / correct``; clean_accuracy: ``correct / n``.
        detectors: ``{name: {"auroc", "auroc_std", "tpr_at_5fpr", "tpr_at_5fpr_std", "seeds"[,
        "chosen"]}}`` on Lee's 5 / 5 / 90 protocol (names: :data:`~nd_plugin.detect.protocol.DETECTORS`).
        transfer: ``{"fitted_on": TAG, "detectors": {...}}`` for the supervised detectors fitted on
        another attack of the same clean inputs, or ``None``.
        path_variants: AUROC of every score of :class:`PathDetector` on all inputs (no split).
        per_layer: per gated layer, the mean standardised path score of clean and attacked inputs
        and the layer's AUROC. detector: the path detector's settings and fit (``fit_n``,
        ``fit_seconds``); out_dir: where the files went.
    """

    attack: str
    eps: float
    steps: int
    n: int
    correct: int
    successful: int
    success_rate: float
    clean_accuracy: float
    detectors: dict[str, dict[str, Any]]
    path_variants: dict[str, dict[str, float]]
    per_layer: list[dict[str, Any]]
    detector: dict[str, Any]
    out_dir: str
    transfer: dict[str, Any] | None = None
    protocol: str = "Lee et al. 2018: clean = correctly classified, positives = successful attacks; 5% fit / 5% choice / 90% test"
    figures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _subset_loader(dataset: Any, n: int | None, batch_size: int, seed: int):
    from torch.utils.data import DataLoader, Subset

    total = len(dataset)
    idx = np.random.default_rng(seed).permutation(total)[: (total if n is None else min(n, total))]
    return DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, shuffle=False)


def mi_weights_of(checkpoint: dict[str, Any]) -> list[np.ndarray] | None:
    """The ``L_mi`` classifiers' weights ``(K, C_l)`` saved in a run's checkpoint (``None`` when absent)."""
    loss = checkpoint.get("loss") or {}
    keys = sorted((k for k in loss if k.startswith("classifiers.") and k.endswith(".weight")), key=lambda k: int(k.split(".")[1]))
    return [loss[k].float().cpu().numpy() for k in keys] or None


def path_variants(fitted: FittedDetectors, clean: Probe, adv: Probe) -> dict[str, dict[str, float]]:
    """AUROC of every path score and layer combination on all inputs (a diagnostic, no split)."""
    det = fitted.path
    out = {}
    for m in det.METHODS:
        if m == "mi" and "mi_w_0" not in det.arrays:
            continue
        for c in det.COMBINES if m not in det.OVERALL_ONLY else ("mean",):
            name = m if m in det.OVERALL_ONLY else f"{m}/{c}"
            cs, as_ = det.score_probe(clean, method=m, combine=c).overall, det.score_probe(adv, method=m, combine=c).overall
            out[name] = {"auroc": round(_auroc(cs, as_), 4)}
    return out


def load_or_fit(
    run: Any, dm: nn.Module, bundle: Any, data_spec: str, *, mi: list[np.ndarray] | None, fit_n: int | None,
    refit: bool, batch_size: int, device: str, seed: int, say: Callable[[str], None],
) -> FittedDetectors:
    """The run's saved detectors when they were fitted on ``data_spec`` with ``fit_n`` inputs; else fits and saves them."""
    want = str(len(bundle.train) if fit_n is None else min(fit_n, len(bundle.train)))
    if not refit:
        try:
            fitted = FittedDetectors.load(run.path, dm)
            if fitted.meta.get("data") == data_spec and fitted.meta.get("fit_n") == want:
                return fitted
        except (RunDirError, DetectionError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            if (run.path / DETECTOR_FILE).exists():  # saved but damaged or another model's: say so, touch nothing
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise RunDirError(f"the saved detectors ({run.path / DETECTOR_FILE} and beside it) cannot be used ({reason}); refit them with `nd detect {run.path} --refit`.") from None
    loader = _subset_loader(bundle.train, fit_n, batch_size, seed)
    say(f"fitting the detectors on {len(loader.dataset)} training inputs")
    fitted = fit_detectors(dm, loader, mi_weights=mi, device=device, meta={"data": data_spec})
    say(f"fitted in {fitted.meta['fit_seconds']} s")
    fitted.save(run.path)
    return fitted


def run_detection(
    run: Any,
    attack: str = "fgsm",
    eps: float = 8 / 255,
    n: int = 1000,
    data: str | None = None,
    *,
    steps: int = 10,
    fit_n: int | None = None,
    refit: bool = False,
    out: str | os.PathLike | None = None,
    batch_size: int = 200,
    device: str = "cpu",
    seed: int = 0,
    figures: bool = True,
    detectors: Sequence[str] | None = None,
    seeds: int = 5,
    transfer_from: tuple[str, float] | None = None,
    magnitudes: Sequence[float] = LEE_MAGNITUDES,
    path_magnitudes: Sequence[float] = (0.0,),
    log: Callable[[str], None] | None = None,
) -> DetectionResult:
    """Attacks clean test inputs of a run and measures every detector on Lee et al.'s protocol.

    Steps: rebuild the decoupled model from ``RUN``; load the detectors saved in ``RUN``
    (``detector.npz``, ``detector_mahalanobis.npz``, ``detector_lee.npz``) or, when absent or
    fitted on other data, fit them on ``fit_n`` inputs of the training split (all by default; no
    augmentation) and save them; draw ``n`` inputs of the validation split (seeded); attack the
    correctly classified ones, keep the successful attacks; evaluate each detector on ``seeds``
    5 / 5 / 90 splits; with ``transfer_from``, also attack with that attack and test the supervised
    detectors fitted on it; write ``detect.json`` and PNG figures.

    Args:
        run: a run directory (path or :class:`~nd_plugin.run.Run`).
        attack: attack name (:data:`~nd_plugin.detect.attacks.ATTACKS`).
        eps: L∞ budget in (0, 1] pixel units.
        n: clean test inputs to draw.
        data: data spec to use instead of the run's.
        steps: iterations of iterative attacks.
        fit_n: training inputs to fit on (``None``: the whole training split).
        refit: fit the detectors even when saved ones exist.
        out: output directory (default ``RUN/detect/<attack>-eps<eps>``).
        batch_size: inputs per forward pass / attack batch.
        device: where to run.
        seed: seed of the input draw and the attack.
        figures: write the PNG figures.
        detectors: names to measure (default all of :data:`~nd_plugin.detect.protocol.DETECTORS`).
        seeds: repetitions of the 5 / 5 / 90 split.
        transfer_from: ``(attack, eps)`` to fit the supervised detectors on, tested on ``attack``.
        magnitudes: Lee's preprocessing magnitudes (pixel units) to choose from.
        path_magnitudes: the same for ``path_supervised``, through the path score's gradient
            (default ``(0.0,)``: none).
        log: receives progress lines.

    Returns:
        The :class:`DetectionResult`.

    Raises:
        UnknownAttackError, UnknownDetectorError, ConfigError: bad names, eps or counts (checked
            before anything loads).
        RunDirError: not a run directory, or no checkpoint.
        DetectionError: no correctly classified input, no successful attack, or too few attacked
            inputs for the regression (the message says how many).

    Example:
        >>> run_detection("/nonexistent/run", attack="fgsm", eps=0.05, detectors=["odin"])
        Traceback (most recent call last):
        ...
        nd_plugin.detect.protocol.UnknownDetectorError: unknown detector 'odin'; known detectors: path, path_supervised, path_supervised_raw, mahalanobis_lee, lid, mahalanobis_penultimate, max_softmax.
    """
    from nd_plugin.detect_figures import detection_figures
    from nd_plugin.run import Run, atomic_write_text, open_run

    key = _check_attack(attack, eps)
    names = check_detectors(detectors)
    source = (_check_attack(transfer_from[0], transfer_from[1]), float(transfer_from[1])) if transfer_from else None
    for label, value in (("n", n), ("seeds", seeds)) + ((("fit_n", fit_n),) if fit_n is not None else ()):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label} must be a positive integer, got {value!r}.")
    say = log or (lambda _s: None)
    run = run if isinstance(run, Run) else open_run(run)
    mi = mi_weights_of(run.load_checkpoint("cpu"))  # also: a run without a checkpoint stops here, in one line
    cfg = run.config
    dm = run.build_model(device)
    bundle = run.data(data, train_augment=False)
    mean, std = cfg.get("mean") or list(bundle.mean), cfg.get("std") or list(bundle.std)
    data_spec = data or cfg.get("data", "")
    fitted = load_or_fit(
        run, dm, bundle, data_spec, mi=mi, fit_n=fit_n, refit=refit, batch_size=batch_size, device=device, seed=seed, say=say
    )

    feat_kw = {"std": std, "detectors": names, "magnitudes": magnitudes, "path_magnitudes": path_magnitudes, "batch_size": batch_size}

    def attacked(name: str, budget: float) -> tuple[AttackedSet, dict[str, Any]]:
        loader = _subset_loader(bundle.val, n, batch_size, seed)
        say(f"attacking {len(loader.dataset)} test inputs with {name} (eps={budget:.4g})")
        aset = attack_set(
            dm, loader, name, budget, mean=mean, std=std, steps=steps, feature_layer=fitted.penultimate.feature_layer,
            stages=fitted.lee.layers, seed=seed, device=device,
        )
        return aset, detector_features(fitted, dm, aset.x_adv, aset.adv, **feat_kw)

    t0 = time.perf_counter()
    aset, adv_f = attacked(key, eps)
    say(f"scoring {aset.correct} clean and {aset.successful} attacked inputs")
    clean_f = detector_features(fitted, dm, aset.x_clean, aset.clean, **feat_kw)
    results = evaluate(clean_f, adv_f, aset, seeds=seeds)
    transfer = None
    if source is not None and any(nm in SUPERVISED for nm in names):
        src, src_f = attacked(*source)
        transfer = {"fitted_on": src.tag, "detectors": evaluate(clean_f, src_f, src, seeds=seeds, transfer=(adv_f, aset))}
    det = fitted.path
    cs, as_ = det.score_probe(aset.clean), det.score_probe(aset.adv)
    per_layer = [
        {
            "layer": name,
            "clean_mean": round(float(cs.per_layer[:, l].mean()), 4),
            "attacked_mean": round(float(as_.per_layer[:, l].mean()), 4),
            "auroc": round(_auroc(cs.per_layer[:, l], as_.per_layer[:, l]), 4),
        }
        for l, name in enumerate(det.site_names)
    ]
    out_dir = Path(out) if out is not None else run.path / "detect" / aset.tag
    out_dir.mkdir(parents=True, exist_ok=True)
    result = DetectionResult(
        attack=key, eps=float(eps), steps=int(steps), n=aset.drawn, correct=aset.correct, successful=aset.successful,
        success_rate=round(aset.successful / aset.correct, 4), clean_accuracy=round(aset.correct / aset.drawn, 4),
        detectors=results, path_variants=path_variants(fitted, aset.clean, aset.adv), per_layer=per_layer,
        detector={"method": det.method, "combine": det.combine, "file": str(run.path / DETECTOR_FILE), **fitted.meta,
                  "evaluate_seconds": round(time.perf_counter() - t0, 1)},
        out_dir=str(out_dir), transfer=transfer,
    )
    if figures:
        result.figures = detection_figures(out_dir, det, fitted.penultimate, aset.clean, aset.adv, cs, as_, key, eps)
    atomic_write_text(out_dir / "detect.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def attack_and_probe(
    dm: nn.Module,
    loader: Any,
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
    """``(clean, attacked, drawn, correct)`` of :func:`~nd_plugin.detect.protocol.attack_set` (kept for existing callers)."""
    s = attack_set(dm, loader, attack, eps, mean=mean, std=std, steps=steps, feature_layer=feature_layer, seed=seed,
                   device=device, gate_inputs=gate_inputs)
    return s.clean, s.adv, s.drawn, s.correct
