"""Which training settings work: one base decoupling run and one run per variant (issue 12).

Every run starts from the same weights and data order and differs from the base in the settings
its variant names (any :class:`nd_plugin.TrainConfig` field). The table gives top-1, the filter
states and the expected-FLOPs reduction of each, so a default can be chosen by measurement; the
``--seeds`` option repeats the base with other seeds to show the run-to-run noise.

Usage (the CIFAR subset of ``cifar_subset.py``; CPU)::

    python benchmarks/recipe_search.py --data imagefolder:/tmp/cifar10_small --ratio 0.5 --lambda-s 0.01 \\
        --epochs 2 --batch-size 128 --threads 2 \\
        --variant hard10=hard_share:0.1 --variant acm_kaiming=acm_init:kaiming --seeds 1

A variant is ``NAME=FIELD:VALUE[,FIELD:VALUE...]``; values are parsed as JSON where they can be
(``0.1``, ``true``), else taken as strings (``kaiming``).
"""

from __future__ import annotations

import argparse
from typing import Any

from _suite import Suite, add_common_args, log, markdown_table, parse_settings


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``"hard10=hard_share:0.1,schedule:cosine"`` → ``("hard10", {"hard_share": 0.1, "schedule": "cosine"})``.

    Example:
        >>> parse_variant("v=hard_share:0.1,acm_init:kaiming")
        ('v', {'hard_share': 0.1, 'acm_init': 'kaiming'})
    """
    name, _, body = spec.partition("=")
    if not name or not body:
        raise SystemExit(f"--variant {spec!r}: expected NAME=FIELD:VALUE[,FIELD:VALUE...]")
    return name, parse_settings(body)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--base", default="", help="settings every run shares, FIELD:VALUE[,...] (default: none)")
    parser.add_argument("--variant", action="append", default=[], help="NAME=FIELD:VALUE[,...]; repeatable")
    parser.add_argument("--seeds", type=int, default=0, help="extra seeds of the base run (noise estimate)")
    args = parser.parse_args(argv)
    base = parse_settings(args.base)
    variants = [parse_variant(v) for v in args.variant]
    suite = Suite(args, "recipe_search")
    suite.run("base", **base)
    suite.write(base=base)
    for seed in range(1, args.seeds + 1):
        suite.run(f"base seed {args.seed + seed}", **base, seed=args.seed + seed)
        suite.write(base=base)
    for name, overrides in variants:
        suite.run(name, **(base | overrides))
        suite.write(base=base, variants=dict(variants))
    lines = [
        [
            r.name,
            f"{100 * r.top1:.2f}%",
            f"{r.density:.3f}",
            f"{100 * r.silent:.1f} / {100 * r.dynamic:.1f} / {100 * r.energetic:.1f}%",
            f"{r.expected_reduction or 0:.2f}x",
            "n/a" if r.dynamic_value is None else f"{100 * r.dynamic_value:+.2f}",
            f"{r.seconds:.0f}s",
        ]
        for r in suite.rows
    ]
    header = ["run", "top-1", "density", "silent / dynamic / energetic", "expected FLOPs", "dynamic value", "time"]
    log(markdown_table(header, lines))
    return suite.write(base=base, variants=dict(variants))


if __name__ == "__main__":
    main()
