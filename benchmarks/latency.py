"""Batch-1 CPU latency: original network vs the compact dynamic runtime, side by side.

Usage::

    python benchmarks/latency.py --run runs/r18 --run runs/r56 --run runs/vgg16 --out lat.json  # real runs
    python benchmarks/latency.py --model cifar:resnet56 --out q.json     # quick check, synthetic gates

For each model the original network (BatchNorm folded, like the runtime) and the compact dynamic
runtime (weight cache 64 and 0) are called alternately on the same batch-1 inputs (a run's
validation images); wall-clock and thread-CPU medians are compared with the expected-FLOPs
reduction (fvcore, from path statistics). ``realised / expected >= 0.9`` (cache 64, wall clock) is
the target. The JSON holds the command, commit, CPU and thread count; it is rewritten after each
model. Synthetic gates (``--model``): a third of each gated layer's filters silent, a third
energetic, a third dynamic with logits centred on their median over the inputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import nd_plugin
from _suite import git_state
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
        val = r.data().val
        x = torch.stack([val[int(i)][0] for i in torch.linspace(0, len(val) - 1, n)])  # spread over classes
        return dm, stats, x, f"run {run} ({r.config['model']})"
    from nd_plugin.adapters import create_model

    x = _inputs_for(model, n)
    dm = nd_plugin.wrap(create_model(model, num_classes=10), x[:1]).eval()
    synthetic_gates(dm, x)
    stats = dm.paths([(x[i : i + 16], torch.zeros(len(x[i : i + 16]), dtype=torch.long)) for i in range(0, n, 16)], raw=True)
    return dm, stats, x, f"{model} (synthetic gates)"


def _median_pair(fa, fb, inputs, repeats: int) -> dict[str, float]:
    """Calls ``fa`` and ``fb`` alternately on the same inputs; wall and thread-CPU medians in ms.

    Thread-CPU time ignores the time a loaded machine takes the core away (meaningful with one thread).
    """
    wall: tuple[list[float], list[float]] = ([], [])
    cpu: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for x in inputs[:3]:
            fa(x), fb(x)
        for i in range(repeats):
            x = inputs[i % len(inputs)]
            for k, f in enumerate((fa, fb)):
                w0, c0 = time.perf_counter(), time.thread_time()
                f(x)
                wall[k].append(time.perf_counter() - w0)
                cpu[k].append(time.thread_time() - c0)
    med = [statistics.median(v) * 1e3 for v in (*wall, *cpu)]
    return {"a_ms": med[0], "b_ms": med[1], "a_cpu_ms": med[2], "b_cpu_ms": med[3]}


def bench(run: str | None, model: str | None, threads: int, repeats: int, n: int, channels_last: bool) -> dict:
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
    t = _median_pair(eager, original, singles, repeats)
    rows: dict[str, dict] = {"original eager (BN unfolded) vs folded": {"eager_ms": t["a_ms"], "folded_ms": t["b_ms"]}}
    with torch.inference_mode():
        gated, ref = dm(x), compact(x)
    scale = float(gated.abs().max())
    variants = [(64, False), (0, False)] + ([(64, True)] if channels_last else [])
    for cache, cl in variants:
        rt = dynamic_runtime(compact, cache_size=cache, channels_last=cl)
        with torch.inference_mode():
            outs = torch.cat([rt(s) for s in singles])
        base = copy.deepcopy(original).to(memory_format=torch.channels_last) if cl else original
        t = _median_pair(base, rt, singles, repeats)
        speedup = t["a_ms"] / t["b_ms"]
        rows[f"compact dynamic cache={cache} channels_last={cl}"] = {
            "original_ms": t["a_ms"],
            "compact_ms": t["b_ms"],
            "speedup": speedup,
            "realised_over_expected": speedup / expected,
            "original_cpu_ms": t["a_cpu_ms"],
            "compact_cpu_ms": t["b_cpu_ms"],
            "realised_over_expected_cpu": t["a_cpu_ms"] / t["b_cpu_ms"] / expected,
            "max_rel_err_vs_gated": float((outs - gated).abs().max()) / scale,
            "max_rel_err_vs_compact": float((outs - ref).abs().max()) / scale,
            "same_predictions_as_gated": bool((outs.argmax(1) == gated.argmax(1)).all()),
            "cache": rt.cache_stats(),
        }
    main_row = rows["compact dynamic cache=64 channels_last=False"]
    return {
        "model": label,
        "input_size": list(dm.input_size),
        "threads": threads,
        "repeats": repeats,
        "inputs": len(singles),
        "density": stats.density,
        "filters": compact.record.summary(),
        "narrow_sites": sum(p.narrow for p in rt.plan.sites.values()),
        "flops": {"original": original_flops, "compact_static": exp.static, "compact_expected": exp.total},
        "independence_assumed": exp.independence_assumed,
        "expected_reduction": expected,
        "static_reduction": original_flops / exp.static,
        "realised_over_expected": main_row["realised_over_expected"],
        "target_met": main_row["realised_over_expected"] >= 0.9,
        "prune_s": prune_s,
        "latency_ms": rows,
    }


def _meta(threads: int) -> dict:
    """Command, commit, CPU and thread settings of this measurement."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return {
        "command": " ".join(sys.argv),
        **git_state(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": cpu or platform.processor(),
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch_threads": threads,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", action="append", help="run directory (repeatable)")
    src.add_argument("--model", action="append", help="registry model name, synthetic gates (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed for all measurements)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--inputs", type=int, default=32, help="batch-1 inputs (from the run's validation data)")
    parser.add_argument("--channels-last", action="store_true", help="also measure channels-last (both sides)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = _meta(args.threads)
    results = []
    for item in args.run or args.model:
        r = bench(item if args.run else None, None if args.run else item, args.threads, args.repeats, args.inputs, args.channels_last)
        keys = ("model", "density", "expected_reduction", "static_reduction", "realised_over_expected", "target_met")
        print(json.dumps({k: r[k] for k in keys}), flush=True)
        for name, row in r["latency_ms"].items():
            print("  ", name, row, flush=True)
        results.append(r)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
