"""Detection metrics: AUROC and TPR at a fixed FPR (scores: higher = more likely adversarial)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nd_plugin.errors import DetectionError
from nd_plugin.utilities import auroc

__all__ = [
    "KFOLD",
    "LEE_PROTOCOL",
    "Splits",
    "detection_metrics",
    "evaluate_supervised",
    "evaluate_unsupervised",
    "kfold_splits",
    "lee_splits",
    "plan_splits",
]


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


#: The name of Lee et al.'s protocol in results (``detect.json["protocol"]``).
LEE_PROTOCOL = "lee-5/5/90"
#: Folds of the stratified cross-validation used when Lee's 5% fit part is too small, in the
#: order tried: the fewest whose fit parts hold enough attacked inputs is used (3 folds fit half
#: as many regressions as 5 on the same inputs; more folds leave more inputs to fit on).
KFOLD = (3, 5, 10)
#: In a cross-validation, the share of the training folds held out to choose the hyperparameter.
KFOLD_VAL_FRACTION = 0.25


def kfold_splits(
    attacked: np.ndarray, folds: int = 5, repeats: int = 1, *, val_fraction: float = KFOLD_VAL_FRACTION, first_seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stratified K-fold cross-validation over the clean inputs (their attacks follow them), ``repeats`` times.

    scikit-learn's ``StratifiedKFold`` (shuffled, seeded) splits the clean inputs, stratified by
    whether their attack succeeded, so every test fold holds its share of the attacked inputs; the
    other folds are split again (``train_test_split``, stratified) into a fit part and a
    ``val_fraction`` part that chooses the hyperparameter, as Lee's 5% / 5% parts do. An input and
    its attack always sit in the same part.

    Args:
        attacked: ``(N,)`` bool, for each clean input whether its attack succeeded.
        folds: K (at least 2, at most the number of attacked inputs).
        repeats: how many times to repeat the K folds (seeds ``first_seed``, ``first_seed + 1``, …).
        val_fraction: share of the training folds used to choose the hyperparameter.
        first_seed: seed of the first repetition.

    Returns:
        ``folds · repeats`` triples ``(fit, val, test)`` of indices of clean inputs.

    Example:
        >>> attacked = np.arange(100) % 5 == 0  # 20 of 100 attacks succeeded
        >>> parts = kfold_splits(attacked, folds=5)
        >>> len(parts), sorted(np.concatenate([t for _f, _v, t in parts]).tolist()) == list(range(100))
        (5, True)
        >>> fit, val, test = parts[0]
        >>> len(fit), len(val), len(test), int(attacked[fit].sum()), int(attacked[test].sum())
        (60, 20, 20, 12, 4)
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split

    y = np.asarray(attacked, dtype=bool).astype(int)
    counts = np.bincount(y, minlength=2)
    if counts[counts > 0].min() < folds:  # (nearly) every attack succeeded: nothing to stratify by
        y = np.zeros_like(y)
    idx = np.arange(y.size)
    out = []
    for r in range(first_seed, first_seed + repeats):
        for train, test in StratifiedKFold(n_splits=folds, shuffle=True, random_state=r).split(idx, y):
            strata = y[train] if np.bincount(y[train]).min() >= 2 else None
            fit, val = train_test_split(train, test_size=val_fraction, stratify=strata, random_state=r)
            out.append((np.sort(fit), np.sort(val), np.sort(test)))
    return out


@dataclass(frozen=True)
class Splits:
    """An evaluation protocol: its name and the ``(fit, val, test)`` parts of the clean inputs.

    Attributes:
        protocol: ``"lee-5/5/90"`` (Lee et al.: 5% fit, 5% choice, 90% test, one split per seed)
            or ``"stratified-kfold-K"`` (:func:`kfold_splits`).
        parts: ``(fit, val, test)`` indices of clean inputs (their attacks follow them).
        repeats: seeds of Lee's split, or repetitions of the K folds.
        reason: why this protocol, in one sentence.
    """

    protocol: str
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(repr=False)
    repeats: int
    reason: str = ""

    def __iter__(self):
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "splits", "repeats", "reason", "description"}`` (what ``detect.json`` records)."""
        if self.protocol == LEE_PROTOCOL:
            what = (
                f"Lee et al. 2018: clean = correctly classified, positives = successful attacks; 5% fit / 5% choice "
                f"/ 90% test, {self.repeats} seeds"
            )
        else:
            what = (
                f"stratified {len(self.parts) // max(self.repeats, 1)}-fold cross-validation over all clean inputs and "
                f"their successful attacks (scikit-learn StratifiedKFold, {self.repeats} repetition(s)); in each, "
                f"{1 - KFOLD_VAL_FRACTION:.0%} of the training folds fit, {KFOLD_VAL_FRACTION:.0%} choose, the held-out fold tests"
            )
        return {
            "name": self.protocol,
            "splits": len(self.parts),
            "repeats": self.repeats,
            "reason": self.reason,
            "description": what,
        }


def _fit_counts(parts: Sequence[tuple[np.ndarray, ...]], attacked: np.ndarray) -> tuple[int, int]:
    """The fewest attacked and the fewest clean inputs any fit part holds."""
    return (min(int(attacked[f].sum()) for f, _v, _t in parts), min(len(f) for f, _v, _t in parts))


