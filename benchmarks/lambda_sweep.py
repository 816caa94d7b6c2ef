"""Seed Fig. E reproduced: shares of silent, dynamic and energetic filters as each λ varies.

Each of λ_m, λ_k and λ_s in turn takes every value of its list while the other two stay at the
preset (``nd_plugin.training.config.preset(model)``, seed Table A, or the ``--lambda-*`` flags). One
decoupling run per distinct configuration: the preset itself, which each list usually contains,
runs once. Writes the JSON (``--json``, default ``<out-dir>/lambda_sweep.json``: environment, every
run's row, and per λ the rows in sweep order) and a 3-panel figure next to it (same name, ``.png``):
stacked shares against λ on a symlog axis. The seed finds that λ_m controls the dynamic share,
λ_s the share of filters that run at all, and λ_k the energetic share.

Usage::

    python benchmarks/lambda_sweep.py --data imagefolder:/tmp/cifar10 --device cuda \\
        [--model cifar:resnet20] [--weights PATH|auto|none] [--epochs 2] [--ratio R] \\
        [--lambda-m X] [--lambda-k X] [--lambda-s X] \\
        [--m-values 0,0.005,0.01,0.03,0.1] [--k-values 0,0.3,1,3] [--s-values 0,5e-5,1.5e-4,5e-4,2e-3] \\
        [--out-dir DIR] [--json PATH]

Time: with the default lists 12 runs of ``--epochs`` epochs each. ResNet-20 on all of CIFAR-10:
about 5 min per decoupling epoch on a 2-core CPU (2 h at the default 2 epochs), about 3.5 s per
epoch on an H100 (CUDA graphs, batch 128). Measured on the 2-core CPU: 3 values per λ (7 runs),
``--epochs 1`` on a 10,000-image subset (``benchmarks/cifar_subset.py``), 8 min.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _suite import LAMBDAS, Suite, add_common_args, log, parse_args

DEFAULT_VALUES = {
    "lambda_m": "0,0.005,0.01,0.03,0.1",
    "lambda_k": "0,0.3,1,3",
    "lambda_s": "0,5e-5,1.5e-4,5e-4,2e-3",
}
STATES = ("silent", "dynamic", "energetic")
COLORS = {"silent": "#9e9e9e", "dynamic": "#1f77b4", "energetic": "#ff7f0e"}


def parse_values(text: str) -> list[float]:
    """``"0,0.01,0.1"`` -> ``[0.0, 0.01, 0.1]`` (sorted, duplicates dropped)."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return values


def plot_sweep(results: dict[str, Any]):
    """The 3-panel figure of a sweep: stacked state shares against each λ (symlog x axis).

    Args:
        results: the sweep's JSON payload (``results["sweeps"][lambda] = [row, ...]``).

    Returns:
        The matplotlib ``Figure`` (Agg backend; not shown).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = results["sweeps"]
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 3.6), sharey=True, squeeze=False)
    for ax, (key, rows) in zip(axes[0], sweeps.items()):
        xs = [r[key] for r in rows]
        ax.stackplot(xs, *[[100 * r[s] for r in rows] for s in STATES], labels=STATES, colors=[COLORS[s] for s in STATES], alpha=0.85)
        positive = [x for x in xs if x > 0]
        if positive:
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs], rotation=45, fontsize=8)
        if len(xs) > 1:
            ax.set_xlim(min(xs), max(xs))
        ax.set_ylim(0, 100)
        ax.set_xlabel(f"$\\lambda_{key[-1]}$")
        ax.set_title(f"$\\lambda_{key[-1]}$ varies", fontsize=10, pad=14)
        for x, r in zip(xs, rows):
            ax.annotate(f"{100 * r['top1']:.1f}", (x, 101), ha="center", va="bottom", fontsize=7, annotation_clip=False)
    axes[0][0].set_ylabel("share of gated filters (%)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    env = results.get("environment", {})
    fig.suptitle(f"Filter states vs λ: {env.get('model', '')} on {env.get('data', '')} (numbers: top-1 %)", fontsize=10)
    fig.tight_layout()
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    for key in LAMBDAS:
        flag = f"--{key[-1]}-values"
        p.add_argument(flag, type=parse_values, default=parse_values(DEFAULT_VALUES[key]), help=f"{key} values (default {DEFAULT_VALUES[key]})")
    args = parse_args(p)
    values = {"lambda_m": args.m_values, "lambda_k": args.k_values, "lambda_s": args.s_values}
    suite = Suite(args, "lambda_sweep")
    lambdas = suite.preset()
    sweeps: dict[str, list[dict[str, Any]]] = {}
    total = len({tuple(sorted((lambdas | {k: v}).items())) for k in LAMBDAS for v in values[k]})
    log(f"[lambda_sweep] preset {lambdas}; {total} distinct runs")

    def payload() -> dict[str, Any]:
        return {"lambdas": lambdas, "values": values, "sweeps": sweeps}

    for key in LAMBDAS:
        sweeps[key] = []
        for v in values[key]:
            row = suite.run(f"{key}={v:g}", **(lambdas | {key: v}))
            sweeps[key].append(asdict(row))
            suite.write(**payload())
    results = suite.write(**payload())
    figure = Path(suite.json_path).with_suffix(".png")
    plot_sweep(results).savefig(figure, dpi=150)
    log("")
    for key in LAMBDAS:
        log(f"{key}: " + "; ".join(f"{r[key]:g}: " + "/".join(f"{100 * r[s]:.1f}" for s in STATES) for r in sweeps[key]) + "  (silent/dynamic/energetic %)")
    log(f"\nwritten {suite.json_path} and {figure}")


if __name__ == "__main__":
    main()
