"""Benchmark: adversarial-sample detection on a decoupled CIFAR ResNet-20 (issue 6, seed §C).

Prints and writes (``--json``) a table of AUROC / TPR at 5% FPR for FGSM and PGD-10 at the same
eps: the path detector (default score and every variant), Mahalanobis on penultimate features,
max-softmax, and -- clearly labelled as *supervised* -- a logistic regression on the per-layer path
scores trained on attacked inputs (5-fold cross-validated; a reference for what the paths hold, not
the detector the product ships).

Train the run first, e.g.::

    tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10
    nd decouple cifar:resnet20 --data imagefolder:/tmp/cifar10 \\
        --weights ../shared/weights/resnet20-12fca82f.th --epochs 2 --out /tmp/runs/r20
    python benchmarks/detect.py /tmp/runs/r20 --n 2000 --fit-n 10000 --json detect_bench.json

One forward pass of each clean and attacked input serves every detector (``collect_probe``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from nd_plugin.detect import (
    MahalanobisDetector,
    PathDetector,
    _subset_loader,
    attack_and_probe,
    collect_probe,
    detection_metrics,
    find_feature_layer,
    msp_score,
)
from nd_plugin.run import open_run


def _m(clean: np.ndarray, adv: np.ndarray) -> dict[str, float]:
    r = detection_metrics(clean, adv)
    return {"auroc": round(r["auroc"], 4), "tpr_at_5fpr": round(r["tpr_at_fpr"], 4)}


def supervised_reference(det: PathDetector, clean, adv, method: str, seed: int = 0) -> dict[str, float]:
    """5-fold CV logistic regression on per-layer standardised scores (+ MSP): trains on attacks."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    x = np.r_[det.score_probe(clean, method=method).per_layer, det.score_probe(adv, method=method).per_layer]
    y = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
    p = cross_val_predict(LogisticRegression(max_iter=1000), x, y, cv=5, method="predict_proba")[:, 1]
    return _m(p[y == 0], p[y == 1])


