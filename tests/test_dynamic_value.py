"""The dynamic value: gated top-1 minus the top-1 of the static network with the same FLOPs.

Checked by hand on a bias- and norm-free three-conv net (FLOPs written out), against fvcore on the
structurally pruned model, and on models whose gates are forced so that the gated and the static
network coincide (value exactly 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import decoupled, real_images
from torch import nn

import nd_plugin
from nd_plugin.errors import ConfigError
from nd_plugin.flops import count_flops, expected_flops
from nd_plugin.paths import PathStats
from nd_plugin.pruning import (
    DynamicValue,
    PruneRecord,
    StaticFlops,
    apply_record,
    dynamic_value,
    fixed_gates,
    match_accuracy,
    match_static,
    prune,
    static_record,
)
from nd_plugin.pruning.synthetic import synthetic_gates
from nd_plugin.pruning.value import describe, static_ranking
from nd_plugin.utilities import accuracy


class HandNet(nn.Module):
    """stem 3->4, c1 4->6, c2 6->8 (3x3, padding 1, no bias, no norm) on 4x4 inputs, GAP, fc 8->2."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.c1 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def hand_flops(k1: int, k2: int) -> int:
    """FLOPs of HandNet keeping k1 filters of c1 and k2 of c2 (16 positions, 9 taps).

    fvcore also counts one FLOP per element of the global average pool (16 * 8), which neither the
    expected nor the static count scales with the kept channels (the pool is not a consumer).
    """
    return 16 * 9 * (3 * 4 + 4 * k1 + k1 * k2) + 16 * 8 + k2 * 2


def _hand_model() -> nd_plugin.DecoupledModel:
    torch.manual_seed(0)
    dm = nd_plugin.wrap(HandNet().eval(), torch.zeros(1, 3, 4, 4))
    assert dm.site_names == ["c1", "c2"]
    return dm.eval()


def _stats(freq: list[list[float]], names: list[str], n: int = 10) -> PathStats:
    counts = np.concatenate([np.round(np.asarray(f) * n) for f in freq]).astype(np.int64)
    return PathStats(names, [len(f) for f in freq], n, counts, counts[None], np.array([n]))


