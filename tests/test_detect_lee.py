"""Lee et al.'s Mahalanobis baseline (``LeeMahalanobis``) against what their reference code computes.

The reference is pokaxpoka/deep_Mahalanobis_detector (``lib_generation.py``: ``sample_estimator``,
``get_Mahalanobis_score_adv``; ``ADV_Regression.py``), read, not copied. The differences that remain
are listed in docs/notes/detect.md, "Lee et al. against the reference code". Tiny inputs, values
computed by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nd_plugin.detect import LEE_MAGNITUDES, LeeMahalanobis, Probe, evaluate_supervised, lee_splits
from nd_plugin.detect.features import run_pooled

STD = (0.229, 0.224, 0.225)


class _Holder(nn.Module):
    """What ``LeeMahalanobis.scores`` needs of a decoupled model: ``.model`` and a parameter (its device)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net
        self.anchor = nn.Parameter(torch.zeros(1))


class _Pool(nn.Module):
    """One feature site ``layer1`` that passes its input on: the pooled feature is the per-channel pixel mean."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(x)


def _probe(stages: list[np.ndarray], labels: np.ndarray, k: int) -> Probe:
    return Probe(np.zeros((len(labels), k)), labels, [], [], stages=stages)


def test_tied_covariance_and_distance_by_hand():
    # class 0 at 0 and 2 (mean 1), class 1 at 4 and 8 (mean 6): class-centred -1, 1, -2, 2, whose
    # covariance with 1/n (scikit-learn's EmpiricalCovariance, as sample_estimator) is 10/4 = 2.5
    f = np.array([[0.0], [2.0], [4.0], [8.0]])
    lee = LeeMahalanobis(["s"]).fit_probe(_probe([f], np.array([0, 0, 1, 1]), 2))
    assert np.allclose(lee.means[0], [[1.0], [6.0]]) and np.allclose(lee.precisions[0], [[0.4]])
    # the reference fits assume_centered=False on the class-centred features: their mean is 0, same precision
    from sklearn.covariance import EmpiricalCovariance

    centred = f - lee.means[0][[0, 0, 1, 1]]
    assert np.allclose(EmpiricalCovariance(assume_centered=False).fit(centred).precision_, lee.precisions[0])
    # distance to the closest class mean: 3 -> 0.4·(3−1)² = 1.6 (class 0); 10 -> 0.4·(10−6)² = 6.4 (class 1)
    out = lee.score_probe(_probe([np.array([[3.0], [10.0]])], np.array([-1, -1]), 2))
    assert np.allclose(out[:, 0], [1.6, 6.4])


def _hand_lee() -> tuple[LeeMahalanobis, _Holder]:
    lee = LeeMahalanobis(["layer1"])
    lee.means, lee.precisions = [np.array([[0.0, 0.0], [4.0, 4.0]])], [np.eye(2)]
    return lee, _Holder(_Pool()).eval()


def test_preprocessing_step_by_hand():
    lee, dm = _hand_lee()
    # one input, 2 channels of 1×2 pixels: pooled feature f = (1, −0.5), closest mean (0, 0), d = 1.25
    x = torch.tensor([[[[0.8, 1.2]], [[-1.0, 0.0]]]])
    std = (0.5, 0.25)
    s = lee.scores(dm, x, (0.0, 0.1, 2.0), std=std)
    assert s[0.0][0, 0] == pytest.approx(1.25, rel=1e-6)
    # ∇ₓ d = (f − μ₀) per pixel (d = |f − μ₀|², f a mean of 2 pixels): sign (+1, −1). The step
    # −ε·sign/std is (−0.2, +0.4) in normalised units (ε = 0.1 pixel units, std 0.5 and 0.25), so
    # f' = (0.8, −0.1) and d = 0.64 + 0.01 = 0.65. (Multiplying by std instead: 0.9025 + 0.2256;
    # the opposite sign: 1.44 + 0.81.)
    assert s[0.1][0, 0] == pytest.approx(0.65, rel=1e-5)
    # a step past the other class: f' = (1 − 4, −0.5 + 8) = (−3, 7.5); the score is the distance
    # to the closest class *after* the step (class 1: 49 + 12.25), as the reference's max over classes
    assert s[2.0][0, 0] == pytest.approx(61.25, rel=1e-5)


def test_a_zero_gradient_pixel_stays_put():
    """Deliberate difference: sign(0) = 0 here; the reference's ``(grad >= 0)·2 − 1`` would move it by +ε."""
    lee, dm = _hand_lee()
    x = torch.tensor([[[[0.5, -0.5]], [[-1.0, 0.0]]]])  # f = (0, −0.5): ∂d/∂(channel 0) = 0
    s = lee.scores(dm, x, (0.0, 0.1), std=(0.5, 0.25))
    assert s[0.0][0, 0] == pytest.approx(0.25, rel=1e-6)
    assert s[0.1][0, 0] == pytest.approx(0.01, rel=1e-4)  # only channel 1 moves: (0, −0.1); the reference: 0.04 + 0.01


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def stage(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem, self.layer1, self.layer2 = stage(3, 4), stage(4, 6), stage(6, 6, stride=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))

    def upto(self, x: torch.Tensor, l: int) -> torch.Tensor:
        """The reference's ``intermediate_forward``: feature map of site ``l`` (0 stem, 1 layer1, 2 layer2)."""
        out = self.stem(x)
        for stage in (self.layer1, self.layer2)[:l]:
            out = stage(out)
        return out