def gate_input_diagnostic(fit, clean, adv) -> dict:
    """Not a path score: Mahalanobis on what the gates *read* (pooled inputs of the gated layers).

    Tells whether the attack is visible in the features the ACM sees, so that a weak path score
    means the gate (its C/4 bottleneck, its short training) projects it away.
    """
    from nd_plugin.detect import _whitener

    out: dict = {"per_layer": []}
    y, k = fit.labels, fit.logits.shape[1]
    tot = {"clean": 0.0, "adv": 0.0}
    cached = {}
    for l in range(len(fit.gate_inputs)):
        f = fit.gate_inputs[l].astype(np.float64)
        mu = np.stack([f[y == c].mean(0) for c in range(k)])
        scale, w = _whitener(f, f - mu[y], 1e-6)
        hold = ((f - mu[y]) / scale) @ w
        ref = (hold**2).sum(1)
        for tag, p in (("clean", clean), ("adv", adv)):
            d = ((p.gate_inputs[l].astype(np.float64) - mu[p.preds]) / scale) @ w
            cached[tag] = ((d**2).sum(1) - ref.mean()) / ref.std()
            tot[tag] = tot[tag] + cached[tag]
        out["per_layer"].append(_m(cached["clean"], cached["adv"])["auroc"])
    out["sum_of_layers"] = _m(tot["clean"], tot["adv"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", default=None, help="data spec (default: the run's)")
    ap.add_argument("--eps", type=float, default=8 / 255)
    ap.add_argument("--attacks", default="fgsm,pgd")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--n", type=int, default=2000, help="clean test inputs drawn")
    ap.add_argument("--fit-n", type=int, default=10000, help="training inputs the detectors are fitted on")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dump", type=Path, default=None, help="folder for the probes (npz) for offline analysis")
    args = ap.parse_args()

    t0 = time.perf_counter()
    run = open_run(args.run)
    cfg = run.config
    dm = run.build_model(args.device)
    bundle = run.data(args.data, train_augment=False)
    mean, std = cfg.get("mean") or list(bundle.mean), cfg.get("std") or list(bundle.std)
    fit_loader = _subset_loader(bundle.train, args.fit_n, args.batch_size, args.seed)
    layer = find_feature_layer(dm.model, next(iter(fit_loader))[0][:2].to(args.device))
    fit = collect_probe(dm, fit_loader, feature_layer=layer, device=args.device, gate_inputs=True)
    det = PathDetector().fit_probe(fit, dm.site_names)
    maha = MahalanobisDetector().fit_probe(fit, layer)
    density = float(np.mean([g.mean() for g in fit.gates]))
    acc_fit = float((fit.preds == fit.labels).mean())
    print(f"fitted on {len(fit)} training inputs in {time.perf_counter() - t0:.0f} s; gate density {density:.3f}, "
          f"train accuracy {acc_fit:.4f}; gated layers {len(dm.site_names)}", flush=True)
    report: dict = {"run": str(args.run), "config": {k: cfg.get(k) for k in ("model", "data", "sites")},
                    "fit_n": len(fit), "density": round(density, 4), "eps": args.eps, "attacks": {}}
    def dump(tag: str, probes: dict) -> None:
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            arrays = {"site_names": np.array(dm.site_names)}
            for key, p in probes.items():
                arrays[f"{key}_logits"], arrays[f"{key}_labels"], arrays[f"{key}_feat"] = p.logits, p.labels, p.features
                arrays.update({f"{key}_z{l}": z for l, z in enumerate(p.z)})
            np.savez_compressed(args.dump / f"probe_{tag}.npz", **arrays)

    dump("fit", {"fit": fit})
    for name in args.attacks.split(","):
        t1 = time.perf_counter()
        loader = _subset_loader(bundle.val, args.n, args.batch_size, args.seed)
        clean, adv, drawn, correct = attack_and_probe(
            dm, loader, name, args.eps, mean=mean, std=std, steps=args.steps, feature_layer=layer,
            seed=args.seed, device=args.device, gate_inputs=True,
        )
        res = {
            "drawn": drawn, "correct": correct, "successful": len(adv),
            "success_rate": round(len(adv) / correct, 4), "clean_accuracy": round(correct / drawn, 4),
            "path": _m(det.score_probe(clean).overall, det.score_probe(adv).overall),
            "mahalanobis": _m(maha.score_probe(clean), maha.score_probe(adv)),
            "max_softmax": _m(msp_score(clean.logits), msp_score(adv.logits)),
            "variants": {
                (m if m == "joint" else f"{m}/{c}"): _m(det.score_probe(clean, method=m, combine=c).overall,
                                                        det.score_probe(adv, method=m, combine=c).overall)
                for m in PathDetector.METHODS for c in (PathDetector.COMBINES if m != "joint" else ("mean",))
            },
            "diagnostic_gate_inputs": gate_input_diagnostic(fit, clean, adv),
            "supervised_reference": {m: supervised_reference(det, clean, adv, m) for m in ("gauss", "bernoulli")},
            "per_layer_auroc_gauss": [
                round(detection_metrics(det.score_probe(clean, method="gauss").per_layer[:, l],
                                        det.score_probe(adv, method="gauss").per_layer[:, l])["auroc"], 4)
                for l in range(len(dm.site_names))
            ],
            "seconds": round(time.perf_counter() - t1, 1),
        }
        report["attacks"][name] = res
        print(json.dumps({name: {k: v for k, v in res.items() if k != "variants"}}), flush=True)
        print("  variants:", json.dumps(res["variants"]), flush=True)
        if name == "fgsm":
            dump(name, {"clean": clean, "adv": adv})
    print(f"\n{'attack':<8} {'success':>8} {'path':>14} {'Mahalanobis':>14} {'max-softmax':>14}   (AUROC / TPR@5%FPR)")
    for name, r in report["attacks"].items():
        cells = [f"{r[k]['auroc']:.3f} / {r[k]['tpr_at_5fpr']:.3f}" for k in ("path", "mahalanobis", "max_softmax")]
        print(f"{name:<8} {r['success_rate']:>8.2%} " + " ".join(f"{c:>14}" for c in cells))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
