"""Calibration of the decision tree's cluster test (issue 17): false-split rate and power, seeded draws.

Every draw builds the whole decision tree (``nd_plugin.interpret.decision_tree``, default settings:
copula null, alpha 0.01, 99 null draws, tests on at most 2000 inputs) on synthetic paths with six
layers of 16, 16, 32, 32, 64, 64 filters (ResNet-20's widths) and scores it with
``nd_plugin.interpret.calibration.score_tree``:

- **false splits**: structure-free paths (one population, U-shaped on-rates, correlated filters from
  two latent factors; Gaussian, Student-t(3) and independent latents, and a stronger correlation),
  and every test of a one-population group in the two-group draws. Share of tested groups that
  split. Target ≤ 5%.
- **power**: two groups (share 0.5 or 0.2) that share layers 0-2 and differ from layer 3 on (a
  latent shift of ``separation`` per filter, or the issue's per-group prototypes with independent
  filters). Share of draws whose root splits exactly at layer 3 into parts agreeing ≥ 95% with the
  groups; reported over all draws and over the draws in which k-means itself separates the groups
  at layer 3 with ≥ 95% agreement (the target's condition). Target ≥ 90%.
- ``--real RUN``: also structure-free paths drawn from Gaussian copulas fitted to every gated layer
  of a real run (its dynamic filters' on-rates and tetrachoric correlations; paths collected on the
  run's validation split).
- ``--compare``: the other tests (filter-wise permutation null, continuous normal null, the
  full-dimensional index, Hopkins ≥ 0.75) on fewer draws.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/cluster_calibration.py --draws 50 --json docs/data/cluster_calibration.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _suite import git_state
from nd_plugin.files import atomic_write_text
from nd_plugin.interpret.calibration import kmeans_agreement, score_tree, structure_free_paths, two_group_paths
from nd_plugin.interpret.copula import GaussianCopula

SIZES = [16, 16, 32, 32, 64, 64]
PART = 3

NULLS: dict[str, dict[str, Any]] = {
    "gaussian latent, 2 factors": {},
    "Student-t(3) latent, 2 factors": {"latent": "t"},
    "independent filters": {"loading": 0.0},
    "strong correlation (loading 2)": {"loading": 2.0},
}
POWER: dict[str, dict[str, Any]] = {
    "shift 1.0": {"separation": 1.0},
    "shift 1.25": {"separation": 1.25},
    "shift 1.5": {"separation": 1.5},
    "shift 2.0": {"separation": 2.0},
    "shift 1.5, 20% / 80%": {"separation": 1.5, "share": 0.2},
    "prototypes U(0.1, 0.9), independent": {"mode": "prototypes"},
}
COMPARE: dict[str, dict[str, Any]] = {
    "copula null, PC1 index (default)": {},
    "copula null, full-dimensional index": {"space": "full"},
    "permutation null, PC1 index": {"test": "permutation"},
    "continuous normal null, PC1 index": {"test": "gaussian"},
    "Hopkins >= 0.75": {"test": "hopkins"},
}


def real_copulas(run_dir: str, max_inputs: int) -> tuple[list[GaussianCopula], list[str]]:
    """One copula per gated layer of a run, fitted on its dynamic filters over (at most ``max_inputs`` of)
    the validation split: from RUN/paths.npz when it holds raw paths, else collected."""
    import torch

    from nd_plugin.commands.analyze import _analysis_data
    from nd_plugin.run import open_run

    torch.set_num_threads(1)
    run = open_run(run_dir)
    try:
        stats = run.stats()  # the run's paths.npz, when it holds every input's path
    except Exception:  # noqa: BLE001 - missing or unreadable: collect below
        stats = None
    if stats is None or stats.paths is None:
        dm = run.build_model("cpu")
        loader = _analysis_data(run, None).loader("val", batch_size=250, shuffle=False)
        stats = dm.paths(loader, raw=True, max_batches=max(1, max_inputs // 250))
    stats.paths = stats.paths[:max_inputs]
    offsets = np.cumsum([0, *stats.site_channels])
    cops, names = [], []
    for i, name in enumerate(stats.site_names):
        x = stats.paths[:, offsets[i] : offsets[i + 1]]
        x = x[:, x.min(0) != x.max(0)]
        if x.shape[1] >= 2:
            cops.append(GaussianCopula.fit(x))
            names.append(f"{name} ({x.shape[1]} dynamic)")
    return cops, names


def rate(k: int, n: int) -> dict[str, Any]:
    """A share with its 95% Wilson interval."""
    from scipy.stats import binomtest

    if not n:
        return {"k": k, "n": n, "rate": None, "ci95": None}
    ci = binomtest(k, n).proportion_ci(method="wilson")
    return {"k": k, "n": n, "rate": round(k / n, 4), "ci95": [round(ci.low, 4), round(ci.high, 4)]}


def run_null(name: str, draws: int, n: int, seed0: int, tree: dict[str, Any], **gen: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    tested = false = 0
    for s in range(draws):
        rng = np.random.default_rng(seed0 + s)
        sizes = SIZES if "copulas" not in gen else [c.rates.size for c in gen["copulas"]]
        x = structure_free_paths(n, sizes, seed=rng, **gen)
        sc = score_tree(x, sizes, seed=seed0 + s, **tree)
        tested += sc.tested
        false += sc.false_splits
    row = {"scenario": name, "draws": draws, "n": n, "false_splits": rate(false, tested), "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(row), flush=True)
    return row


def run_power(name: str, draws: int, n: int, seed0: int, tree: dict[str, Any], **gen: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    lo, hi = sum(SIZES[:PART]), sum(SIZES[: PART + 1])
    found, agree, tested, false, _sep_found = [], [], 0, 0, []
    for s in range(draws):
        rng = np.random.default_rng(seed0 + s)
        x, g = two_group_paths(n, SIZES, PART, seed=rng, **gen)
        ag = kmeans_agreement(x[:, lo:hi], g, seed=s)
        sc = score_tree(x, SIZES, g, PART, seed=seed0 + s, **tree)
        found.append(sc.found)
        agree.append(ag)
        tested += sc.tested
        false += sc.false_splits
    found, agree = np.array(found), np.array(agree)
    sep = agree >= 0.95
    row = {
        "scenario": name, "draws": draws, "n": n,
        "kmeans_agreement_mean": round(float(agree.mean()), 4),
        "power_all": rate(int(found.sum()), draws),
        "power_kmeans_ge95": rate(int(found[sep].sum()), int(sep.sum())),
        "false_splits": rate(false, tested),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=50, help="seeded draws per scenario")
    ap.add_argument("--n", type=int, default=2000, help="inputs per draw")
    ap.add_argument("--compare", type=int, default=0, help="draws per scenario for the other tests (0: skip)")
    ap.add_argument("--real", default=None, help="a run directory: also structure-free paths from copulas fitted to it")
    ap.add_argument("--real-inputs", type=int, default=2000, help="validation inputs used to fit the real copulas")
    ap.add_argument("--only", default=None, choices=["null", "power"], help="run one half")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    res: dict[str, Any] = {"null": [], "power": [], "compare": [], "real": None}
    if args.only != "power":
        for name, gen in NULLS.items():
            res["null"].append(run_null(name, args.draws, args.n, 0, {}, **gen))
        if args.real:
            cops, names = real_copulas(args.real, args.real_inputs)
            row = run_null(f"copulas fitted to {args.real}", args.draws, args.n, 0, {}, copulas=cops)
            row["layers_sizes"] = [c.rates.size for c in cops]
            res["real"] = {**row, "layers": names, "rates": [np.round(c.rates, 3).tolist() for c in cops]}
    if args.only != "null":
        for name, gen in POWER.items():
            res["power"].append(run_power(name, args.draws, args.n, 10_000, {}, **gen))
    for name, opts in COMPARE.items() if args.compare else ():
        res["compare"].append({
            "test": name,
            "null": run_null("gaussian latent, 2 factors", args.compare, args.n, 0, opts),
            "power_prototypes": run_power("prototypes", args.compare, args.n, 10_000, opts, mode="prototypes"),
            "power_shift_1.5": run_power("shift 1.5", args.compare, args.n, 10_000, opts, separation=1.5),
        })
    res["settings"] = {"sizes": SIZES, "part_layer": PART, "tree": "decision_tree defaults (copula, alpha 0.01, 99 draws, test_samples 2000), max_samples None"}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["env"] = {**git_state(), "python": platform.python_version(), "machine": "2-core development CPU",
                  "command": " ".join(["python", *sys.argv])}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.json), json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
