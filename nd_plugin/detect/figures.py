"""Figures of ``nd detect`` (ROC curves, per-layer path divergence, class paths) and its report section.

The one module of :mod:`nd_plugin.detect` that draws; the package does not import it, and it
imports matplotlib only inside its functions. It selects no matplotlib backend: the CLI and the
report run headless through matplotlib's default selection (``MPLBACKEND`` is respected).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nd_plugin.detect.baselines import MahalanobisDetector, msp_score
from nd_plugin.detect.detectors import PathDetector, PathScore
from nd_plugin.detect.features import Probe
from nd_plugin.utilities import auroc

__all__ = ["detection_figures"]


def detection_figures(
    out_dir: Path,
    detector: PathDetector,
    maha: MahalanobisDetector,
    clean: Probe,
    adv: Probe,
    cs: PathScore,
    as_: PathScore,
    attack: str,
    eps: float,
) -> list[str]:
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
        ax.plot(f, t, label=f"{label} (AUROC {auroc(c, a):.3f})")
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
    ax2.plot(xs, [auroc(cs.per_layer[:, l], as_.per_layer[:, l]) for l in range(L)], "s--", color="k", ms=3, label="layer AUROC")
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


def detection_section_html(results: Sequence[Mapping[str, Any]]) -> str:
    """An HTML section with the tables of ``nd detect`` results (``detect.json`` records), or ``""``.

    One table per attack: each detector's AUROC (mean ± std over the 5 / 5 / 90 splits) and TPR at
    5% FPR, and the transfer rows when the record has them. A run's records:
    ``open_run(RUN).detections()``.

    Example:
        >>> detection_section_html([])
        ''
        >>> m = {"auroc": 0.9, "auroc_std": 0.01, "tpr_at_5fpr": 0.5}
        >>> page = detection_section_html([{"attack": "fgsm", "eps": 0.03, "successful": 5, "correct": 9, "detectors": {"path": m}}])
        >>> "<td>path</td><td>0.900 ± 0.010</td><td>0.500</td>" in page
        True
    """
    import html

    parts = []
    for d in results:
        try:
            blocks = [("", d["detectors"])] + (
                [(f" (fitted on {d['transfer']['fitted_on']})", d["transfer"]["detectors"])] if d.get("transfer") else []
            )
            rec = d.get("recommended")
            rows = "".join(
                f"<tr><td>{html.escape(name)}{html.escape(suffix)}{' (recommended)' if name == rec and not suffix else ''}</td>"
                f"<td>{m['auroc']:.3f} ± {m.get('auroc_std', 0.0):.3f}</td><td>{m['tpr_at_5fpr']:.3f}</td></tr>"
                for suffix, dets in blocks
                for name, m in dets.items()
            )
            head = (
                f"{d['attack'].upper()} ε={d['eps']:.4g}: {d['successful']} of {d['correct']} correctly classified inputs attacked successfully"
                f"; protocol {d.get('protocol', 'lee-5/5/90')}" + (f"; recommended detector: {rec}" if rec else "")
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # an old or partial detect.json: not shown
        parts.append(
            f"<h3>{html.escape(head)}</h3><table><tr><th>detector</th><th>AUROC</th><th>TPR at 5% FPR</th></tr>{rows}</table>"
        )
    if not parts:
        return ""
    return (
        '<section id="detection"><h2>Adversarial detection (nd detect)</h2><p>Lee et al.\'s protocol: clean = correctly '
        "classified, positives = successful attacks; supervised detectors fitted on 5%, tuned on 5%, tested on 90% "
        "(lee-5/5/90), or, when the 5% part holds too few attacks, a stratified k-fold cross-validation over all of them "
        "(stratified-kfold-K). The recommended detector, combined, reads every one-pass detector's evidence.</p>"
        + "".join(parts)
        + "</section>"
    )
