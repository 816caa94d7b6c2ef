"""Detection metrics: AUROC and TPR at a fixed FPR (scores: higher = more likely adversarial)."""

from __future__ import annotations

import numpy as np

from nd_plugin.errors import DetectionError

__all__ = ["detection_metrics"]


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
