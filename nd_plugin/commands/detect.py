"""``nd detect``: fit (or load) a run's detectors, attack its test inputs, evaluate, write ``detect.json``.

The detectors are fitted on the run's training split the first time and saved beside its
checkpoint (:meth:`~nd_plugin.detect.protocol.FittedDetectors.save`); each attack's results go to
``RUN/detect/TAG/`` (:meth:`~nd_plugin.detect.workflow.DetectionResult.save` and the figures).
The computing is :mod:`nd_plugin.detect`'s, on objects.
"""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from nd_plugin import run as rundir
from nd_plugin.detect.attacks import AttackSpec, parse_attack_args, resolve_attack
from nd_plugin.detect.base import Detector, list_detectors, resolve_detectors
from nd_plugin.detect.baselines import LEE_MAGNITUDES
from nd_plugin.detect.protocol import (
    AttackedSet,
    FittedDetectors,
    attack_set,
    detector_features,
    evaluate,
    fit_detectors,
    plan,
    recommend,
)
from nd_plugin.detect.workflow import DetectionResult, mi_weights_of, path_variants
from nd_plugin.errors import ConfigError, DetectionError, RunDirError
from nd_plugin.utilities import auroc, subset_loader

# list_detectors (the --detectors help) and parse_attack_args (--attack-arg): what the CLI reads through this layer
__all__ = ["list_detectors", "load_or_fit", "parse_attack_args", "run_detection"]


