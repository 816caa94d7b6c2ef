"""Gate sites found by tracing for every model of the coverage list (docs/models.md's table).

Usage: python benchmarks/coverage.py [--size 64] [--out FILE]. A few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import nd_plugin
from nd_plugin.adapters import create_model

MODELS = [
    "tv:resnet18", "tv:resnet50", "tv:vgg16_bn", "tv:mobilenet_v2", "tv:mobilenet_v3_large", "tv:efficientnet_b0",
    "tv:regnet_y_400mf", "tv:densenet121", "timm:resnet18", "timm:resnet50d", "timm:efficientnet_b0",
    "timm:mobilenetv3_large_100", "timm:regnety_008", "timm:convnext_atto", "timm:ghostnet_100",
    "cifar:resnet20", "cifar:resnet32", "cifar:resnet44", "cifar:resnet56", "cifar:resnet110", "cifar:vgg16_bn",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64, help="input size for tv:/timm: models (CIFAR: 32)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for name in MODELS:
        size = 32 if name.startswith("cifar:") else args.size
        x = torch.randn(1, 3, size, size)
        row = {"model": name, "input": size}
        for sites in ("internal", "all"):
            t = time.perf_counter()
            dm = nd_plugin.wrap(create_model(name), x, sites=sites)
            row[sites] = len(dm.gate_sites)
            row[f"{sites}_filters"] = dm.num_filters
            row[f"{sites}_s"] = round(time.perf_counter() - t, 2)
            if sites == "internal":
                row["first_sites"] = dm.site_names[:2]
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
