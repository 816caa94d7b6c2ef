"""Detection metrics: AUROC and TPR at a fixed FPR (scores: higher = more likely adversarial)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nd_plugin.errors import DetectionError

__all__ = ["detection_metrics", "evaluate_supervised", "evaluate_unsupervised", "lee_splits"]


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


def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if neg.size == 0 or pos.size == 0:
        return 0.5
    s = np.nan_to_num(np.r_[neg, pos], posinf=1e300)
    return float(roc_auc_score(np.r_[np.zeros(neg.size), np.ones(pos.size)], s))


#: Lee et al.'s split of the attacked data: 5% to fit the regression, 5% to choose its
#: hyperparameter (preprocessing magnitude, LID's k), 90% to test.
FIT_FRACTION, VAL_FRACTION = 0.05, 0.05
#: Fewest attacked (and clean) inputs the 5% fit split may hold for the regression to be fitted.
MIN_FIT_PER_CLASS = 10


def lee_splits(n: int, seeds: int = 5, *, first_seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Lee's 5 / 5 / 90 split of ``n`` clean inputs (their attacks follow them), once per seed.

    Example:
        >>> fit, val, test = lee_splits(200, seeds=1)[0]
        >>> len(fit), len(val), len(test), len(set(fit) | set(val) | set(test))
        (10, 10, 180, 200)
    """
    out = []
    for s in range(first_seed, first_seed + seeds):
        order = np.random.default_rng(s).permutation(n)
        a, b = round(FIT_FRACTION * n), round((FIT_FRACTION + VAL_FRACTION) * n)
        out.append((order[:a], order[a:b], order[b:]))
    return out


def _part(clean: np.ndarray, adv: np.ndarray, adv_index: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels (0 clean, 1 attacked) of the clean inputs ``idx`` and of their attacks."""
    a = adv[np.isin(adv_index, idx)]
    return np.concatenate([clean[idx], a]), np.r_[np.zeros(len(idx)), np.ones(len(a))]


def _summary(aurocs: list[float], tprs: list[float], **extra: Any) -> dict[str, Any]:
    return {
        "auroc": round(float(np.mean(aurocs)), 4), "auroc_std": round(float(np.std(aurocs)), 4),
        "tpr_at_5fpr": round(float(np.mean(tprs)), 4), "tpr_at_5fpr_std": round(float(np.std(tprs)), 4),
        "seeds": len(aurocs), **extra,
    }


def evaluate_unsupervised(
    clean: np.ndarray, adversarial: np.ndarray, adv_index: np.ndarray, splits: Sequence[tuple[np.ndarray, ...]]
) -> dict[str, Any]:
    """AUROC / TPR at 5% FPR of a fixed score on the 90% test part of each split (mean and std).

    Example:
        >>> c, a = np.arange(100.0), np.arange(100.0) + 50
        >>> evaluate_unsupervised(c, a, np.arange(100), lee_splits(100, seeds=2))["auroc_std"] < 0.05
        True
    """
    aurocs, tprs = [], []
    for _fit, _val, test in splits:
        x, y = _part(np.asarray(clean), np.asarray(adversarial), adv_index, test)
        m = detection_metrics(x[y == 0], x[y == 1])
        aurocs.append(m["auroc"])
        tprs.append(m["tpr_at_fpr"])
    return _summary(aurocs, tprs)


Candidates = Mapping[Any, tuple[np.ndarray, np.ndarray]]


def _regression(x: np.ndarray, y: np.ndarray, seed: int) -> Any:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = int(min(5, np.bincount(y.astype(int)).min()))
    with warnings.catch_warnings():  # sklearn 1.9 announces default changes (FutureWarning); an unconverged fit still scores
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        reg = LogisticRegressionCV(Cs=10, cv=folds, scoring="neg_log_loss", solver="liblinear", max_iter=2000, random_state=seed)
        return make_pipeline(StandardScaler(), reg).fit(x, y)


def evaluate_supervised(
    candidates: Candidates,
    adv_index: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    test_candidates: Candidates | None = None,
    test_adv_index: np.ndarray | None = None,
) -> dict[str, Any]:
    """Lee's protocol for a detector with a regression over its features and one hyperparameter.

    For each split and each candidate hyperparameter (e.g. preprocessing magnitude), a logistic
    regression (standardised features, ``LogisticRegressionCV`` as in the authors' code) is fitted
    on the 5% fit part; the hyperparameter whose regression has the best AUROC on the 5%
    validation part is kept and measured on the 90% test part.

    Args:
        candidates: ``{hyperparameter: (clean (N, F), attacked (M, F))}`` features.
        adv_index: ``(M,)`` the clean input each attacked one was made from.
        splits: from :func:`lee_splits` (indices of clean inputs).
        test_candidates: features to test on instead (a transfer: fit on one attack, test on
            another attack of the same clean inputs); same keys as ``candidates``.
        test_adv_index: ``adv_index`` of ``test_candidates``.

    Returns:
        ``{"auroc", "auroc_std", "tpr_at_5fpr", "tpr_at_5fpr_std", "seeds", "chosen"}`` (``chosen``:
        the hyperparameter picked for each split).

    Raises:
        DetectionError: the fit part holds fewer than :data:`MIN_FIT_PER_CLASS` attacked or clean
            inputs (the message says how many successful attacks are needed).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> c = rng.normal(size=(400, 2))
        >>> cands = {0: (c, c[:, ::-1] + [3.0, 0.0]), 1: (c, c + 0.1)}
        >>> r = evaluate_supervised(cands, np.arange(400), lee_splits(400, seeds=2))
        >>> r["chosen"], r["auroc"] > 0.95
        ([0, 0], True)
    """
    test_candidates = candidates if test_candidates is None else test_candidates
    test_adv_index = adv_index if test_adv_index is None else test_adv_index
    aurocs, tprs, chosen = [], [], []
    for seed, (fit, val, test) in enumerate(splits):
        best = None
        for key, (clean, adv) in candidates.items():
            xf, yf = _part(clean, adv, adv_index, fit)
            n_adv, n_clean = int(yf.sum()), int((yf == 0).sum())
            if min(n_adv, n_clean) < MIN_FIT_PER_CLASS:
                per = max(len(adv_index), 1) / max(len(clean), 1)
                raise DetectionError(
                    f"the 5% fit split holds {n_adv} attacked and {n_clean} clean inputs; the regression needs at least "
                    f"{MIN_FIT_PER_CLASS} of each: attack at least {int(np.ceil(MIN_FIT_PER_CLASS / FIT_FRACTION / min(per, 1.0)))} "
                    f"correctly classified inputs ({int(np.ceil(MIN_FIT_PER_CLASS / FIT_FRACTION))} successful attacks), e.g. raise --n."
                )
            reg = _regression(xf, yf, seed)
            xv, yv = _part(clean, adv, adv_index, val)
            pv = reg.predict_proba(xv)[:, 1]
            auc = _auroc(pv[yv == 0], pv[yv == 1])
            if best is None or auc > best[0]:
                best = (auc, key, reg)
        _, key, reg = best
        tc, ta = test_candidates[key]
        xt, yt = _part(tc, ta, test_adv_index, test)
        pt = reg.predict_proba(xt)[:, 1]
        m = detection_metrics(pt[yt == 0], pt[yt == 1])
        aurocs.append(m["auroc"])
        tprs.append(m["tpr_at_fpr"])
        chosen.append(key)
    return _summary(aurocs, tprs, chosen=chosen)
