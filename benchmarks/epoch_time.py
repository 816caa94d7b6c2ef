"""A decoupled epoch against a plain epoch of the same model, in the real training loop (issue 22, item 3).

Both run :meth:`nd_plugin.training.trainer.Trainer.fit` for one epoch from the same weights on the same data,
everything per-epoch included (data loading, the training pass, BatchNorm recalibration, the
validation pass with path statistics):

- **plain**: one warm-up epoch (every gate forced open, cross-entropy alone: the plain model);
- **decoupled**: one decoupling epoch (gates, the three losses, the density schedule).

The two alternate ``--repeats`` times in one process with the same threads; medians and their
ratio are printed and written as JSON. Target: decoupled / plain <= 1.25 on the CPU.

With ``--profile`` one more decoupled and plain training pass each run under the PyTorch
profiler and the operators that take the most self CPU time are printed (what to remove).

Usage::

    python benchmarks/epoch_time.py --data imagefolder:/tmp/cifar10 [--model cifar:resnet20] \\
        [--weights auto] [--repeats 3] [--batch-size 128] [--threads 2] [--set FIELD:VALUE,...] [--json PATH]

On all 50,000 CIFAR-10 images one plain ResNet-20 epoch takes ~100 s on a quiet 2-core CPU, so the
default 3 repeats take ~12 min; ``imagefolder:/tmp/cifar10_5k`` (``cifar_subset.py --train 500
--test 100``) about a tenth of that.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import nd_plugin
from _suite import environment, log, parse_settings, resolve_weights, write_json
from nd_plugin.adapters import create_model
from nd_plugin.data import load_data
from nd_plugin.training.config import TrainConfig
from nd_plugin.training.trainer import Trainer, seed_everything


def trainer(args: argparse.Namespace, data, weights: str | None, *, decoupled: bool) -> Trainer:
    """A Trainer for one epoch: plain (one warm-up epoch) or decoupled (one decoupling epoch)."""
    cfg = TrainConfig(
        model=args.model,
        data=args.data,
        weights=weights,
        batch_size=args.batch_size,
        ratio=args.ratio,
        epochs=1 if decoupled else 0,
        warmup_epochs=0 if decoupled else 1,
        device="cpu",
        **parse_settings(args.set),
    ).resolved()
    seed_everything(cfg.seed)
    model = create_model(args.model, num_classes=data.num_classes, checkpoint=weights)
    dm = nd_plugin.wrap(model, torch.zeros(1, *data.input_size))
    return Trainer(dm, data, cfg, progress=False)


def profile(tr: Trainer, decoupled: bool, rows: int) -> str:
    """The operators of one training pass, by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        if decoupled:
            tr.train_epoch(0)
        else:
            with tr.dm.gates_open():
                tr.train_epoch(0)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar:resnet20")
    p.add_argument("--data", default="imagefolder:/tmp/cifar10")
    p.add_argument("--weights", default="auto", help="as in the other suite scripts: auto, none or a path")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", default="", metavar="FIELD:VALUE[,...]", help="other TrainConfig settings")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS", help="also profile one pass of each, ROWS operators")
    p.add_argument("--json", default=None, help="results file (default: none)")
    p.set_defaults(device="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = resolve_weights(args.model, args.weights)
    data = load_data(args.data)
    log(f"[epoch_time] {args.model} on {args.data}: {len(data.train)} training / {len(data.val)} validation images")
    times: dict[str, list[float]] = {"plain": [], "decoupled": []}
    for repeat in range(args.repeats):
        for name in ("plain", "decoupled"):
            tr = trainer(args, data, weights, decoupled=name == "decoupled")
            t = time.perf_counter()
            tr.fit()
            times[name].append(time.perf_counter() - t)
            log(f"  repeat {repeat + 1}: {name} epoch {times[name][-1]:.1f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["decoupled"] / med["plain"]
    print(f"plain {med['plain']:.1f} s, decoupled {med['decoupled']:.1f} s (medians of {args.repeats}): {ratio:.3f}x")
    if args.profile:
        for name in ("plain", "decoupled"):
            print(f"\n{name} training pass, by self CPU time:")
            print(profile(trainer(args, data, weights, decoupled=name == "decoupled"), name == "decoupled", args.profile))
    if args.json:
        env = environment(args) | {"threads": torch.get_num_threads()}
        write_json(Path(args.json), {"environment": env, "seconds": times, "median": med, "ratio": ratio})


if __name__ == "__main__":
    main()