def _loader(x: torch.Tensor, y: torch.Tensor, batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


@pytest.mark.parametrize("k1,k2", [(6, 8), (1, 1), (3, 5), (6, 2), (2, 7)])
def test_static_flops_by_hand(k1: int, k2: int) -> None:
    dm = _hand_model()
    counter = StaticFlops(dm)
    keep = np.zeros(14, dtype=bool)
    keep[:k1] = True
    keep[6 : 6 + k2] = True
    assert counter(keep) == pytest.approx(hand_flops(k1, k2), rel=1e-12)
    assert counter.dense == hand_flops(6, 8) == count_flops(dm.unwrapped(), (3, 4, 4))


# on-frequencies with no ties: c1 ranked 0.9 0.8 0.7 0.6 0.3 0.1, c2 1.0 0.95 0.85 0.5 0.4 0.2 0.05 0.0
FREQ = [[0.9, 0.1, 0.7, 0.3, 0.8, 0.6], [0.0, 1.0, 0.4, 0.85, 0.05, 0.2, 0.95, 0.5]]


def test_ranking_keeps_each_layers_best_first_then_by_frequency() -> None:
    stats = _stats(FREQ, ["c1", "c2"], n=20)
    always, order = static_ranking(stats)
    assert always.tolist() == [0, 6 + 1]
    freq = stats.frequency()
    assert np.all(np.diff(freq[order]) <= 0)
    assert sorted(always.tolist() + order.tolist()) == list(range(14))


@pytest.mark.parametrize("k", range(0, 13))
def test_match_picks_the_most_often_on_filters_for_a_hand_target(k: int) -> None:
    """The target is a static network's FLOPs by hand: the match keeps exactly its filters."""
    dm = _hand_model()
    stats = _stats(FREQ, ["c1", "c2"], n=20)
    always, order = static_ranking(stats)
    want = np.zeros(14, dtype=bool)
    want[always] = True
    want[order[:k]] = True
    k1, k2 = int(want[:6].sum()), int(want[6:].sum())
    keep, flops = match_static(dm, stats, hand_flops(k1, k2))
    assert flops == pytest.approx(hand_flops(k1, k2), rel=1e-12)
    assert np.array_equal(keep, want)


@pytest.mark.parametrize("target", [0.0, 1e12])
def test_match_outside_the_range_returns_the_nearest_end(target: float) -> None:
    dm = _hand_model()
    stats = _stats(FREQ, ["c1", "c2"], n=20)
    keep, flops = match_static(dm, stats, target)
    assert flops == pytest.approx(hand_flops(1, 1) if target == 0 else hand_flops(6, 8), rel=1e-12)
    assert int(keep.sum()) == (2 if target == 0 else 14)


@pytest.mark.parametrize("kind", ["tiny", "cifar:resnet20"])
@pytest.mark.parametrize("seed", [0, 1])
def test_static_flops_and_outputs_equal_the_structurally_pruned_model(kind: str, seed: int) -> None:
    """Fixed 0/1 gates are the static compact model: the same outputs and fvcore's FLOPs."""
    dm, stats, x = decoupled(kind, seed=seed)
    rng = np.random.default_rng(seed)
    keep = rng.random(dm.num_filters) < 0.6
    for i in range(len(dm.site_names)):  # a layer keeps at least one filter
        keep[stats.layer_slice(i).start] = True
    kept = {name: np.flatnonzero(keep[stats.layer_slice(name)]).tolist() for name in dm.site_names}
    record = PruneRecord(
        tolerance=0.0,
        sites=list(dm.site_names),
        original_channels={s.name: s.channels for s in dm.gate_sites},
        kept=kept,
        static=list(dm.site_names),
    )
    static = apply_record(dm, record)
    # fvcore's one FLOP per pooled element of the removed channels is the only difference (< 0.2%)
    assert StaticFlops(dm)(keep) == pytest.approx(count_flops(static, static.input_size), rel=2e-3)
    with torch.no_grad(), fixed_gates(dm, keep):
        masked = dm(x)
    with torch.no_grad():
        ref = static(x)
    assert torch.allclose(masked, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    with torch.no_grad():  # the hooks are gone
        assert torch.equal(dm(x), dm(x)) and not torch.equal(dm(x), masked)


def test_fixed_gates_all_on_is_the_original_network() -> None:
    dm, _, x = decoupled("tiny")
    with torch.no_grad(), fixed_gates(dm, np.ones(dm.num_filters, dtype=bool)):
        fixed = dm(x)
    with torch.no_grad(), dm.gates_open():
        assert torch.equal(fixed, dm(x))


@pytest.mark.parametrize("kind", ["tiny", "cifar:resnet20"])
@pytest.mark.parametrize("seed", [0, 3])
def test_value_is_exactly_zero_when_no_filter_is_dynamic(kind: str, seed: int) -> None:
    """Every filter silent or energetic: the gated model *is* the static network of its FLOPs."""
    dm, _, x = decoupled(kind)
    synthetic_gates(dm, x, seed=seed, fractions=(1.0, 1.0, 0.0))
    _, y = real_images()
    stats = dm.paths(_loader(x, y), raw=True)
    freq = stats.frequency()
    assert set(np.unique(freq).tolist()) <= {0.0, 1.0}
    assert all(freq[stats.layer_slice(i)].max() == 1.0 for i in range(len(dm.site_names)))  # no layer all silent
    dv = dynamic_value(dm, stats, _loader(x, y))
    assert dv.value == 0.0 and dv.gated_top1 == dv.static_top1 and dv.agreement == 1.0
    # the kept filters are the compact model's; the FLOPs differ by the pool over removed channels (0.15-0.35% here)
    assert dv.dynamic_share == 0.0 and 0.0 <= dv.flops_mismatch < 5e-3
    assert dv.kept == {name: int(freq[stats.layer_slice(name)].sum()) for name in dm.site_names}
    assert dv.threshold == 1.0 and dv.inputs == len(x) == dv.stats_inputs


@pytest.mark.parametrize("kind", ["tiny", "cifar:resnet20"])
def test_dynamic_value_record(kind: str) -> None:
    dm, stats, x = decoupled(kind)
    _, y = real_images()
    compact = prune(dm, stats)
    gated = expected_flops(compact, stats).total
    dv = dynamic_value(dm, stats, _loader(x, y))
    assert dv.gated_flops == gated  # by default: the exact compact model's expected FLOPs
    assert dv.dynamic_share == nd_plugin.filter_states(stats).shares["dynamic"]
    assert abs(dv.flops_mismatch) < 0.03  # one filter of a tiny net is ~1% of its FLOPs
    with torch.no_grad():
        assert dv.gated_top1 == float((dm(x).argmax(1) == y).float().mean())
    assert sum(dv.kept.values()) < stats.num_filters and all(1 <= dv.kept[s] <= dv.channels[s] for s in dv.kept)
    d = dv.to_dict()
    assert d["value"] == dv.gated_top1 - dv.static_top1
    assert DynamicValue.from_dict(json.loads(json.dumps(d))) == dv
    assert "points" in str(dv) and f"{dv.dynamic_share:.1%}" in str(dv)


@pytest.mark.parametrize("kind", ["tiny", "cifar:resnet20"])
def test_accuracy_match_without_dynamic_filters_is_the_frequency_model(kind: str) -> None:
    """No dynamic filter: the static model at threshold 0.5 is the gated model, matched in one evaluation."""
    dm, _, x = decoupled(kind)
    synthetic_gates(dm, x, seed=0, fractions=(1.0, 1.0, 0.0))
    _, y = real_images()
    stats = dm.paths(_loader(x, y), raw=True)
    m = match_accuracy(dm, stats, _loader(x, y), match_tolerance=0.0)
    assert m.matched and m.threshold == 0.5 and m.top1 == m.gated_top1 and len(m.tried) == 1
    assert m.record.kept == static_record(dm, stats).kept


@pytest.mark.parametrize("round_to", [1, 4])
def test_accuracy_match_scans_down_to_a_static_model_that_does_as_well(round_to: int) -> None:
    """Labels are the gated model's own predictions (gated top-1 100%); the target sits between the
    0.5 model and the widest one, so the scan goes below 0.5, then refines the step above."""
    dm, stats, x = decoupled("cifar:resnet20", seed=0)
    with torch.no_grad():
        y = dm(x).argmax(1)
    batches = _loader(x, y)
    widest = accuracy(apply_record(dm, static_record(dm, stats, threshold=0.0, round_to=round_to)), batches)
    at_half = accuracy(apply_record(dm, static_record(dm, stats, threshold=0.5, round_to=round_to)), batches)
    assert at_half < widest  # seed 0: the wider static model is the closer to the gated one
    tol = 1.0 - (at_half + widest) / 2  # a target strictly between the two
    m = match_accuracy(dm, stats, batches, match_tolerance=tol, round_to=round_to, points=6, refine=3)
    assert m.gated_top1 == 1.0 and m.matched and 0.0 <= m.threshold < 0.5
    scanned = [t for t, _ in m.tried if round(t / 0.1, 9).is_integer()]
    assert scanned == [0.5, 0.4, 0.3, 0.2, 0.1, 0.0][: len(scanned)] and m.tried[0] == [0.5, at_half]
    assert len(m.tried) - len(scanned) == 3  # the refinement
    # the fixed-gate evaluation is the structurally pruned model's
    assert m.top1 == accuracy(apply_record(dm, m.record), batches) >= 1.0 - tol
    # every threshold tried above the answer failed, every one at or below it matched
    assert all((top1 >= 1.0 - tol) == (t <= m.threshold) for t, top1 in m.tried)
    d = m.to_dict()
    assert d["matched"] and d["kept"] == {s: len(k) for s, k in m.record.kept.items()} and d["inputs"] == len(x)


@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_match_out_of_reach_returns_the_best_scanned(seed: int) -> None:
    """Seed 0: the widest static model is the closer to the gated one; seed 1: the 0.5 model is."""
    dm, stats, x = decoupled("cifar:resnet20", seed=seed)
    with torch.no_grad():
        y = dm(x).argmax(1)
    m = match_accuracy(dm, stats, _loader(x, y), match_tolerance=0.0, gated_top1=1.5, points=3)
    assert not m.matched and [t for t, _ in m.tried] == [0.5, 0.25, 0.0]
    best = max(top1 for _, top1 in m.tried)
    assert m.top1 == best and m.threshold == max(t for t, top1 in m.tried if top1 == best)
    assert (m.tried[2][1] > m.tried[0][1]) == (seed == 0)
    assert m.record.kept == static_record(dm, stats, threshold=m.threshold).kept


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"match_tolerance": -0.01}, "^match_tolerance must be in"),
        ({"match_tolerance": 1.0}, "^match_tolerance must be in"),
        ({"match_tolerance": "a lot"}, "^match_tolerance must be a number"),
        ({"start": 1.0}, "^start must be a threshold in"),
        ({"batches": []}, "^batches must hold"),
        ({"points": 1}, "^points must be an integer >= 2"),
        ({"refine": -1}, "^refine must be an integer >= 0"),
        ({"round_to": 0}, "^round_to must be a positive integer"),
    ],
)
def test_accuracy_match_refuses_bad_settings(kwargs: dict, match: str) -> None:
    dm, stats, x = decoupled("tiny")
    _, y = real_images()
    with pytest.raises(ConfigError, match=match) as info:
        match_accuracy(dm, stats, kwargs.pop("batches", _loader(x, y)), **kwargs)
    assert info.value.params == (match.split()[0][1:],)


