"""Time of ``nd_plugin.prune`` on a wrapped torchvision ResNet-50 (target: under 10 s on CPU).

Usage::

    python benchmarks/prune_time.py [--size 224] [--out prune_time.json]

Gates are synthetic (a third silent, a third energetic, a third dynamic per layer); path
statistics come from 16 random inputs. Only the ``prune`` call is timed (tracing included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from latency import synthetic_gates  # noqa: E402

import nd_plugin  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(16, 3, args.size, args.size)
    dm = nd_plugin.wrap(torchvision.models.resnet50(), x[:1]).eval()
    synthetic_gates(dm, x)
    stats = dm.paths([(x, torch.zeros(16, dtype=torch.long))])
    t0 = time.perf_counter()
    compact = nd_plugin.prune(dm, stats)
    seconds = time.perf_counter() - t0
    result = {"model": "tv:resnet50", "size": args.size, "threads": args.threads, "prune_s": seconds, **compact.record.summary()}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
