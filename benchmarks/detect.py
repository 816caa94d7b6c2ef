"""Benchmark: adversarial detection on a decoupled CIFAR ResNet-20 on Lee et al.'s protocol (issue 16).

One fit of every detector on the training split (timed), one draw of clean test inputs, then for
each attack (FGSM at 8/255 and at 0.05, PGD-10 at 8/255 by default): attack the correctly
classified inputs, keep the successful attacks, and measure every detector of
``nd_plugin.detect.list_detectors()`` on Lee's 5 / 5 / 90 split over ``--seeds`` seeds (AUROC mean ± std,
TPR at 5% FPR). Transfer rows fit the supervised detectors on one attack and test them on another.
Every path score of ``PathDetector`` is also listed (``path_variants``, AUROC on all inputs).

Train the run first, e.g.::

    nd decouple cifar:resnet20 --data imagefolder:/tmp/cifar10 \\
        --weights ../shared/weights/resnet20-12fca82f.th --epochs 3 --out /tmp/runs/r20_new
    flock /tmp/cpu.lock python benchmarks/detect.py /tmp/runs/r20_new --n 2000 --json detect_r20_new.json

Clean features are computed once and shared by the attacks (the same clean inputs are attacked).
"""

from __future__ import annotations

import argparse
import json
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from nd_plugin.detect import (
    FittedDetectors,
    detector_features,
    evaluate,
    fit_detectors,
    list_detectors,
    resolve_detectors,
)
from nd_plugin.detect.protocol import attack_set
from nd_plugin.detect.workflow import mi_weights_of, path_variants
from nd_plugin.run import open_run
from nd_plugin.utilities import subset_loader


def parse_attack(spec: str) -> tuple[str, float]:
    """``"pgd:8/255"`` -> ``("pgd", 0.0313...)``."""
    name, _, eps = spec.partition(":")
    return name.strip(), float(Fraction(eps.strip())) if eps else 8 / 255