def test_describe_is_signed_in_points() -> None:
    d = {"value": -0.004, "gated_top1": 0.5, "static_top1": 0.504, "inputs": 250,
         "gated_flops": 1500.0, "static_flops": 1500.0, "dynamic_share": 0.0}
    assert describe(d).startswith("-0.40 points (gated 50.00% vs static 50.40% at 1.50k vs 1.50k FLOPs, 250 inputs)")
    assert "same prediction on 97.2%)" in describe({**d, "agreement": 0.972})


@pytest.mark.parametrize("drop, extra, match", [("c1", None, r"missing \['c1'\], not gated \[\]"), (None, "c9", r"missing \[\], not gated \['c9'\]")])
def test_keep_mapping_must_name_exactly_the_gated_layers(drop, extra, match) -> None:
    dm = _hand_model()
    keep = {name: np.ones(site.channels) for name, site in zip(dm.site_names, dm.gate_sites) if name != drop}
    if extra:
        keep[extra] = np.ones(2)
    with pytest.raises(ValueError, match=match), fixed_gates(dm, keep):
        pass


def test_keep_of_the_wrong_length_is_refused() -> None:
    dm = _hand_model()
    with pytest.raises(ValueError, match="one entry per gated filter"), fixed_gates(dm, np.ones(3)):
        pass


