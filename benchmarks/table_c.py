"""Seed Table C reproduced: the effect of each loss on accuracy, FLOPs and filter states.

Five decoupling runs of one model from the same trained weights -- ACM only (all λ = 0), +L_s,
+L_s+L_kl, +L_s+L_mi, and all three losses -- plus (unless ``--no-baseline``) the same model
fine-tuned for as many epochs with the gates open (no gates, cross-entropy only). The λ of a
loss that is on comes from ``nd_plugin.training.config.preset(model)`` (seed Table A) unless a flag sets it.
Prints a markdown table, then each seed finding checked on the numbers:

- "L_mi creates dynamic filters": dynamic share of +L_s+L_mi above that of +L_s;
- "L_kl raises the energetic share": energetic share of +L_s+L_kl above that of +L_s;

each with a margin of ``--margin`` (absolute share, default 0.01). The JSON (``--json``, default
``<out-dir>/table_c.json``) holds the environment, every row, the findings and the seed's own
Table C (ResNet-56 on CIFAR-10) for comparison.

Usage::

    python benchmarks/table_c.py --data imagefolder:/tmp/cifar10 --device cuda \\
        [--model cifar:resnet20] [--weights PATH|auto|none] [--epochs 2] [--ratio R] \\
        [--lambda-m X] [--lambda-k X] [--lambda-s X] [--out-dir DIR] [--json PATH]

Time: 6 runs of ``--epochs`` epochs each. ResNet-20 on CIFAR-10: about 5 min per decoupling epoch
on a 2-core CPU (1 h at the default 2 epochs, not practical there); measured on an H100 with
``--batch-size 128 --workers 6``: 74 s for all six runs at 2 epochs, data decoding included. CPU
setting that fits in minutes: a subset (``benchmarks/cifar_subset.py``) and ``--epochs 1``;
measured for ResNet-56 on 10,000 training images, 2 threads: 17.5 min for the six runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from _suite import Row, Suite, add_common_args, fmt_flops, log, markdown_table, parse_args

# Seed supplementary Table C (ResNet-56, CIFAR-10; /work/shared/seed): top-1 %, FLOPs, state shares %.
SEED_TABLE_C: dict[str, dict[str, float]] = {
    "ACM": {"top1": 93.17, "flops_m": 118, "dynamic": 0.30, "silent": 13.25, "energetic": 86.45},
    "ACM+L_s": {"top1": 92.94, "flops_m": 63, "dynamic": 0.24, "silent": 59.60, "energetic": 40.16},
    "ACM+L_s+L_kl": {"top1": 92.81, "flops_m": 117, "dynamic": 0.00, "silent": 15.22, "energetic": 84.78},
    "ACM+L_s+L_mi": {"top1": 92.99, "flops_m": 67, "dynamic": 29.00, "silent": 32.55, "energetic": 38.45},
    "ACM+L_s+L_mi+L_kl": {"top1": 93.08, "flops_m": 63, "dynamic": 30.27, "silent": 35.24, "energetic": 34.49},
}


def combinations(lambdas: dict[str, float]) -> dict[str, dict[str, float]]:
    """The five loss combinations of Table C as λ overrides (a loss that is off has λ = 0)."""
    m, k, s = lambdas["lambda_m"], lambdas["lambda_k"], lambdas["lambda_s"]
    return {
        "ACM": {"lambda_m": 0.0, "lambda_k": 0.0, "lambda_s": 0.0},
        "ACM+L_s": {"lambda_m": 0.0, "lambda_k": 0.0, "lambda_s": s},
        "ACM+L_s+L_kl": {"lambda_m": 0.0, "lambda_k": k, "lambda_s": s},
        "ACM+L_s+L_mi": {"lambda_m": m, "lambda_k": 0.0, "lambda_s": s},
        "ACM+L_s+L_mi+L_kl": {"lambda_m": m, "lambda_k": k, "lambda_s": s},
    }


def findings(rows: dict[str, Row], margin: float) -> list[dict[str, Any]]:
    """The seed's two claims about Table C, each checked on the measured shares.

    Args:
        rows: the rows by combination name.
        margin: how much larger (absolute share) the first share must be for the claim to hold.
    """
    checks = [
        ("L_s removes FLOPs (silent filters)", "silent", "ACM+L_s", "ACM"),
        ("L_mi creates dynamic filters", "dynamic", "ACM+L_s+L_mi", "ACM+L_s"),
        ("L_kl raises the energetic share", "energetic", "ACM+L_s+L_kl", "ACM+L_s"),
    ]
    out = []
    for claim, state, with_loss, without in checks:
        a, b = getattr(rows[with_loss], state), getattr(rows[without], state)
        seed_a, seed_b = SEED_TABLE_C[with_loss][state], SEED_TABLE_C[without][state]
        cost = rows[without].top1 - rows[with_loss].top1
        out.append(
            {
                "claim": claim,
                "holds": a > b + margin,
                "state": state,
                "with": with_loss,
                "without": without,
                "share_with": a,
                "share_without": b,
                "margin": margin,
                "seed_resnet56_percent": [seed_a, seed_b],
                "top1_cost": cost,
                "text": (
                    f"{claim}: {'holds' if a > b + margin else 'does not hold'} -- {state} share {100 * a:.2f}% "
                    f"with {with_loss} vs {100 * b:.2f}% with {without} (margin {100 * margin:.1f} pt; "
                    f"seed ResNet-56: {seed_a:.2f}% vs {seed_b:.2f}%); top-1 cost {100 * cost:+.2f} points"
                ),
            }
        )
    return out


def table(rows: list[Row]) -> str:
    """The measured rows as a markdown table in the seed's layout (plus λs, reductions and time)."""
    header = ["Method", "λm", "λk", "λs", "R", "Top-1 (%)", "FLOPs expected", "FLOPs static", "dynamic", "silent", "energetic", "s"]
    lines = [
        [
            r.name,
            f"{r.lambda_m:g}",
            f"{r.lambda_k:g}",
            f"{r.lambda_s:g}",
            f"{r.ratio:g}",
            f"{100 * r.top1:.2f}",
            f"{fmt_flops(r.flops_expected)} (x{r.expected_reduction or 0:.2f})",
            f"{fmt_flops(r.flops_static)} (x{r.static_reduction or 0:.2f})",
            f"{100 * r.dynamic:.2f}%",
            f"{100 * r.silent:.2f}%",
            f"{100 * r.energetic:.2f}%",
            f"{r.seconds:.0f}",
        ]
        for r in rows
    ]
    return markdown_table(header, lines)


