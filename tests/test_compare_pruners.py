"""The FLOPs matching of ``benchmarks/compare_pruners.py`` (torch-pruning baselines vs decoupling)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def cp():
    """The benchmark script as a module (it imports ``_suite`` from its own folder)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("compare_pruners")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_match_flops_hits_target_on_internal_channels(cp) -> None:
    from nd_plugin.adapters import create_model
    from nd_plugin.flops import count_flops

    torch.manual_seed(0)
    model = create_model("cifar:resnet20", num_classes=10).eval()
    size = (3, 32, 32)
    original = count_flops(model, size)
    scope = cp.prunable_scope(model, torch.zeros(1, *size), "internal")
    assert scope and all(name.endswith("conv1") and name.startswith("layer") for name in scope)
    target = original / 2
    pruned, ratio, flops = cp.match_flops(model, cp.PRUNERS["l1"][1](), target, size, scope=scope, tol=0.02)
    assert abs(flops / target - 1) <= 0.02
    assert 0 < ratio < 1
    assert count_flops(model, size) == original  # the model itself is untouched
    assert pruned(torch.randn(2, *size)).shape == (2, 10)
    # only internal channels were removed: the residual stream and the classifier keep their width
    widths = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert widths["conv1"] == 16 and widths["layer3.2.conv2"] == 64
    assert pruned.linear.in_features == 64


def test_plot_and_verdict_from_json_rows(cp) -> None:
    rows = [
        cp.Result("fine-tuned (unpruned)", "fine-tuned", 40e6, 40e6, 1.0, 0.90),
        cp.Result("decoupling R=0.35", "decoupling", 21e6, 25e6, 40 / 21, 0.88),
        cp.Result("tp L1", "l1", 21.2e6, 21.2e6, 40 / 21.2, 0.86, 21e6, "decoupling R=0.35", 0.5, True),
        cp.Result("tp L1", "l1", 20.1e6, 20.1e6, 40 / 20.1, 0.85, 20e6, "2x", 0.55, True),
    ]
    v = cp.verdict(rows)
    assert v["within_15pct"] and v["at_its_flops"]["decoupling_at_least_as_good"]
    assert v["at_2x"]["margin"] == pytest.approx(0.03)
    fig = cp.plot([r.__dict__ for r in rows])
    assert fig.axes[0].get_xlabel().startswith("FLOPs reduction")
