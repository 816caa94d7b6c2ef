"""``nd detect``'s orchestration: fit (or load) the detectors of a run, attack, score, write ``detect.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nd_plugin.detect.attacks import _check_attack
from nd_plugin.detect.attacks import attack as attack_fn
from nd_plugin.detect.baselines import MahalanobisDetector, msp_score
from nd_plugin.detect.detectors import PathDetector
from nd_plugin.detect.features import Probe, _first_batch, collect_probe, find_feature_layer
from nd_plugin.detect.metrics import _auroc, detection_metrics
from nd_plugin.errors import ConfigError, DetectionError, RunDirError

__all__ = ["DetectionResult", "attack_and_probe", "run_detection"]


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
    from nd_plugin.detect_figures import detection_figures
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
        result.figures = detection_figures(out_dir, detector, maha, clean, adv, cs, as_, key, eps)
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
