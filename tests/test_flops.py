"""FLOPs: fvcore static counts and expected counts from path statistics, against hand computation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nd_plugin
from nd_plugin.flops import count_flops, expected_flops, flops_summary
from nd_plugin.paths import PathStats
from nd_plugin.pruning import prune

H = W = 8


class TwoLayer(nn.Module):
    """Stem (ungated) -> a: 3x3 conv 4->6 (gated) -> b: 1x1 conv 6->5 (gated) -> GAP -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.a = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.b = nn.Conv2d(6, 5, 1, bias=False)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.b(F.relu(self.a(x))))
        return self.fc(x.mean(dim=(2, 3)))


# four inputs; every filter on for some inputs and off for others (all dynamic, nothing removed)
PATHS_A = np.array([[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 1], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=bool)
PATHS_B = np.array([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=bool)


def _setup(raw: bool = True):
    torch.manual_seed(0)
    dm = nd_plugin.wrap(TwoLayer(), torch.randn(1, 3, H, W)).eval()
    assert dm.site_names == ["a", "b"]
    paths = np.concatenate([PATHS_A, PATHS_B], axis=1)
    stats = PathStats(
        site_names=["a", "b"],
        site_channels=[6, 5],
        n=4,
        counts=paths.sum(0).astype(np.int64),
        class_counts=np.zeros((2, 11), dtype=np.int64),
        class_n=np.array([2, 2]),
        paths=paths if raw else None,
        labels=np.zeros(4, dtype=np.int64) if raw else None,
        preds=np.zeros(4, dtype=np.int64) if raw else None,
    )
    return dm, stats, prune(dm, stats)


def test_count_flops_of_a_conv_by_hand() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_flops(conv, (3, H, W)) == 8 * H * W * 3 * 9


def test_expected_flops_by_hand_with_joint_paths() -> None:
    dm, stats, compact = _setup(raw=True)
    assert [s.name for s in compact.gate_sites] == ["a", "b"]
    exp = expected_flops(compact, stats)
    a_on = PATHS_A.sum(1)  # [5, 2, 5, 1]
    b_on = PATHS_B.sum(1)  # [5, 0, 4, 1]
    # a: input is the ungated stem (4 channels), output its active filters
    assert exp.by_module["a.conv"] == pytest.approx(H * W * 9 * 4 * a_on.mean())
    # b: 1x1, input = a's active channels, output = b's active filters, joint over inputs
    assert exp.by_module["b.conv"] == pytest.approx(H * W * 1 * np.mean(a_on * b_on))
    # b's ACM reads a's narrow output: its fc1 (6 -> 1) costs E[a_on] * 1
    assert exp.by_module["b.acm.fc1"] == pytest.approx(a_on.mean() * 1)
    # the classifier reads b's narrow (pooled) output: 2 outputs x E[b_on] inputs
    assert exp.by_module["fc"] == pytest.approx(2 * b_on.mean())
    assert not exp.independence_assumed
    static = {"a.conv": H * W * 9 * 4 * 6, "b.conv": H * W * 6 * 5, "b.acm.fc1": 6, "fc": 10}
    assert exp.static - exp.total == pytest.approx(sum(static[m] - exp.by_module[m] for m in static))


def test_expected_flops_without_raw_paths_assume_independence() -> None:
    _, stats, compact = _setup(raw=False)
    exp = expected_flops(compact, stats)
    a_mean, b_mean = PATHS_A.sum(1).mean(), PATHS_B.sum(1).mean()
    assert exp.by_module["b.conv"] == pytest.approx(H * W * a_mean * b_mean)
    assert exp.independence_assumed


def test_flops_summary_orders_models() -> None:
    dm, stats, compact = _setup()
    summary = flops_summary(dm, compact, stats)
    original = H * W * (3 * 4 * 9 + 4 * 6 * 9 + 6 * 5) + 5 * 2
    assert summary["original"] == original
    assert summary["decoupled"] > summary["original"]  # the ACMs cost a little
    assert summary["compact_expected"] < summary["compact_static"]


def test_ops_fvcore_cannot_count_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    class Spectral(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.conv(x)).flatten(1)
            return torch.fft.fft(y).real + y.mean()

    with caplog.at_level(logging.WARNING, logger="nd_plugin.flops"):
        flops = count_flops(Spectral(), (3, 6, 6))
    assert flops == 4 * 3 * 9 * 16  # the conv alone
    assert "lower bound" in caplog.text and "aten::fft_fft (x1)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nd_plugin.flops"):
        count_flops(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)), (3, 6, 6))
    assert caplog.text == ""  # element-wise and pooling ops cost no multiply-adds: nothing to report
