"""wrap() time and eval-forward overhead of a wrapped model (issue 2 targets).

- `wrap()` on torchvision resnet50 at 224x224: target under 3 s (median of --repeats).
- Eval forward at batch 64 of the wrapped model (gates on, ACMs running) vs the plain model:
  target at most 1.15x. Plain and wrapped forwards alternate; medians reported.

Usage: python benchmarks/wrap_overhead.py [--models tv:resnet50 tv:resnet18 cifar:resnet56] [--out FILE]
Takes about 3 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import nd_plugin
from nd_plugin.adapters import create_model, default_input_size


def time_wrap(name: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        model = create_model(name)
        c, h, w = default_input_size(model)
        x = torch.randn(1, c, h, w)
        t = time.perf_counter()
        nd_plugin.wrap(model, x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def forward_ratio(name: str, batch: int, size: int | None, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model(name).eval()
    c, h, w = default_input_size(model)
    h = w = size or h
    plain = copy.deepcopy(model)
    dm = nd_plugin.wrap(model, torch.randn(1, c, h, w)).eval()
    x = torch.randn(batch, c, h, w)
    t_plain, t_dm = [], []
    with torch.inference_mode():
        for _ in range(2):
            plain(x), dm(x)
        for _ in range(repeats):
            t = time.perf_counter()
            plain(x)
            t_plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            dm(x)
            t_dm.append(time.perf_counter() - t)
    mp, md = statistics.median(t_plain), statistics.median(t_dm)
    return {"input": [batch, c, h, w], "plain_ms": 1000 * mp, "wrapped_ms": 1000 * md, "ratio": md / mp}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tv:resnet50", "tv:resnet18", "cifar:resnet56"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=None, help="override the input size (default: the model's)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "wrap_resnet50_224_s": time_wrap("tv:resnet50", 5), "forward": {}}
    print(f"wrap(tv:resnet50, 1x3x224x224): {result['wrap_resnet50_224_s']:.2f} s (median of 5)", flush=True)
    for name in args.models:
        r = forward_ratio(name, args.batch, args.size, args.repeats)
        result["forward"][name] = r
        print(f"{name} {r['input']}: plain {r['plain_ms']:.1f} ms, wrapped {r['wrapped_ms']:.1f} ms, ratio {r['ratio']:.3f}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
