"""Deployment: the static record (gates dropped, filters kept by on-frequency, rounded to blocks),
mixed records, and the per-layer decision by measured cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import decoupled

from nd_plugin.errors import ConfigError
from nd_plugin.pruning import apply_record, dynamic_runtime, keep_count, mix_records, plan_record, static_record
from nd_plugin.pruning.deploy import plan_deployment
from nd_plugin.utilities import accuracy


@pytest.fixture(scope="module", params=["tiny", "cifar:resnet20"])
def model(request):
    return decoupled(request.param)


def _frequency(stats, site: str) -> np.ndarray:
    return stats.frequency()[stats.layer_slice(site)]


def test_static_record_keeps_filters_on_for_most_inputs(model) -> None:
    dm, stats, _ = model
    record = static_record(dm, stats)
    assert record.static == record.sites and record.dynamic == []
    for site in record.sites:
        freq = _frequency(stats, site)
        expected = [i for i, f in enumerate(freq) if f > 0.5] or [int(np.argmax(freq))]
        assert record.kept[site] == expected


@pytest.mark.parametrize("block", [4, 8])
def test_static_record_rounds_to_blocks_by_frequency(model, block: int) -> None:
    dm, stats, _ = model
    record = static_record(dm, stats, round_to=block)
    for site in record.sites:
        freq = _frequency(stats, site)
        kept = record.kept[site]
        assert len(kept) % block == 0 or len(kept) == len(freq)
        dropped = sorted(set(range(len(freq))) - set(kept))
        if dropped:  # the most frequently on filters are the ones kept
            assert freq[kept].min() >= freq[dropped].max()


def test_static_compact_model_has_no_gates_and_runs(model) -> None:
    dm, stats, x = model
    compact = apply_record(dm, static_record(dm, stats, round_to=4))
    assert list(compact.gate_sites) == []
    with torch.no_grad():
        assert compact(x[:3]).shape == (3, 10)


@pytest.mark.parametrize(
    ("count", "block", "expected"),
    [(0, 8, 8), (3, 8, 8), (4, 8, 8), (11, 8, 8), (12, 8, 16), (16, 8, 16), (5, 1, 5), (0, 1, 1)],
)
def test_keep_count_rounds_half_up_within_width(count: int, block: int, expected: int) -> None:
    freq = torch.tensor([0.9] * count + [0.1] * (16 - count))
    assert keep_count(freq, 0.5, block) == expected


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_round_to_must_be_a_positive_integer(model, bad) -> None:
    dm, stats, _ = model
    with pytest.raises(ConfigError, match="round_to must be a positive integer"):
        static_record(dm, stats, round_to=bad)


def test_mix_records_takes_chosen_layers_from_the_static_record(model) -> None:
    dm, stats, _ = model
    dynamic, static = plan_record(dm, stats), static_record(dm, stats)
    chosen = dynamic.dynamic[:1]
    mixed = mix_records(dynamic, static, chosen)
    assert set(chosen) <= set(mixed.static)
    for site in mixed.sites:
        assert mixed.kept[site] == (static.kept[site] if site in chosen else dynamic.kept[site])
    with pytest.raises(ConfigError, match="does not gate"):
        mix_records(dynamic, static, ["no.such.layer"])


@pytest.mark.parametrize(("margin", "mode"), [(1.0, "static"), (-1e9, "dynamic")])
def test_plan_deployment_follows_the_measured_comparison(model, margin: float, mode: str) -> None:
    dm, stats, x = model
    dynamic = plan_record(dm, stats)
    plan = plan_deployment(dm, stats, x[:3], repeats=2, margin=margin)
    gated = [d for d in plan.decisions if d.site in dynamic.dynamic]
    assert gated and {d.mode for d in gated} == {mode}
    assert all(d.dynamic_ms is not None and d.static_ms > 0 for d in gated)
    expected = dynamic.dynamic if mode == "dynamic" else []
    assert plan.record.dynamic == expected
    rt = dynamic_runtime(apply_record(dm, plan.record))
    ref = apply_record(dm, plan.record)
    with torch.no_grad():
        assert torch.allclose(rt(x[:1]), ref(x[:1]), rtol=1e-4, atol=1e-4)
        assert torch.allclose(rt(x[:4]), ref(x[:4]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tolerance", [0.0, 0.999])
def test_a_guard_keeps_the_gates_whose_static_layer_loses_accuracy(tolerance: float) -> None:
    """Every static unit made "faster" (margin 1), labels the gated model's own predictions (top-1
    100%): with tolerance 0 a layer goes static only if no prediction changes; with 0.999 all go."""
    dm, stats, x = decoupled("cifar:resnet20")
    with torch.no_grad():
        y = dm(x).argmax(1)
    guard = [(x[:16], y[:16]), (x[16:], y[16:])]
    plan = plan_deployment(dm, stats, x[:3], repeats=2, margin=1.0, guard=guard, match_tolerance=tolerance)
    gated = [d for d in plan.decisions if d.dynamic_ms is not None]
    assert plan.gated_top1 == 1.0 and plan.guard_inputs == len(x) and all(d.top1 is not None for d in gated)
    for d in gated:  # each layer went static exactly when its trial kept the accuracy
        assert (d.mode == "static") == (d.top1 >= 1.0 - tolerance)
        assert ("the model loses" in d.reason) == (d.mode == "dynamic")
    # the model decided (the mixed record, structurally pruned) has the top-1 the guard measured
    assert accuracy(apply_record(dm, plan.record), guard) == plan.top1 >= 1.0 - tolerance
    if tolerance == 0.0:  # the synthetic third of dynamic filters: some layer needs its gate
        assert any(d.mode == "dynamic" for d in gated)
    else:
        assert plan.record.dynamic == [] and plan.to_dict()["top1"] == plan.top1


def test_without_a_guard_the_decision_is_by_time_alone() -> None:
    dm, stats, x = decoupled("cifar:resnet20")
    dm.train()
    plan = plan_deployment(dm, stats, x[:3], repeats=2, margin=1.0)
    assert plan.record.dynamic == [] and plan.gated_top1 is None and plan.guard_inputs == 0
    assert dm.training  # the graph traced in eval mode, the model handed back as it came


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"match_tolerance": -0.1}, "match_tolerance"),
        ({"guard": []}, "guard"),
        ({"static": "other"}, "static"),
    ],
)
def test_plan_deployment_refuses_bad_settings(kwargs: dict, param: str) -> None:
    dm, stats, x = decoupled("tiny")
    if kwargs.get("static") == "other":
        other, other_stats, _ = decoupled("cifar:resnet20")
        kwargs["static"] = static_record(other, other_stats)
    with pytest.raises(ConfigError, match=f"^{param} must") as info:
        plan_deployment(dm, stats, x[:3], repeats=2, **kwargs)
    assert info.value.params == (param,)
