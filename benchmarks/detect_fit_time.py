"""Wall time of fitting every detector on a run's whole training split (issue 16: < 5 min on the CPU).

Usage::

    python benchmarks/detect_fit_time.py RUN [--threads 2] [--batch-size 256]

Prints one JSON line: seconds, number of training images, the fitted detectors' metadata.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nd_plugin.detect.protocol import fit_detectors
from nd_plugin.detect.workflow import mi_weights_of
from nd_plugin.run import open_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run directory with checkpoint.pt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = open_run(args.run)
    mi = mi_weights_of(run.load_checkpoint("cpu"))
    dm = run.build_model("cpu").eval()
    bundle = run.data(None, train_augment=False)
    loader = bundle.loader("train", batch_size=args.batch_size, shuffle=False)
    t0 = time.perf_counter()
    fitted = fit_detectors(dm, loader, mi_weights=mi, meta={"data": run.config.get("data", "")})
    print(json.dumps({"fit_seconds": time.perf_counter() - t0, "fit_n": len(bundle.train), "threads": args.threads, "meta": fitted.meta}))


if __name__ == "__main__":
    main()
