"""Cost of collecting calculation paths against plain inference over the same data.

Both loops run the same decoupled model in eval mode under ``torch.no_grad`` over the same batches,
held in memory (so data loading is not measured):

* plain: ``dm(x).argmax(1)`` per batch;
* paths: ``dm.paths(batches, raw=True)`` (gate hooks, per-filter and per-class counts, raw paths).

The two are timed alternately, ``--repeats`` times each, after one warm-up pass each; the ratio of
the medians is reported (target ≤ 1.1). Gates are made input dependent (random ACM weights, seeded)
so that the recorded paths are not all-ones; the ACMs cost the same in both loops.

Usage:
    python benchmarks/paths_overhead.py --model cifar:resnet56 --n 2000 --batch-size 250 --threads 2
    python benchmarks/paths_overhead.py --run RUN           # a trained run's model instead
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(args: argparse.Namespace):
    if args.run:
        from nd_plugin.run import open_run

        run = open_run(args.run)
        return run.build_model(), tuple(run.config["input_size"])
    from nd_plugin import wrap
    from nd_plugin.adapters import create_model

    torch.manual_seed(0)
    dm = wrap(create_model(args.model, num_classes=10), torch.zeros(1, 3, 32, 32), sites=args.sites)
    for site in dm.sites():
        torch.nn.init.normal_(site.acm.fc2.weight, std=0.5)
        torch.nn.init.normal_(site.acm.fc2.bias, std=0.5)
    return dm.eval(), (3, 32, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar:resnet56")
    ap.add_argument("--sites", default="all", help="internal or all")
    ap.add_argument("--run", default=None, help="use a run directory's model")
    ap.add_argument("--n", type=int, default=2000, help="inputs")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dm, size = build(args)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(args.batch_size, *size, generator=g), torch.randint(0, 10, (args.batch_size,), generator=g))
        for _ in range(max(args.n // args.batch_size, 1))
    ]

    @torch.no_grad()
    def plain() -> None:
        for x, _ in batches:
            dm(x).argmax(1)

    def paths() -> None:
        dm.paths(batches, raw=True, num_classes=10)

    plain(), paths()  # warm-up
    t_plain, t_paths = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plain()
        t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        paths()
        t_paths.append(time.perf_counter() - t0)
    mp, mq = statistics.median(t_plain), statistics.median(t_paths)
    res = {
        "model": args.run or args.model,
        "sites": args.sites,
        "filters": dm.num_filters,
        "inputs": len(batches) * args.batch_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "plain_s": t_plain,
        "paths_s": t_paths,
        "median_plain_s": mp,
        "median_paths_s": mq,
        "ratio": mq / mp,
        "torch": torch.__version__,
    }
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_s") or k.startswith("median")}, indent=1))
    print(f"paths / plain = {mq / mp:.3f}  (plain {mp:.2f} s, paths {mq:.2f} s, medians of {args.repeats})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