def load_or_fit(
    run: Any,
    dm: nn.Module,
    bundle: Any,
    data_spec: str,
    *,
    mi: list[np.ndarray] | None,
    fit_n: int | None,
    refit: bool,
    batch_size: int,
    device: str,
    seed: int,
    say: Callable[[str], None],
) -> FittedDetectors:
    """The run's saved detectors when they were fitted on ``data_spec`` with ``fit_n`` inputs; else fits and saves them."""
    want = str(len(bundle.train) if fit_n is None else min(fit_n, len(bundle.train)))
    if not refit:
        try:
            fitted = FittedDetectors.load(run.path, dm)
            if fitted.meta.get("data") == data_spec and fitted.meta.get("fit_n") == want:
                return fitted
        except (RunDirError, DetectionError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            if (run.path / rundir.DETECTOR_PATH).exists():  # saved but damaged or another model's: say so, touch nothing
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise RunDirError(
                    f"the saved detectors ({run.path / rundir.DETECTOR_PATH} and beside it) cannot be used ({reason}); refit them with `nd detect {run.path} --refit`."
                ) from None
    loader = subset_loader(bundle.train, fit_n, batch_size, seed)
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
    attack_args: Mapping[str, Any] | None = None,
    fit_n: int | None = None,
    refit: bool = False,
    out: str | os.PathLike | None = None,
    batch_size: int = 200,
    device: str = "cpu",
    seed: int = 0,
    figures: bool = True,
    detectors: Sequence[str | Detector] | None = None,
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
    5 / 5 / 90 splits, or, when the 5% fit part cannot hold enough attacked inputs (a small
    validation split, a weak attack), on a stratified K-fold cross-validation over all of them
    (``result.protocol`` says which: ``"lee-5/5/90"`` or ``"stratified-kfold-K"``); with
    ``transfer_from``, also attack with that attack and test the supervised detectors fitted on it;
    write ``detect.json`` and PNG figures.

    Args:
        run: a run directory (path or :class:`~nd_plugin.run.Run`).
        attack: a short name of :data:`~nd_plugin.detect.attacks.ATTACKS` or any torchattacks
            attack's class name (case-insensitive; :func:`~nd_plugin.detect.attacks.list_attacks`).
        eps: L∞ budget in (0, 1] pixel units.
        n: clean test inputs to draw.
        data: data spec to use instead of the run's.
        steps: iterations of iterative attacks.
        attack_args: more keyword arguments of the attack's ``__init__`` (``{"steps": 20}``,
            ``{"loss": "dlr"}``); they win over ``eps`` and ``steps``.
        fit_n: training inputs to fit on (``None``: the whole training split).
        refit: fit the detectors even when saved ones exist.
        out: output directory (default ``RUN/detect/<attack>-eps<eps>``).
        batch_size: inputs per forward pass / attack batch.
        device: where to run.
        seed: seed of the input draw and the attack.
        figures: write the PNG figures.
        detectors: names (or :class:`~nd_plugin.detect.base.Detector` instances) to measure
            (default: every registered detector, :func:`~nd_plugin.detect.base.list_detectors`).
        seeds: repetitions of the 5 / 5 / 90 split.
        transfer_from: ``(attack, eps)`` to fit the supervised detectors on, tested on ``attack``.
        magnitudes: Lee's preprocessing magnitudes (pixel units) to choose from
            (``mahalanobis_lee``'s option, when it is named).
        path_magnitudes: the same for ``path_supervised``, through the path score's gradient
            (default ``(0.0,)``: none).
        log: receives progress lines.

    Returns:
        The :class:`DetectionResult`.

    Raises:
        UnknownAttackError, AttackArgumentError, UnknownDetectorError, ConfigError: bad names,
            attack parameters, eps or counts (checked before anything loads).
        RunDirError: not a run directory, or no checkpoint.
        DetectionError: no correctly classified input, no successful attack, or too few
            successful attacks for any estimate even by cross-validation (the message says how
            many are needed and what to change).

    Example:
        >>> run_detection("/nonexistent/run", attack="fgsm", eps=0.05, detectors=["odin"])
        Traceback (most recent call last):
        ...
        nd_plugin.errors.UnknownDetectorError: unknown detector 'odin'; known detectors: path, path_supervised, path_supervised_raw, path_supervised_full, combined, mahalanobis_lee, lid, mahalanobis_penultimate, max_softmax.
    """
    from nd_plugin.detect.figures import detection_figures

    spec = resolve_attack(attack, eps, steps=steps, attack_kwargs=attack_args)
    key, eps = spec.name, float(spec.kwargs.get("eps", eps))
    options = {"mahalanobis_lee": {"magnitudes": tuple(magnitudes)}, "path_supervised": {"magnitudes": tuple(path_magnitudes)}}
    chosen = resolve_detectors(detectors, options)
    source = resolve_attack(transfer_from[0], transfer_from[1], steps=steps) if transfer_from else None
    for label, value in (("n", n), ("seeds", seeds)) + ((("fit_n", fit_n),) if fit_n is not None else ()):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label} must be a positive integer, got {value!r}.", params=(label,))
    say = log or (lambda _s: None)
    run = run if isinstance(run, rundir.Run) else rundir.open_run(run)
    mi = mi_weights_of(run.load_checkpoint("cpu"))  # also: a run without a checkpoint stops here, in one line
    cfg = run.config
    dm = run.build_model(device)
    bundle = run.data(data, train_augment=False)
    mean, std = cfg.get("mean") or list(bundle.mean), cfg.get("std") or list(bundle.std)
    data_spec = data or cfg.get("data", "")
    fitted = load_or_fit(
        run, dm, bundle, data_spec, mi=mi, fit_n=fit_n, refit=refit, batch_size=batch_size, device=device, seed=seed, say=say
    )

    feat_kw = {"std": std, "detectors": chosen, "batch_size": batch_size}
    available = len(bundle.val)

    def attacked(a: AttackSpec) -> AttackedSet:
        loader = subset_loader(bundle.val, n, batch_size, seed)
        budget = float(a.kwargs.get("eps", eps))
        say(f"attacking {len(loader.dataset)} test inputs with {a.name} (eps={budget:.4g})")
        return attack_set(
            dm,
            loader,
            a,
            budget,
            mean=mean,
            std=std,
            steps=steps,
            feature_layer=fitted.penultimate.feature_layer,
            stages=fitted.lee.layers,
            seed=seed,
            device=device,
        )

    # what to do about too few successful attacks, and the parameters it names (the CLI writes its flags)
    hint_params = ("eps", "attack", "n", "detectors")

    def hint(a: AttackSpec) -> str:
        ways = [f"raise eps (now {float(a.kwargs['eps']):.4g}; e.g. 0.1)"] if "eps" in a.kwargs else []
        ways.append("try a stronger one (e.g. attack=pgd)")
        if n < available:
            ways.append(f"draw more inputs (n, now {n}; the validation split holds {available})")
        unsupervised = [d.name for d in chosen if not d.supervised] or list_detectors(supervised=False)
        return ", ".join(ways) + f", or measure only the unsupervised ones (detectors={','.join(unsupervised)})"

    t0 = time.perf_counter()
    aset = attacked(spec)
    splits = plan(aset, chosen, seeds=seeds, hint=hint(spec), hint_params=hint_params)  # a set too small stops here
    say(f"protocol: {splits.protocol} ({splits.reason})")
    adv_f = detector_features(fitted, dm, aset.x_adv, aset.adv, **feat_kw)
    say(f"scoring {aset.correct} clean and {aset.successful} attacked inputs")
    clean_f = detector_features(fitted, dm, aset.x_clean, aset.clean, **feat_kw)
    results = evaluate(clean_f, adv_f, aset, detectors=chosen, splits=splits)
    transfer = None
    if source is not None and any(d.supervised for d in chosen):
        src = attacked(source)
        src_splits = plan(src, chosen, seeds=seeds, hint=hint(source), hint_params=hint_params)
        src_f = detector_features(fitted, dm, src.x_adv, src.adv, **feat_kw)
        transfer = {
            "fitted_on": src.tag,
            "protocol": src_splits.protocol,
            "detectors": evaluate(clean_f, src_f, src, detectors=chosen, splits=src_splits, transfer=(adv_f, aset)),
        }
    det = fitted.path
    cs, as_ = det.score_probe(aset.clean), det.score_probe(aset.adv)
    per_layer = [
        {
            "layer": name,
            "clean_mean": round(float(cs.per_layer[:, l].mean()), 4),
            "attacked_mean": round(float(as_.per_layer[:, l].mean()), 4),
            "auroc": round(auroc(cs.per_layer[:, l], as_.per_layer[:, l]), 4),
        }
        for l, name in enumerate(det.site_names)
    ]
    out_dir = Path(out) if out is not None else run.path / rundir.DETECT / aset.tag
    out_dir.mkdir(parents=True, exist_ok=True)
    result = DetectionResult(
        attack=key,
        eps=float(eps),
        steps=aset.steps,
        n=aset.drawn,
        correct=aset.correct,
        successful=aset.successful,
        success_rate=round(aset.successful / aset.correct, 4),
        clean_accuracy=round(aset.correct / aset.drawn, 4),
        detectors=results,
        path_variants=path_variants(fitted, aset.clean, aset.adv),
        per_layer=per_layer,
        detector={
            "method": det.method,
            "combine": det.combine,
            "file": str(run.path / rundir.DETECTOR_PATH),
            **fitted.meta,
            "evaluate_seconds": round(time.perf_counter() - t0, 1),
        },
        out_dir=str(out_dir),
        transfer=transfer,
        protocol=splits.protocol,
        protocol_info=splits.to_dict(),
        attack_class=spec.cls,
        attack_args=_plain(spec.kwargs),
        recommended=recommend(results),
    )
    if figures:
        result.figures = detection_figures(out_dir, det, fitted.penultimate, aset.clean, aset.adv, cs, as_, key, eps)
    result.save(out_dir / rundir.DETECT_JSON)
    return result


def _plain(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments as JSON values (tuples as lists, anything else as its ``repr``)."""
    out = {}
    for k, v in kwargs.items():
        out[k] = list(v) if isinstance(v, tuple) else v if v is None or isinstance(v, (bool, int, float, str, list)) else repr(v)
    return out
