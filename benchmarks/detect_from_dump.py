"""Re-evaluates the path detectors from a ``benchmarks/detect.py --dump`` folder, without attacking again.

The dump holds the fitted path detector (``detector.npz``) and, per attack, the forward passes of
the clean inputs and of their successful attacks (soft paths and logits). The detectors that read
only those (``nd_plugin.detect.list_detectors(reads=())``) are evaluated on the same Lee et al.
protocol as ``detect.py`` (``evaluate``: 5 / 5 / 90 splits, the same seeds), so the numbers are
those ``detect.py`` would print for them on the same run, data and draws.

Usage::

    python benchmarks/detect_from_dump.py /tmp/det_dev/r20_full_dump --seeds 5 \\
        --detectors path,path_supervised,path_supervised_raw,path_supervised_full \\
        --transfer fgsm:0.05>pgd:0.0314 --json detect_from_dump.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _suite import git_state
from nd_plugin.detect import PathDetector, Probe, list_detectors, resolve_detectors
from nd_plugin.detect.protocol import AttackedSet, FittedDetectors, detector_features, evaluate


def _probe(arrays: dict[str, np.ndarray], tag: str, layers: int) -> Probe:
    z = [arrays[f"{tag}_z{l}"] for l in range(layers)]
    labels = arrays["clean_labels"] if tag == "clean" else -np.ones(len(arrays[f"{tag}_logits"]), int)
    return Probe(arrays[f"{tag}_logits"], labels, [v > 0 for v in z], z)


def load_set(file: Path, layers: int) -> AttackedSet:
    """An :class:`AttackedSet` from one dumped attack (no inputs: only path-only detectors can read it)."""
    name, eps = file.stem.rsplit("_", 1)
    arrays = dict(np.load(file))
    clean, adv = _probe(arrays, "clean", layers), _probe(arrays, "adv", layers)
    empty = torch.empty(0)
    return AttackedSet(name, float(eps), 0, len(clean), len(clean), clean, adv, arrays["adv_index"], empty, empty)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dump", type=Path)
    path_only = list_detectors(reads=())  # what a dump's paths and logits feed
    ap.add_argument("--detectors", default=",".join(path_only))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--transfer", default="", help="FIT>TEST pairs of dumped attacks, e.g. fgsm:0.05>pgd:0.0314")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    names = [d.name for d in resolve_detectors(args.detectors.split(","))]
    if not set(names) <= set(path_only):
        ap.error(f"only the path-only detectors can be evaluated from a dump: {', '.join(path_only)}")
    t0 = time.perf_counter()
    det = PathDetector.load(args.dump / "detector.npz")
    fitted = FittedDetectors(path=det, penultimate=None, lee=None, meta={})
    report: dict = {"command": " ".join(["python", *sys.argv]), **git_state(), "dump": str(args.dump), "seeds": args.seeds,
                    "attacks": {}, "transfer": {}}  # fmt: skip
    sets, feats, clean_f = {}, {}, None
    for file in sorted(args.dump.glob("*_[0-9].*.npz")):
        aset = load_set(file, det.num_layers)
        key = f"{aset.attack}:{aset.eps:g}"
        if clean_f is None:
            clean_f = detector_features(fitted, None, None, aset.clean, std=(), detectors=names)
        adv_f = detector_features(fitted, None, None, aset.adv, std=(), detectors=names)
        sets[key], feats[key] = aset, adv_f
        res = evaluate(clean_f, adv_f, aset, seeds=args.seeds)
        report["attacks"][key] = {"correct": aset.correct, "successful": aset.successful, "detectors": res}
        print(key, json.dumps({n: (r["auroc"], r["auroc_std"], r["tpr_at_5fpr"]) for n, r in res.items()}), flush=True)
    for pair in filter(None, args.transfer.split(",")):
        src, dst = (f"{p.split(':')[0]}:{float(p.split(':')[1]):g}" for p in pair.split(">"))
        res = evaluate(clean_f, feats[src], sets[src], seeds=args.seeds, transfer=(feats[dst], sets[dst]))
        report["transfer"][f"{src} -> {dst}"] = res
        print(f"{src} -> {dst}", json.dumps({n: (r["auroc"], r["auroc_std"]) for n, r in res.items()}), flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
