"""How batch-1 conv time scales with the filters kept: why dynamic ResNets realise less than their FLOPs.

For a few 3x3 conv shapes of the CIFAR and ImageNet ResNets, times ``F.conv2d`` at batch 1 with all
filters, with half the output filters (what a gated conv computes), with half the input channels
(what the conv after it computes), and both; and the same through oneDNN directly
(``torch.mkldnn_convolution``). A cost that scaled with FLOPs would give 0.5 for either half.

Usage: python benchmarks/conv_scaling.py [--threads 1] [--repeats 200] [--out conv_scaling.json]
Takes about half a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = [(16, 32), (32, 16), (64, 8), (64, 56), (128, 28), (256, 14), (512, 7)]  # (channels, side)


def median_us(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median wall time of ``fn`` in microseconds, after a few warm-up calls."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def measure(channels: int, side: int, repeats: int) -> dict[str, float]:
    """Times one shape: full, half outputs, half inputs, both; conv2d and oneDNN."""
    g = torch.Generator().manual_seed(0)
    half = channels // 2
    x = torch.randn(1, channels, side, side, generator=g)
    w = torch.randn(channels, channels, 3, 3, generator=g)
    b = torch.randn(channels, generator=g)
    cases = {
        "full": (x, w, b),
        "half_out": (x, w[:half].contiguous(), b[:half]),
        "half_in": (x[:, :half].contiguous(), w[:, :half].contiguous(), b),
        "half_both": (x[:, :half].contiguous(), w[:half, :half].contiguous(), b[:half]),
    }
    row: dict[str, float] = {"channels": channels, "side": side}
    with torch.inference_mode():
        for name, (xi, wi, bi) in cases.items():
            row[f"conv2d_{name}_us"] = median_us(lambda: F.conv2d(xi, wi, bi, 1, 1), repeats)  # noqa: B023
            row[f"onednn_{name}_us"] = median_us(
                lambda: torch.mkldnn_convolution(xi, wi, bi, [1, 1], [1, 1], [1, 1], 1), repeats  # noqa: B023
            )
    for lib in ("conv2d", "onednn"):
        for name in ("half_out", "half_in"):
            row[f"{lib}_{name}_share"] = row[f"{lib}_{name}_us"] / row[f"{lib}_full_us"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", default=None, help="write JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'shape':>12} {'conv2d full':>12} {'½ out':>7} {'½ in':>7} {'oneDNN full':>12} {'½ out':>7} {'½ in':>7}")
    for channels, side in SHAPES:
        r = measure(channels, side, args.repeats if side < 56 else max(args.repeats // 10, 10))
        rows.append(r)
        print(
            f"{channels:>4}@{side:<3}    {r['conv2d_full_us']:>9.0f} µs {r['conv2d_half_out_share']:>7.2f} "
            f"{r['conv2d_half_in_share']:>7.2f} {r['onednn_full_us']:>9.0f} µs {r['onednn_half_out_share']:>7.2f} "
            f"{r['onednn_half_in_share']:>7.2f}",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
