"""End-to-end time of `nd analyze` on 10,000 CIFAR-10 validation images with a CIFAR ResNet-56.

Builds a run directory (config + checkpoint) from the public ResNet-56 weights wrapped with gates
(``--sites all``, as in the paper). A trained decoupled ResNet-56 is not needed for timing, but
gates that never change would make the analyses trivially cheap; ``--acm random`` (the default)
gives the ACMs random, seeded weights, so that many filters are dynamic and every analysis
(decision tree, permutation test, path distribution) does its full work. Then runs
:func:`nd_plugin.commands.analyze.build_report` with ``data=imagefolder:DIR`` — decoding the validation
images, collecting raw paths, every analysis, occlusion on 3 images, 7 figures, JSON and HTML —
and prints the wall time with the report's own per-step timings. Target: under 120 s.

Usage:
    python benchmarks/analyze_time.py --cifar /tmp/cifar10 \
        --weights /work/shared/weights/resnet56-4bfd9763.th --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def make_run(path: Path, weights: str, sites: str, acm: str, classes: list[str]) -> None:
    from nd_plugin import wrap
    from nd_plugin.adapters import create_model
    from nd_plugin.data import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    model = create_model("cifar:resnet56", num_classes=10, checkpoint=weights)
    dm = wrap(model, torch.zeros(1, 3, 32, 32), sites=sites)
    if acm == "random":
        for site in dm.sites():
            torch.nn.init.normal_(site.acm.fc1.weight, std=0.5)
            torch.nn.init.normal_(site.acm.fc2.weight, std=0.5)
            torch.nn.init.normal_(site.acm.fc2.bias, std=0.5)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model": "cifar:resnet56", "data": "cifar10", "num_classes": 10, "classes": classes,
        "input_size": [3, 32, 32], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "sites": dm.site_names, "reduction": 4, "noise_std": 1.0,
    }
    (path / "config.json").write_text(json.dumps(config))
    torch.save({"model": dm.state_dict(), "epoch": 0}, path / "checkpoint.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", default="/tmp/cifar10", help="folder with train/ and test/ (the shared JPEG CIFAR-10)")
    ap.add_argument("--weights", default="/work/shared/weights/resnet56-4bfd9763.th")
    ap.add_argument("--sites", default="all")
    ap.add_argument("--acm", default="random", choices=["random", "init"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--out", default=None, help="keep the run + report here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from nd_plugin.commands.analyze import build_report

    classes = sorted(d.name for d in (Path(args.cifar) / "train").iterdir() if d.is_dir())
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.out or tmp) / "resnet56"
        make_run(run, args.weights, args.sites, args.acm, classes)
        t0 = time.perf_counter()
        index = build_report(run, data=f"imagefolder:{args.cifar}", batch_size=args.batch_size)
        wall = time.perf_counter() - t0
        a = json.loads((index.parent / "analysis.json").read_text())
    res = {
        "wall_s": round(wall, 1),
        "inputs": a["paths"]["n"],
        "filters": a["paths"]["num_filters"],
        "gated_layers": len(a["paths"]["layers"]),
        "accuracy": a["paths"]["accuracy"],
        "density": a["paths"]["density"],
        "timings_s": {k: round(v, 1) for k, v in a["timings_s"].items()},
        "threads": args.threads,
        "acm": args.acm,
        "sites": args.sites,
    }
    print(json.dumps(res, indent=1))
    print(f"nd analyze, ResNet-56, {res['inputs']} images: {wall:.1f} s (target < 120 s)")


if __name__ == "__main__":
    main()
