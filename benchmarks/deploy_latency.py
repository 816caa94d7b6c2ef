"""Deployment speed: dense vs compact in each engine, and torch-pruning's model at the same FLOPs.

Usage::

    python benchmarks/deploy_latency.py --run runs/r20 --run runs/r56 --engines eager onnx \\
        --threads 1 2 --batch 1 32 --round-to 8 --out docs/data/deploy_latency.json

For each run, in each engine, thread count and batch size, these are called in turn on the same
validation inputs (medians). Each engine is timed as ``nd prune`` times it: eager, compile and
aoti in this process with ``--threads`` torch threads; ONNX Runtime in a fresh process of its own
(no torch threads), ``--threads`` intra-op threads, one row with idle workers spinning and one
without (``--onnx-spinning``; a spinning row's sessions share one pool, as one model serving calls
back to back does):

- ``dense``: the original network, norms folded;
- ``decoupled``: the fastest correct decoupled form for that engine: in eager torch the runtime of
  the per-layer decision (``plan_deployment``: a gate stays only where skipping measured faster), in
  every other engine the static compact model (gates dropped, filters on for more than half of the
  inputs kept, rounded to ``--round-to``);
- ``static``: the static compact model in eager torch too;
- ``tp``: torch-pruning's group-norm pruner (``GroupMagnitudeImportance(p=2)``, the same internal
  layers, the same ``round_to``) at the static model's FLOPs, not fine-tuned (its accuracy is printed).

Each row holds the speed-up over dense and, for the decoupled forms, ``speedup / FLOPs reduction``
(expected FLOPs for the dynamic runtime, static FLOPs otherwise; target >= 0.9). The JSON records
the command, commit, CPU and threads, and is rewritten after each run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from compare_pruners import match_flops, prunable_scope

from _suite import git_state
from nd_plugin.commands.pruning import spread_batches
from nd_plugin.flops import count_flops, expected_flops
from nd_plugin.pruning import apply_record, dynamic_runtime, fold_batchnorm
from nd_plugin.pruning.deploy import plan_deployment
from nd_plugin.pruning.engines import (
    check_engines,
    check_spinning,
    describe_settings,
    engine_runner,
    onnx_latency,
    onnx_settings,
    side_by_side,
)
from nd_plugin.pruning.plan import plain_copy
from nd_plugin.run import open_run
from nd_plugin.utilities import accuracy


def _val(run, n: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    batches = spread_batches(run.data().val, n)
    return torch.cat([x for x, _ in batches]), batches


def forms_of(run_dir: str, round_to: int, decide_threads: int, acc_images: int) -> dict[str, Any]:
    """Builds the dense, decoupled and tp models of one run, with their FLOPs and accuracy."""
    run = open_run(run_dir)
    dm, stats = run.build_model().eval(), run.stats()
    x, batches = _val(run, acc_images)
    torch.set_num_threads(decide_threads)
    t0 = time.perf_counter()
    plan = plan_deployment(dm, stats, x[:8], round_to=round_to, repeats=20)
    decide_s = time.perf_counter() - t0
    eager, static = apply_record(dm, plan.record), apply_record(dm, plan.static)
    with dm.gates_open():
        dense_flops = count_flops(dm, dm.input_size)
    static_flops = count_flops(static, static.input_size)
    eager_flops = expected_flops(eager, stats).total
    plain = dm.unwrapped().eval()
    example = x[:1]
    tp_model, _, tp_flops = match_flops(
        plain,
        tp.importance.GroupMagnitudeImportance(p=2),
        static_flops,
        dm.input_size,
        scope=prunable_scope(plain, example, "internal"),
        round_to=round_to if round_to > 1 else None,
    )
    return {
        "run": run_dir,
        "model": run.config["model"],
        "input_size": list(dm.input_size),
        "x": x[:64],
        "modules": {
            "dense": fold_batchnorm(plain_copy(dm.model), example),
            "runtime": dynamic_runtime(eager),
            "static": fold_batchnorm(plain_copy(static.model), example),
            "tp": fold_batchnorm(tp_model, example),
        },
        "flops": {"dense": dense_flops, "runtime": eager_flops, "static": static_flops, "tp": tp_flops},
        "accuracy": {
            "images": sum(len(y) for _, y in batches),
            "gated": accuracy(dm, batches),
            "runtime": accuracy(eager, batches),
            "static": accuracy(static, batches),
            "tp (not fine-tuned)": accuracy(tp_model, batches),
        },
        "deployment": {**plan.to_dict(), "seconds": decide_s, "round_to": round_to},
    }


def measure(
    forms: dict[str, Any],
    engines: tuple[str, ...],
    threads: int,
    batch: int,
    repeats: int,
    channels_last: bool = False,
    onnx_spinning: str = "auto",
) -> list[dict[str, Any]]:
    """One row per engine and setting: median ms of each model, called in turn (``channels_last``:
    eager models and inputs in NHWC memory layout, the dense model too).

    Eager, compile and aoti run in this process with ``threads`` torch threads. ONNX Runtime runs
    as ``nd prune`` times it (:func:`~nd_plugin.pruning.engines.onnx_latency`): its sessions
    alternate in a process of their own with ``threads`` intra-op threads, one row per spinning
    setting (``onnx_spinning`` ``auto``: on and off)."""
    torch.set_num_threads(threads)
    x = forms["x"]
    xs = [x[i : i + batch] for i in range(0, len(x) - batch + 1, batch)][:8] or [x[:batch]]
    mods, flops = forms["modules"], forms["flops"]
    if channels_last:
        xs = [t.contiguous(memory_format=torch.channels_last) for t in xs]
        mods = {n: m if n == "runtime" else m.to(memory_format=torch.channels_last) for n, m in mods.items()}
    rows = []
    for engine in engines:
        names = ["dense", "runtime", "static", "tp"] if engine == "eager" else ["dense", "static", "tp"]
        if engine == "onnx":  # as nd prune times it: a process of its own per setting, spinning on and off
            settings = [s for s in onnx_settings(threads, onnx_spinning) if s["threads"] == threads]
            measured = onnx_latency({n: mods[n] for n in names}, xs, settings, repeats)
            timed = [(m["ms"], {k: m[k] for k in ("spinning", "pool", "process")}) for m in measured]
        else:
            fns = {n: engine_runner(engine, mods[n], xs[0], threads) for n in names}
            timed = [(side_by_side(fns, xs, repeats), {"spinning": None, "process": "caller"})]
        for ms, how in timed:
            best = min((n for n in names if n in ("runtime", "static")), key=ms.get)
            row = {"engine": engine, "threads": threads, "batch": batch, "channels_last": channels_last, **how, "ms": ms}
            row["decoupled"] = best
            row["speedup"] = {n: ms["dense"] / ms[n] for n in names if n != "dense"}
            row["flops_reduction"] = {n: flops["dense"] / flops[n] for n in names if n != "dense"}
            row["realised_over_flops"] = {n: row["speedup"][n] / row["flops_reduction"][n] for n in names if n != "dense"}
            row["decoupled_vs_tp"] = ms["tp"] / ms[best]
            rows.append(row)
            print(
                f"  {engine:7s} [{describe_settings({'threads': threads, **how})}] b{batch:<3d} dense {ms['dense']:8.3f} ms | "
                + " | ".join(f"{n} {ms[n]:8.3f} ({row['speedup'][n]:.2f}x)" for n in names if n != "dense"),
                flush=True,
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, help="run directory (repeatable)")
    p.add_argument("--engines", nargs="+", default=["eager", "onnx"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--acc-images", type=int, default=2000)
    p.add_argument("--channels-last", action="store_true", help="eager models and inputs in channels-last layout")
    p.add_argument("--onnx-spinning", default="auto", help="ONNX Runtime's idle workers spinning: on, off, auto (both)")
    p.add_argument("--out", default="deploy_latency.json")
    args = p.parse_args()
    engines = check_engines(args.engines)
    spinning = check_spinning(args.onnx_spinning)
    payload: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        **git_state(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads()},
        "torch": torch.__version__,
        "runs": [],
    }
    for run_dir in args.run:
        print(f"[deploy_latency] {run_dir}", flush=True)
        forms = forms_of(run_dir, args.round_to, min(args.threads), args.acc_images)
        entry = {k: v for k, v in forms.items() if k not in ("modules", "x")}
        print(f"  accuracy {entry['accuracy']}\n  flops {entry['flops']}", flush=True)
        entry["rows"] = []
        for threads in args.threads:
            for batch in args.batch:
                repeats = args.repeats if batch == 1 else max(args.repeats // 3, 5)
                entry["rows"] += measure(forms, engines, threads, batch, repeats, args.channels_last, spinning)
        payload["runs"].append(entry)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"[deploy_latency] wrote {args.out}")


if __name__ == "__main__":
    main()