def seed_table() -> str:
    """The seed's Table C (ResNet-56, CIFAR-10) as a markdown table."""
    header = ["Method (seed, ResNet-56)", "Top-1 (%)", "FLOPs", "dynamic", "silent", "energetic"]
    lines = [
        [name, f"{v['top1']:.2f}", f"{v['flops_m']:g}M", f"{v['dynamic']:.2f}%", f"{v['silent']:.2f}%", f"{v['energetic']:.2f}%"]
        for name, v in SEED_TABLE_C.items()
    ]
    return markdown_table(header, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--no-baseline", action="store_true", help="skip the fine-tuned-without-gates run")
    p.add_argument("--margin", type=float, default=0.01, help="absolute share a finding needs to hold (default 0.01)")
    args = parse_args(p)
    suite = Suite(args, "table_c")
    lambdas = suite.preset()
    by_name: dict[str, Row] = {}
    baseline = None
    if not args.no_baseline:
        baseline = suite.run("baseline (no gates)", **suite.finetune_overrides())
        suite.write(lambdas=lambdas, seed_table_c=SEED_TABLE_C)
    for name, overrides in combinations(lambdas).items():
        by_name[name] = suite.run(name, **overrides)
        suite.write(lambdas=lambdas, seed_table_c=SEED_TABLE_C)
    checked = findings(by_name, args.margin)
    suite.write(lambdas=lambdas, seed_table_c=SEED_TABLE_C, findings=checked)
    rows = ([baseline] if baseline else []) + list(by_name.values())
    log("")
    log(f"Table C, {args.model} on {args.data} ({args.epochs} decoupling epochs, {suite.env['device']}):")
    log("")
    log(table(rows))
    log("")
    log(seed_table())
    log("")
    for f in checked:
        log(f["text"])
    log(f"\nwritten {suite.json_path}")


if __name__ == "__main__":
    main()
