"""Batch-1 CPU latency: original network vs the compact dynamic runtime, side by side.

Usage::

    python benchmarks/latency.py --run runs/r56 --out r56.json          # gates of a real run
    python benchmarks/latency.py --model cifar:resnet56 --out q.json     # quick check, synthetic gates

For each model the original network (BatchNorm folded, like the runtime) and the compact dynamic
runtime are called alternately on the same batch-1 inputs; the medians are compared with the
expected-FLOPs reduction (fvcore, from path statistics). ``realised / expected >= 0.9`` is the
target. Synthetic gates (``--model``): a third of each gated layer's filters silent, a third
energetic, a third dynamic with logits centred on their median over the inputs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nd_plugin
from nd_plugin.flops import count_flops, expected_flops
from nd_plugin.pruning import dynamic_runtime, fold_batchnorm, prune
from nd_plugin.pruning.plan import plain_copy
from nd_plugin.pruning.synthetic import synthetic_gates

SIZES = {"resnet18": 224, "tv:resnet18": 224}


def _inputs_for(spec: str, n: int) -> torch.Tensor:
    size = SIZES.get(spec, 32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g)
    return x * torch.rand(n, 1, 1, 1, generator=g) * 2 + torch.randn(n, 3, 1, 1, generator=g) * 0.5


def setup(run: str | None, model: str | None, n: int):
    if run is not None:
        from nd_plugin.run import open_run

        r = open_run(run)
        dm, stats = r.build_model(), r.stats()
        loader = r.data().loader("val", batch_size=n, shuffle=False)
        x = next(iter(loader))[0][:n]
        return dm, stats, x, f"run {run} ({r.config['model']})"
    from nd_plugin.adapters import create_model

    x = _inputs_for(model, n)
    dm = nd_plugin.wrap(create_model(model, num_classes=10), x[:1]).eval()
    synthetic_gates(dm, x)
    stats = dm.paths([(x[i : i + 16], torch.zeros(len(x[i : i + 16]), dtype=torch.long)) for i in range(0, n, 16)], raw=True)
    return dm, stats, x, f"{model} (synthetic gates)"


def _median_pair(fa, fb, inputs, repeats: int) -> tuple[float, float]:
    ta, tb = [], []
    with torch.inference_mode():
        for x in inputs[:3]:
            fa(x), fb(x)
        for i in range(repeats):
            x = inputs[i % len(inputs)]
            t0 = time.perf_counter()
            fa(x)
            t1 = time.perf_counter()
            fb(x)
            t2 = time.perf_counter()
            ta.append(t1 - t0)
            tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb)


def bench(run: str | None, model: str | None, threads: int, repeats: int, n: int) -> dict:
    torch.manual_seed(0)
    dm, stats, x, label = setup(run, model, n)
    t0 = time.perf_counter()
    compact = prune(dm, stats)
    prune_s = time.perf_counter() - t0
    with dm.gates_open():
        original_flops = count_flops(dm, dm.input_size)
    exp = expected_flops(compact, stats)
    expected = original_flops / exp.total
    original = fold_batchnorm(plain_copy(dm.model), x[:1], inplace=True)
    eager = plain_copy(dm.model)
    singles = [x[i : i + 1] for i in range(len(x))]
    torch.set_num_threads(threads)
    rows = {}
    t_eager, t_fold = _median_pair(eager, original, singles, repeats)
    rows["original eager (BN unfolded)"] = t_eager * 1e3
    rows["original (BN folded)"] = t_fold * 1e3
    with torch.inference_mode():
        ref = compact(x[:4])
    for cache in (0, 64):
        for cl in (False, True):
            rt = dynamic_runtime(compact, cache_size=cache, channels_last=cl)
            with torch.inference_mode():
                err = max(float((rt(x[i : i + 1]) - ref[i : i + 1]).abs().max() / ref.abs().max()) for i in range(4))
            base = original.to(memory_format=torch.channels_last) if cl else original
            t_orig, t_rt = _median_pair(base, rt, singles, repeats)
            name = f"compact dynamic cache={cache} channels_last={cl}"
            rows[name] = {
                "original_ms": t_orig * 1e3,
                "compact_ms": t_rt * 1e3,
                "speedup": t_orig / t_rt,
                "realised_over_expected": (t_orig / t_rt) / expected,
                "max_rel_err_vs_compact": err,
                "cache": rt.cache_stats(),
            }
            original = original.to(memory_format=torch.contiguous_format)
    return {
        "model": label,
        "input_size": list(dm.input_size),
        "threads": threads,
        "repeats": repeats,
        "inputs": len(singles),
        "density": stats.density,
        "filters": compact.record.summary(),
        "narrow_sites": sum(p.narrow for p in dynamic_runtime(compact).plan.sites.values()),
        "flops": {"original": original_flops, "compact_static": exp.static, "compact_expected": exp.total},
        "expected_reduction": expected,
        "static_reduction": original_flops / exp.static,
        "prune_s": prune_s,
        "latency_ms": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", action="append", help="run directory (repeatable)")
    src.add_argument("--model", action="append", help="registry model name, synthetic gates (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = []
    for item in args.run or args.model:
        r = bench(item if args.run else None, None if args.run else item, args.threads, args.repeats, args.inputs)
        print(json.dumps({k: r[k] for k in ("model", "density", "expected_reduction", "static_reduction")}), flush=True)
        for name, row in r["latency_ms"].items():
            print("  ", name, row, flush=True)
        results.append(r)
    meta = {"torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(), "cpus": torch.get_num_threads()}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