def plan_splits(
    correct: int,
    adv_index: np.ndarray,
    *,
    seeds: int = 5,
    supervised: bool = True,
    folds: Sequence[int] = KFOLD,
    hint: str = "",
    hint_params: Sequence[str] = (),
) -> Splits:
    """Lee's 5 / 5 / 90 split when it can hold enough inputs, else stratified K-fold cross-validation.

    Lee's protocol is used when every seed's 5% fit part holds at least :data:`MIN_FIT_PER_CLASS`
    attacked and clean inputs (only asked when ``supervised``: some detector fits a regression) and
    every 90% test part holds an attacked input. Otherwise all the data there are are used by
    :func:`kfold_splits`: K is the first of ``folds`` (at most the number of successful attacks)
    whose fit parts hold enough attacked inputs, and the K folds are repeated ``seeds // K`` times
    (at least once), so that no more regressions are fitted than with Lee's seeds.

    Args:
        correct: clean inputs (the correctly classified ones).
        adv_index: ``(M,)`` the clean input each successful attack was made from.
        seeds: seeds of Lee's split (and the budget of repetitions of the cross-validation).
        supervised: whether a regression has to be fitted on the fit parts.
        folds: the Ks to try, in order.
        hint: what the caller can do about too few attacks (appended to the error).
        hint_params: the parameters that ``hint`` names (the error's :attr:`~nd_plugin.errors.NDError.params`).

    Returns:
        The :class:`Splits`.

    Raises:
        DetectionError: too few successful attacks for any estimate (the message says how many are needed).

    Example:
        >>> plan_splits(2000, np.arange(0, 2000, 2)).protocol  # 1,000 attacks: 5% holds 50
        'lee-5/5/90'
        >>> small = plan_splits(340, np.arange(0, 340, 7))  # 49 attacks: 5% would hold about 2
        >>> small.protocol, len(small), small.repeats
        ('stratified-kfold-3', 3, 1)
        >>> plan_splits(340, np.arange(0, 340, 20)).protocol  # 17 attacks: 3 folds would fit on too few
        'stratified-kfold-5'
    """
    attacked = np.zeros(int(correct), dtype=bool)
    attacked[np.asarray(adv_index, dtype=np.int64)] = True
    n_adv = int(attacked.sum())
    widest = max(folds)
    need = math.ceil(MIN_FIT_PER_CLASS / ((widest - 1) / widest * (1 - KFOLD_VAL_FRACTION))) if supervised else 2
    if n_adv >= 2:
        lee = lee_splits(int(correct), seeds)
        fit_adv, fit_clean = _fit_counts(lee, attacked)
        if all(attacked[t].any() for _f, _v, t in lee) and (not supervised or min(fit_adv, fit_clean) >= MIN_FIT_PER_CLASS):
            return Splits(
                LEE_PROTOCOL, lee, seeds, f"{n_adv} successful attacks on {correct} clean inputs: Lee's 5% fit part holds enough"
            )
        reason = (
            f"Lee's 5% fit part would hold {fit_adv} attacked and {fit_clean} clean inputs (a regression needs "
            f"{MIN_FIT_PER_CLASS} of each): all {correct} clean inputs and {n_adv} successful attacks are cross-validated"
        )
        if not supervised:
            reason = (
                f"a 90% test part of Lee's would hold no attacked input: all {correct} clean inputs and {n_adv} "
                "successful attacks are cross-validated"
            )
        for k in dict.fromkeys(min(int(f), n_adv) for f in folds):
            if k < 2:
                continue
            repeats = max(1, seeds // k)
            parts = kfold_splits(attacked, k, repeats)
            if not supervised or min(_fit_counts(parts, attacked)) >= MIN_FIT_PER_CLASS:
                return Splits(f"stratified-kfold-{k}", parts, repeats, reason)
    what = (
        f"the supervised detectors' regression needs at least {MIN_FIT_PER_CLASS} attacked inputs in the fit part of a "
        f"{widest}-fold cross-validation, so at least {need} successful attacks"
        if supervised
        else "measuring a detector needs at least 2 successful attacks"
    )
    raise DetectionError(
        f"only {n_adv} of the {correct} correctly classified inputs were attacked successfully; {what}"
        + (f": {hint}" if hint else "."),
        params=hint_params,
    )


def _part(clean: np.ndarray, adv: np.ndarray, adv_index: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels (0 clean, 1 attacked) of the clean inputs ``idx`` and of their attacks."""
    a = adv[np.isin(adv_index, idx)]
    return np.concatenate([clean[idx], a]), np.r_[np.zeros(len(idx)), np.ones(len(a))]


def _summary(aurocs: list[float], tprs: list[float], **extra: Any) -> dict[str, Any]:
    return {
        "auroc": round(float(np.mean(aurocs)), 4),
        "auroc_std": round(float(np.std(aurocs)), 4),
        "tpr_at_5fpr": round(float(np.mean(tprs)), 4),
        "tpr_at_5fpr_std": round(float(np.std(tprs)), 4),
        "seeds": len(aurocs),
        **extra,
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
                    f"correctly classified inputs ({int(np.ceil(MIN_FIT_PER_CLASS / FIT_FRACTION))} successful attacks), e.g. raise n.",
                    params=("n",),
                )
            reg = _regression(xf, yf, seed)
            xv, yv = _part(clean, adv, adv_index, val)
            pv = reg.predict_proba(xv)[:, 1]
            auc = auroc(pv[yv == 0], pv[yv == 1])
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
