"""Makes a small ImageFolder copy of the CIFAR-10 JPEG tree (symlinks, no image is copied).

The CPU rows of docs/benchmarks.md that would take hours on all 50,000 training images use the
first ``--train`` and ``--test`` files (sorted names) of every class folder.

Usage: python benchmarks/cifar_subset.py /tmp/cifar10 /tmp/cifar10_small [--train 1000] [--test 200]
Takes a second.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def make_subset(src: Path, dst: Path, per_class: dict[str, int]) -> int:
    """Links the first ``per_class[split]`` files of each class folder; returns how many links exist."""
    linked = 0
    for split, n in per_class.items():
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            out = dst / split / cls.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:n]:
                target = out / f.name
                if not target.exists():
                    os.symlink(f.resolve(), target)
                linked += 1
    return linked


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="extracted CIFAR-10 JPEG tree (train/, test/)")
    p.add_argument("dst", type=Path)
    p.add_argument("--train", type=int, default=1000, help="training images per class")
    p.add_argument("--test", type=int, default=200, help="test images per class")
    args = p.parse_args()
    n = make_subset(args.src, args.dst, {"train": args.train, "test": args.test})
    print(f"{n} images linked under {args.dst}")


if __name__ == "__main__":
    main()