def test_summary_records_the_dynamic_value() -> None:
    from nd_plugin.data import load_data
    from nd_plugin.report.summary import summarize

    dm, _, x = decoupled("tiny")
    data = load_data("synthetic:40")
    stats = dm.paths(data.loader("val", batch_size=16), raw=True)
    summary = summarize(dm, stats, data)
    dv = summary["dynamic_value"]
    assert dv["inputs"] == len(data.val) and dv["gated_flops"] == summary["flops"]["compact_expected"]
    assert dv["gated_top1"] == pytest.approx(summary["top1"])
    assert "dynamic_value" not in summarize(dm, stats)


def test_summary_prune_json_cli_and_report_show_the_dynamic_value(resnet20_run: Path, tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from nd_plugin.cli._prune import print_dynamic_value
    from nd_plugin.commands.analyze import build_report
    from nd_plugin.commands.pruning import prune_run
    from nd_plugin.run import open_run

    summary = json.loads((resnet20_run / "summary.json").read_text())
    recorded = summary["dynamic_value"]
    assert recorded["inputs"] == 10 and recorded["value"] == recorded["gated_top1"] - recorded["static_top1"]
    assert recorded["gated_flops"] == summary["flops"]["compact_expected"]

    result = prune_run(resnet20_run, latency_repeats=1, engines=["eager"])
    on_disk = json.loads((resnet20_run / "prune.json").read_text())["dynamic_value"]
    assert on_disk == result["dynamic_value"]
    for key in ("value", "gated_top1", "static_top1", "gated_flops", "static_flops", "dynamic_share", "kept"):
        assert on_disk[key] == pytest.approx(recorded[key])  # the same model, statistics and split
    assert on_disk["gated_flops"] == result["flops"]["exact_expected"]

    buf = io.StringIO()
    print_dynamic_value(result, Console(file=buf, width=300))
    assert "dynamic value" in buf.getvalue() and f"{100 * on_disk['value']:+.2f} points" in buf.getvalue()

    assert open_run(resnet20_run).dynamic_value() == (recorded, resnet20_run / "summary.json")
    index = build_report(resnet20_run, out=tmp_path / "report", n_permutations=0, num_occlusion_images=0, figures=False)
    page = index.read_text()
    assert "dynamic value" in page and f"{100 * recorded['value']:+.2f} points" in page
    analysis = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert analysis["dynamic_value"]["source"].startswith("recorded in")


def test_prune_matches_the_static_model_to_the_gated_top1(resnet20_run: Path) -> None:
    import io

    from rich.console import Console

    from nd_plugin.cli._prune import print_engines
    from nd_plugin.commands.pruning import prune_run

    result = prune_run(resnet20_run, latency_repeats=1, engines=["eager"], static_match="accuracy", match_tolerance=0.0)
    match, acc = result["static_match"], result["accuracy"]
    assert match["by"] == "accuracy" and match["gated_top1"] == acc["gated"] and match["inputs"] == acc["inputs"]
    assert match["top1"] == acc["static"]  # the fixed-gate evaluation is the exported static model's
    assert match["matched"] == (acc["static"] >= acc["gated"]) and 0.0 <= match["threshold"] <= 0.5
    flops = result["flops"]
    assert sum(match["kept"].values()) <= sum(match["channels"].values()) and flops["static_model"] <= flops["original"]
    eager = result["engines"]["eager/b1"]
    assert eager["static_ms"] > 0 and eager["vs_static"] == pytest.approx(eager["static_ms"] / eager["compact_ms"])
    buf = io.StringIO()
    print_engines(result, Console(file=buf, width=400))
    assert "eager b1: dynamic runtime" in buf.getvalue() and ("the gated top-1 matched" in buf.getvalue()) == match["matched"]
    default = prune_run(resnet20_run, latency_repeats=1, engines=["eager"])
    assert default["static_match"] == {"by": "frequency", "threshold": 0.5, "tolerance": 0.003}


def test_report_measures_the_dynamic_value_when_no_file_records_it(resnet20_run: Path) -> None:
    from nd_plugin.commands.analyze import build_report

    run = resnet20_run  # the fixture's copy is this test's own
    for name in ("summary.json", "prune.json"):
        (run / name).unlink(missing_ok=True)
    build_report(run, n_permutations=0, num_occlusion_images=0, figures=False)
    analysis = json.loads((run / "report" / "analysis.json").read_text())
    dv = analysis["dynamic_value"]
    assert dv["source"].startswith("measured by nd analyze") and dv["inputs"] == 10
    assert build_report(run, n_permutations=0, num_occlusion_images=0, figures=False, dynamic_value=False)
    assert json.loads((run / "report" / "analysis.json").read_text())["dynamic_value"] is None