def label(name: str, eps: float) -> str:
    e = eps * 255
    return f"{name.upper()} {round(e):d}/255" if abs(e - round(e)) < 1e-6 else f"{name.upper()} {eps:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", default=None, help="data spec (default: the run's)")
    ap.add_argument("--attacks", default="fgsm:8/255,fgsm:0.05,pgd:8/255", help="NAME:EPS, comma-separated")
    ap.add_argument("--transfer", default="fgsm:0.05>pgd:8/255,fgsm:8/255>pgd:8/255", help="FIT>TEST pairs of --attacks")
    ap.add_argument("--detectors", default=",".join(list_detectors()))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--n", type=int, default=2000, help="clean test inputs drawn")
    ap.add_argument("--fit-n", type=int, default=None, help="training inputs to fit on (default: all)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument(
        "--path-magnitudes",
        default="0",
        help="preprocessing magnitudes of path_supervised (pixel units), e.g. 0,0.001,0.002,0.005",
    )
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--dump", type=Path, default=None, help="write the fitted detectors and the probes (npz) for offline analysis"
    )
    ap.add_argument("--fit-only", action="store_true", help="stop after fitting (to time it)")
    ap.add_argument(
        "--fitted", type=Path, default=None, help="load the fitted detectors from this folder (a --dump) instead of fitting"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path_mags = tuple(float(m) for m in args.path_magnitudes.split(","))
    dets = resolve_detectors(args.detectors.split(","), {"path_supervised": {"magnitudes": path_mags}})
    attacks = [parse_attack(a) for a in args.attacks.split(",")]

    t0 = time.perf_counter()
    run = open_run(args.run)
    cfg = run.config
    dm = run.build_model(args.device)
    bundle = run.data(args.data, train_augment=False)
    mean, std = cfg.get("mean") or list(bundle.mean), cfg.get("std") or list(bundle.std)
    if args.fitted:
        fitted = FittedDetectors.load(args.fitted, dm)
    else:
        fit_loader = subset_loader(bundle.train, args.fit_n, args.batch_size, args.seed)
        fitted = fit_detectors(dm, fit_loader, mi_weights=mi_weights_of(run.load_checkpoint("cpu")), device=args.device)
    density = float(np.mean([s.mean() for s in (fitted.path.arrays[f"freq_{l}"] for l in range(fitted.path.num_layers))]))
    print(
        f"fitted on {fitted.meta['fit_n']} training inputs in {fitted.meta['fit_seconds']} s "
        f"(load {time.perf_counter() - t0:.0f} s in all); mean gate on-frequency {density:.3f}",
        flush=True,
    )
    report: dict = {
        "run": str(args.run),
        "config": {k: cfg.get(k) for k in ("model", "data", "sites")},
        "summary": run.summary(),
        "fit_n": int(fitted.meta["fit_n"]),
        "fit_seconds": float(fitted.meta["fit_seconds"]),
        "n": args.n,
        "seeds": args.seeds,
        "threads": args.threads,
        "attacks": {},
        "transfer": {},
    }
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        fitted.save(args.dump)
    if args.fit_only:
        return
    sets, feats, clean_f = {}, {}, None
    feat_kw = {"std": std, "detectors": dets, "batch_size": args.batch_size}
    for name, eps in attacks:
        t1 = time.perf_counter()
        loader = subset_loader(bundle.val, args.n, args.batch_size, args.seed)
        aset = attack_set(
            dm,
            loader,
            name,
            eps,
            mean=mean,
            std=std,
            steps=args.steps,
            feature_layer=fitted.penultimate.feature_layer,
            stages=fitted.lee.layers,
            seed=args.seed,
            device=args.device,
        )
        t_attack = time.perf_counter() - t1
        if clean_f is None:
            clean_f = detector_features(fitted, dm, aset.x_clean, aset.clean, **feat_kw)
        adv_f = detector_features(fitted, dm, aset.x_adv, aset.adv, **feat_kw)
        t_feat = time.perf_counter() - t1 - t_attack
        res = evaluate(clean_f, adv_f, aset, detectors=dets, seeds=args.seeds)
        key = label(name, eps)
        sets[key], feats[key] = aset, adv_f
        report["attacks"][key] = {
            "attack": name,
            "eps": eps,
            "drawn": aset.drawn,
            "correct": aset.correct,
            "successful": aset.successful,
            "success_rate": round(aset.successful / aset.correct, 4),
            "detectors": res,
            "path_variants": path_variants(fitted, aset.clean, aset.adv),
            "seconds": {
                "attack": round(t_attack, 1),
                "features": round(t_feat, 1),
                "evaluate": round(time.perf_counter() - t1 - t_attack - t_feat, 1),
            },
        }
        print(json.dumps({key: {k: v for k, v in report["attacks"][key].items() if k != "path_variants"}}), flush=True)
        if args.dump:
            arrays = {
                "adv_index": aset.adv_index,
                "clean_labels": aset.clean.labels,
                "adv_preds": aset.adv.preds,
                **{f"clean_z{l}": z for l, z in enumerate(aset.clean.z)},
                **{f"adv_z{l}": z for l, z in enumerate(aset.adv.z)},
                "clean_logits": aset.clean.logits,
                "adv_logits": aset.adv.logits,
            }
            np.savez_compressed(args.dump / f"{name}_{eps:.4f}.npz", **arrays)
    for pair in filter(None, args.transfer.split(",")):
        src, dst = (label(*parse_attack(p)) for p in pair.split(">"))
        if src in sets and dst in sets:
            res = evaluate(clean_f, feats[src], sets[src], detectors=dets, seeds=args.seeds, transfer=(feats[dst], sets[dst]))
            report["transfer"][f"{src} -> {dst}"] = res
            print(json.dumps({f"{src} -> {dst}": res}), flush=True)
    cols = [d.name for d in dets]
    print("\n| attack | success | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for key, r in report["attacks"].items():
        cells = [
            f"{r['detectors'][c]['auroc']:.3f} ± {r['detectors'][c]['auroc_std']:.3f} / {r['detectors'][c]['tpr_at_5fpr']:.3f}"
            for c in cols
        ]
        print(f"| {key} | {r['success_rate']:.1%} | " + " | ".join(cells) + " |")
    for key, r in report["transfer"].items():
        cells = [f"{r[c]['auroc']:.3f} ± {r[c]['auroc_std']:.3f} / {r[c]['tpr_at_5fpr']:.3f}" if c in r else "–" for c in cols]
        print(f"| {key} (transfer) | | " + " | ".join(cells) + " |")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"total {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
