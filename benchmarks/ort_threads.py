"""ONNX Runtime: dense vs static compact as ``nd prune`` times it now, and as it timed it before.

Usage::

    python benchmarks/ort_threads.py RUN [RUN ...] --threads 2 --round-to 1 --batch 1 32 \\
        --repeats 40 --out ort_threads.json

For each run and batch size, medians of ``--repeats`` alternating calls (dense, static) per row:

- ``own process``: :func:`nd_plugin.pruning.engines.onnx_latency` with the settings ``nd prune``
  times (``--threads`` intra-op threads with idle workers spinning, then not spinning, then 1
  thread), each in a fresh process that imports no torch; a spinning row's two sessions share one
  thread pool;
- ``in process (before)``: the harness ``nd prune`` used before: eager torch timed first with
  ``--threads`` threads, then two ONNX Runtime sessions in the same process, each with its own
  pool of ``--threads`` threads, spinning (ONNX Runtime's default).

The static model is the one ``nd prune`` exports (``static_record``, threshold 0.5, rounded to
``--round-to``; ``nd prune``'s default is 1). The JSON records the command, commit and CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from _suite import git_state
from nd_plugin.commands.pruning import spread_batches
from nd_plugin.pruning import apply_record, fold_batchnorm, static_record
from nd_plugin.pruning.engines import describe_settings, engine_runner, onnx_latency, onnx_settings, side_by_side
from nd_plugin.pruning.plan import plain_copy
from nd_plugin.run import open_run


def before(
    dense: torch.nn.Module, static: torch.nn.Module, xs: list[torch.Tensor], threads: int, repeats: int
) -> dict[str, float]:
    """The former in-process harness: eager first, then two spinning ORT sessions in this process."""
    torch.set_num_threads(threads)
    side_by_side({"dense": dense, "static": static}, xs, repeats)
    fns = {n: engine_runner("onnx", m, xs[0], threads, spinning=True) for n, m in (("dense", dense), ("static", static))}
    return side_by_side(fns, xs, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads asked for (1 is timed too)")
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--out", default="ort_threads.json")
    args = p.parse_args()
    payload: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        **git_state(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads()},
        "runs": [],
    }
    for run_dir in args.runs:
        run = open_run(run_dir)
        dm, stats = run.build_model().eval(), run.stats()
        x = torch.cat([b for b, _ in spread_batches(run.data().val, 64)])
        dense = fold_batchnorm(plain_copy(dm.model), x[:1])
        static = fold_batchnorm(plain_copy(apply_record(dm, static_record(dm, stats, round_to=args.round_to)).model), x[:1])
        for batch in args.batch:
            xs = [x[i : i + batch] for i in range(0, len(x) - batch + 1, batch)][:8] or [x[:batch]]
            measured = onnx_latency({"dense": dense, "static": static}, xs, onnx_settings(args.threads), args.repeats)
            rows = [{**{k: m[k] for k in ("threads", "spinning", "pool", "process")}, "ms": m["ms"]} for m in measured]
            rows.append({"threads": args.threads, "spinning": True, "pool": "per session", "process": "caller (before)"})
            rows[-1]["ms"] = before(dense, static, xs, args.threads, args.repeats)
            for row in rows:
                ms = row["ms"]
                row["speedup"] = ms["dense"] / ms["static"]
                how = describe_settings(row) + (", in process (before)" if row["process"] != "own" else "")
                print(
                    f"{run_dir} b{batch} [{how}] dense {ms['dense']:.3f} ms, static {ms['static']:.3f} ms ({row['speedup']:.2f}x)",
                    flush=True,
                )
            payload["runs"].append({"run": run_dir, "batch": batch, "round_to": args.round_to, "rows": rows})
            Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"[ort_threads] wrote {args.out}")


if __name__ == "__main__":
    main()
