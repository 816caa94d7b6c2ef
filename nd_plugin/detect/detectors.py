"""The path detector: how unlike the clean calculation paths of its predicted class an input's path is."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nd_plugin.detect.features import Probe, _ProbeHooks, collect_probe
from nd_plugin.errors import ConfigError, DetectionError, RunDirError
from nd_plugin.files import atomic_savez
from nd_plugin.utilities import auroc, eval_mode

__all__ = ["PathDetector", "PathScore"]


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
      paths to predict the class (a path that does not look like its predicted class);
    - ``"mi"``: ``−log q_l(c | α)`` of the decoupling's own ``L_mi`` classifiers (passed to
      :meth:`fit_probe` as ``mi_weights``), the posterior the training made the path carry.

    Overall-only scores (their per-layer scores are those of ``"gauss"``; ``combine`` does not apply):

    - ``"joint_min"``: the joint distance to the *closest* class mean, not the predicted class's;
    - ``"joint_margin"``: joint distance to the predicted class minus that to the closest class
      (how much closer the path is to another class than to its prediction);
    - ``"disagree"``: symmetric KL divergence between the class posteriors of the bottom half and
      of the top half of the gated layers (``pathclf`` posteriors, summed in log space), the seed's
      observation that attacked paths start in one class and end in another.

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
        classifier_samples: fit inputs (a seeded subsample) the per-layer ``"pathclf"``
            classifiers are trained on (the multinomial fits dominate the cost of fitting 50,000
            inputs otherwise).
        holdout: fraction of the fit inputs used only for standardisation and weights.
        seed: seed of the held-out split and the kNN subsample.

    Example:
        >>> import nd_plugin
        >>> from nd_plugin.adapters.cifar import CifarResNet
        >>> dm = nd_plugin.wrap(CifarResNet(8, num_classes=3).eval(), torch.randn(1, 3, 16, 16)).eval()
        >>> x, y = torch.randn(90, 3, 16, 16), torch.arange(90) % 3
        >>> det = PathDetector(knn_per_class=8, k=2).fit(dm, [(x, y)])
        >>> s = det.score(x[:4])
        >>> s.overall.shape, s.per_layer.shape, det.path_features(collect_probe(dm, x[:4])).shape
        ((4,), (4, 3), (4, 18))
    """

    METHODS = ("joint", "gauss", "bernoulli", "hamming", "knn", "pathclf", "mi", "joint_min", "joint_margin", "disagree")
    OVERALL_ONLY = ("joint", "joint_min", "joint_margin", "disagree")
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
        classifier_samples: int = 10000,
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
        self.holdout, self.seed, self.classifier_samples = float(holdout), int(seed), int(classifier_samples)
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

    def fit_probe(
        self, probe: Probe, site_names: Sequence[str], *, mi_weights: Sequence[np.ndarray] | None = None
    ) -> PathDetector:
        """Fits from a :class:`Probe` of clean inputs with known labels (see :meth:`fit`).

        Args:
            probe: clean inputs with their true labels.
            site_names: the gated layers, in the probe's order.
            mi_weights: per gated layer, the ``(K, C_l)`` weight of the decoupling's ``L_mi``
                classifier (``DecouplingLoss.classifiers``, saved in the run's checkpoint); enables
                ``"mi"`` and the ``L_mi`` posteriors in :meth:`path_features`.
        """
        labels = probe.labels
        if (labels < 0).any():
            raise DetectionError("fitting a path detector needs the true labels of the clean inputs.")
        n, k = len(probe), probe.logits.shape[1]
        if n < 4:
            raise DetectionError(f"fitting a path detector needs at least 4 clean inputs, got {n}.")
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(n)
        n_hold = min(max(1, round(self.holdout * n)), n - 2)
        hold, train = order[:n_hold], order[n_hold:]
        self.site_names = list(site_names)
        a: dict[str, np.ndarray] = {"num_classes": np.array(k)}
        if mi_weights is not None:
            if len(mi_weights) != len(self.site_names):
                raise DetectionError(f"{len(mi_weights)} L_mi classifiers for {len(self.site_names)} gated layers.")
            a.update({f"mi_w_{l}": np.asarray(w, dtype=np.float64) for l, w in enumerate(mi_weights)})
        y = labels[train]
        counts_n = np.bincount(y, minlength=k).astype(np.float64)
        clf_rows = np.sort(np.random.default_rng(self.seed + 1).permutation(len(train))[: self.classifier_samples])
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
            a[f"clf_w_{l}"], a[f"clf_b_{l}"] = self._fit_classifier(white[clf_rows], y[clf_rows], k)
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
        for m in self.OVERALL_ONLY:
            raw = self._overall(hp, m, hp.preds)
            a[f"cal_{m}"] = np.array([raw.mean(), max(raw.std(), 1e-12)])
        for m in self.METHODS:
            if m in self.OVERALL_ONLY or (m == "mi" and "mi_w_0" not in a):
                continue
            raw = self._raw(hp, m, hp.preds)
            mean, std = raw.mean(0), raw.std(0)
            a[f"cal_mean_{m}"], a[f"cal_std_{m}"] = mean, np.where(std > 1e-12, std, 1.0)
            true_s, wrong_s = self._raw(hp, m, hp.labels), self._raw(hp, m, wrong)
            a[f"weight_{m}"] = np.array(
                [max(auroc(true_s[:, l], wrong_s[:, l]) - 0.5, 0.0) for l in range(self.num_layers)]
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

    def _joint_all(self, probe: Probe) -> np.ndarray:
        """``(N, K)`` Mahalanobis distance of the whole soft path to every class mean."""
        a = self.arrays
        z = np.concatenate(probe.z, axis=1).astype(np.float64)
        wz, wm = (z / a["joint_scale"]) @ a["joint_white"], (a["joint_mu"] / a["joint_scale"]) @ a["joint_white"]
        return ((wz**2).sum(1)[:, None] - 2 * wz @ wm.T + (wm**2).sum(1)[None]) / z.shape[1]

    def _overall(self, probe: Probe, method: str, cls: np.ndarray) -> np.ndarray:
        """``(N,)`` raw score of an overall-only method under classes ``cls``."""
        if method == "disagree":
            half = max(self.num_layers // 2, 1)
            logp = [self._log_posterior(probe, l, "pathclf") for l in range(self.num_layers)]
            bottom, top = (_log_softmax(np.sum(logp[i], axis=0)) for i in (slice(0, half), slice(half, None)))
            if self.num_layers < 2:
                top = bottom
            return ((np.exp(bottom) - np.exp(top)) * (bottom - top)).sum(1)
        d = self._joint_all(probe)
        at = d[np.arange(len(cls)), cls]
        return {"joint": at, "joint_min": d.min(1), "joint_margin": at - d.min(1)}[method]

    def _log_posterior(self, probe: Probe, l: int, source: str) -> np.ndarray:
        """``(N, K)`` log class posteriors of layer ``l``'s path: ``"pathclf"`` (fitted) or ``"mi"`` (L_mi)."""
        a = self.arrays
        if source == "mi":
            if f"mi_w_{l}" not in a:
                raise DetectionError("this PathDetector was fitted without the L_mi classifiers (mi_weights=...).")
            return _log_softmax(probe.gates[l].astype(np.float64) @ a[f"mi_w_{l}"].T)
        white = (probe.z[l].astype(np.float64) / a[f"scale_{l}"]) @ a[f"white_{l}"]
        return _log_softmax(white @ a[f"clf_w_{l}"].T + a[f"clf_b_{l}"])

    def _layer_distances(self, probe: Probe, l: int) -> np.ndarray:
        """``(N, K)`` per-width Mahalanobis distance of layer ``l``'s soft path to every class mean."""
        a = self.arrays
        z = probe.z[l].astype(np.float64)
        wz, wm = (z / a[f"scale_{l}"]) @ a[f"white_{l}"], (a[f"mu_{l}"] / a[f"scale_{l}"]) @ a[f"white_{l}"]
        return ((wz**2).sum(1)[:, None] - 2 * wz @ wm.T + (wm**2).sum(1)[None]) / z.shape[1]

    def path_features(self, probe: Probe, *, posterior: str | None = None) -> np.ndarray:
        """``(N, L·2K)`` features of a supervised path detector: per gated layer, the distance of its
        soft path to every class mean and its log class posteriors (the ``L_mi`` classifiers' when
        the detector holds them, else the fitted ``pathclf`` ones; ``posterior`` chooses)."""
        self._check_fitted()
        source = posterior or ("mi" if "mi_w_0" in self.arrays else "pathclf")
        parts = []
        for l in range(self.num_layers):
            parts += [self._layer_distances(probe, l), self._log_posterior(probe, l, source)]
        return np.concatenate(parts, axis=1)

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
            elif method in ("pathclf", "mi"):
                out[:, l] = -self._log_posterior(probe, l, method)[np.arange(len(cls)), cls]
            else:  # knn
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
        layer_method = "gauss" if method in self.OVERALL_ONLY else method
        if f"cal_mean_{layer_method}" not in a:
            raise DetectionError("this PathDetector was fitted without the L_mi classifiers (mi_weights=...).")
        per_layer = (self._raw(probe, layer_method, preds) - a[f"cal_mean_{layer_method}"]) / a[f"cal_std_{layer_method}"]
        if method in self.OVERALL_ONLY:
            overall = (self._overall(probe, method, preds) - a[f"cal_{method}"][0]) / a[f"cal_{method}"][1]
        elif combine == "mean":
            overall = per_layer.mean(1)
        elif combine == "max":
            overall = per_layer.max(1)
        else:
            w = a[f"weight_{method}"]
            w = w / w.sum() if w.sum() > 0 else np.full_like(w, 1.0 / w.size)
            overall = per_layer @ w
        return PathScore(overall, per_layer, preds, probe.logits)

    def preprocess(
        self, x: torch.Tensor, magnitudes: Sequence[float], *, std: Sequence[float], batch_size: int = 200
    ) -> dict[float, Probe]:
        """Lee et al.'s input preprocessing through the path score: probes of ``x − ε·sign(∇ₓ d(x)) / std``.

        ``d`` is the joint Mahalanobis distance of the soft path to its closest class mean (the
        gradient flows through the gate logits ``z``); ``ε`` is in pixel units. Costs one forward and
        backward pass per input plus one forward pass per non-zero magnitude.

        Args:
            x: normalised inputs.
            magnitudes: preprocessing magnitudes (0 = the inputs as they are).
            std: the data normalisation's per-channel std.
            batch_size: inputs per pass.

        Returns:
            ``{magnitude: Probe}`` of the moved inputs (with the true labels unknown, ``-1``).
        """
        self._check_fitted()
        if self.model is None:
            raise DetectionError("this PathDetector has no model: call detector.attach(dm) after loading it.")
        dm, a = self.model, self.arrays
        device = next(dm.parameters()).device
        t = {k: torch.as_tensor(a[k], dtype=torch.float32, device=device) for k in ("joint_mu", "joint_scale", "joint_white")}
        wm = (t["joint_mu"] / t["joint_scale"]) @ t["joint_white"]
        inv_std = 1.0 / torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        moved: dict[float, list[torch.Tensor]] = {float(m): [] for m in magnitudes}
        with eval_mode(dm):
            for i in range(0, x.shape[0], batch_size):
                xb = x[i : i + batch_size].to(device).clone().requires_grad_(True)
                with _ProbeHooks(dm.sites(), None, keep_grad=True) as hooks:
                    dm(xb)
                    z = torch.cat([zz.flatten(1) for zz in hooks.z], 1)
                wz = (z / t["joint_scale"]) @ t["joint_white"]
                d = ((wz[:, None, :] - wm[None]) ** 2).sum(-1).min(1).values
                (grad,) = torch.autograd.grad(d.sum(), xb)
                step = grad.sign() * inv_std
                for m, parts in moved.items():
                    parts.append((xb.detach() - m * step).cpu())
        return {m: collect_probe(dm, torch.cat(parts), batch_size=batch_size) for m, parts in moved.items()}

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
            "classifier_samples": self.classifier_samples,
            "site_names": self.site_names, "meta": meta, "format": 1,
        }
        atomic_savez(path, header=np.array(json.dumps(header)), **self.arrays)

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
            classifier_samples=header.get("classifier_samples", 10000),
        )
        det.site_names, det.arrays, det.meta = list(header["site_names"]), arrays, dict(header.get("meta", {}))
        if dm is not None:
            det.attach(dm)
        return det


def _log_softmax(logit: np.ndarray) -> np.ndarray:
    logit = logit - logit.max(1, keepdims=True)
    return logit - np.log(np.exp(logit).sum(1, keepdims=True))
