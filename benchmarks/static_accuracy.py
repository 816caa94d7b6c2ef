"""Accuracy and static FLOPs of static compact models (gates dropped) against the gated model.

Usage::

    python benchmarks/static_accuracy.py RUN [--threads 2]

For thresholds 0.5 / 0 (filters on for more than that share of the inputs kept) and channel
rounding 1 / 8, prints the top-1 on the run's whole validation split and the static FLOPs reduction
(docs/notes/prune.md, issue 14); then the static network with the gated model's expected FLOPs and
the dynamic value (:func:`nd_plugin.pruning.dynamic_value`, issue 23).
"""

from __future__ import annotations

import argparse
import json

import torch

from nd_plugin.flops import count_flops
from nd_plugin.pruning import apply_record, dynamic_value, static_record
from nd_plugin.run import open_run
from nd_plugin.utilities import accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = open_run(args.run)
    dm, stats = run.build_model().eval(), run.stats()
    loader = run.data().loader("val", batch_size=500, shuffle=False)

    with dm.gates_open():
        dense = count_flops(dm, dm.input_size)
    out = {"gated": accuracy(dm, loader)}
    for threshold, block in ((0.5, 1), (0.5, 8), (0.0, 1), (0.0, 8)):
        compact = apply_record(dm, static_record(dm, stats, threshold=threshold, round_to=block))
        out[f"threshold {threshold} round_to {block}"] = {
            "top1": accuracy(compact, loader),
            "static_reduction": dense / count_flops(compact, compact.input_size),
        }
    out["same FLOPs as the gated model"] = dynamic_value(dm, stats, loader).to_dict()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