def _reference_style_scores(net: _Net, lee: LeeMahalanobis, x: torch.Tensor, m: float, std: tuple) -> np.ndarray:
    """``get_Mahalanobis_score_adv`` re-derived: per layer, confidence ``−½ d²``; the closest class of
    the unprocessed input; loss = batch mean of its ``½ d²``; step ``(grad ≥ 0)·2 − 1`` divided by
    the std; score = the largest confidence after the step. Returns ``(N, L)`` confidences."""
    out = []
    inv_std = 1.0 / torch.tensor(std).view(1, -1, 1, 1)
    for l, (mu, prec) in enumerate(zip(lee.means, lee.precisions)):
        mu_t, p_t = torch.tensor(mu, dtype=torch.float32), torch.tensor(prec, dtype=torch.float32)

        def confidence(feat: torch.Tensor, mu_t: torch.Tensor = mu_t, p_t: torch.Tensor = p_t) -> torch.Tensor:
            diff = feat[:, None, :] - mu_t[None]
            return -0.5 * torch.einsum("nkc,cd,nkd->nk", diff, p_t, diff)

        xg = x.clone().requires_grad_(True)
        feat = net.upto(xg, l).flatten(2).mean(2)
        closest = confidence(feat.detach()).argmax(1)
        loss = (-confidence(feat)[torch.arange(len(x)), closest]).mean()
        (grad,) = torch.autograd.grad(loss, xg)
        assert (grad != 0).all(), "a zero gradient: the two sign conventions would differ"
        step = ((grad >= 0).float() * 2 - 1) * inv_std
        with torch.no_grad():
            moved = net.upto(x - m * step, l).flatten(2).mean(2)
            out.append(confidence(moved).max(1).values.numpy())
    return np.stack(out, 1)


def test_scores_match_the_reference_computation():
    torch.manual_seed(0)
    net = _Net().eval()
    layers = ["input:layer1", "layer1", "layer2"]
    x_fit, y_fit = torch.randn(90, 3, 8, 8), torch.arange(90) % 3
    with torch.no_grad():
        stages = [f.numpy() for f in run_pooled(net, x_fit, layers)]
    lee = LeeMahalanobis(layers).fit_probe(_probe(stages, y_fit.numpy(), 3))
    x = torch.randn(16, 3, 8, 8)
    ours = lee.scores(_Holder(net).eval(), x, (0.0, 0.002, 0.01), std=STD, batch_size=5)
    for m in (0.0, 0.002, 0.01):
        ref = _reference_style_scores(net, lee, x, m, STD)
        # ours is the distance d², the reference's feature the confidence −½ d² (an affine map the
        # standardised regression does not see)
        assert np.allclose(ours[m], -2.0 * ref, rtol=1e-4, atol=1e-4), m
    assert not np.allclose(ours[0.01], ours[0.0])  # the step changes the scores


def test_magnitude_ties_go_to_the_first_of_the_reference_list():
    # the reference's m_list order; ADV_Regression keeps the first magnitude with the best validation AUROC
    assert LEE_MAGNITUDES == (0.0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005)
    rng = np.random.default_rng(0)
    c = rng.normal(size=(400, 2))
    weak = c + rng.normal(scale=1.0, size=c.shape) * 0.1  # ε = 0: attacked inputs look like clean ones
    far = c + [10.0, 0.0]  # every ε > 0 separates them perfectly: a tie at AUROC 1
    cands = {m: (c, weak if m == 0.0 else far) for m in LEE_MAGNITUDES}
    r = evaluate_supervised(cands, np.arange(400), lee_splits(400, seeds=2))
    assert r["chosen"] == [0.01, 0.01]  # the reference's choice (sorted ascending, 0.0005 would win)
