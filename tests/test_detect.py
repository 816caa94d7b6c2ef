"""Tests of nd_plugin.detect: attacks, the path detector, baselines, metrics, `nd detect` errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import nd_plugin
from nd_plugin.detect import (
    ATTACKS,
    MahalanobisDetector,
    PathDetector,
    PixelSpaceModel,
    Probe,
    attack,
    collect_probe,
    detection_metrics,
    find_feature_layer,
    msp_score,
    run_detection,
    to_normalised,
    to_pixels,
)
from nd_plugin.errors import ConfigError, DetectionError, NDError, RunDirError, UnknownAttackError

pytest.importorskip("torchattacks")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class Tiny(nn.Module):
    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


def _toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of 8×8 images: which colour channel is brightened. Normalised like CIFAR."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    px = 0.7 * torch.rand(n, 3, 8, 8, generator=g)
    px[torch.arange(n), y] += 0.3
    return to_normalised(px, MEAN, STD), y


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and much faster on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dm():
    torch.manual_seed(0)
    net = Tiny()
    x, y = _toy_data(256, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(30):  # a few steps: a classifier whose predictions depend on the input
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    model = nd_plugin.wrap(net.eval(), torch.randn(1, 3, 8, 8), sites="all")
    for site in model.sites():  # non-trivial gates: ACMs that actually read their input
        nn.init.normal_(site.acm.fc1.weight, std=1.0)
        nn.init.normal_(site.acm.fc2.weight, std=3.0)
        nn.init.constant_(site.acm.fc2.bias, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def clean(dm):
    x, _ = _toy_data(160, seed=1)
    with torch.no_grad():
        y = dm(x).argmax(1)  # labels the model agrees with: a "clean" set it classifies correctly
    assert len(set(y.tolist())) == 3
    return x, y


# ------------------------------------------------------------------ metrics


def test_detection_metrics_hand_made():
    clean = np.array([0.1, 0.2, 0.3, 0.4])
    adv = np.array([0.35, 0.5, 0.6, 0.7])
    m = detection_metrics(clean, adv)
    assert m["auroc"] == pytest.approx(15 / 16)  # one of 16 pairs is mis-ordered
    assert m["tpr_at_fpr"] == pytest.approx(0.75)  # at FPR 0, 3 of 4 attacks are above every clean
    assert detection_metrics(adv, clean)["auroc"] == pytest.approx(1 / 16)
    ties = detection_metrics(np.zeros(5), np.zeros(5))
    assert ties["auroc"] == 0.5


def test_detection_metrics_perfect_and_empty():
    assert detection_metrics(np.arange(10.0), np.arange(10.0) + 100) == {"auroc": 1.0, "tpr_at_fpr": 1.0}
    with pytest.raises(DetectionError, match="non-empty"):
        detection_metrics(np.array([]), np.array([1.0]))


def test_msp_score():
    s = msp_score(np.array([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0]]))
    assert s[0] == pytest.approx(2 / 3) and s[1] == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ attacks


def test_normalisation_round_trip():
    x = torch.rand(4, 3, 5, 5)
    assert torch.allclose(to_pixels(to_normalised(x, MEAN, STD), MEAN, STD), x, atol=1e-6)
    m = PixelSpaceModel(nn.Identity(), MEAN, STD)
    assert torch.allclose(m(x), to_normalised(x, MEAN, STD))


@pytest.mark.parametrize("name", ["fgsm", "pgd", "bim", "mifgsm"])
def test_linf_attack_budget_range_and_normalisation(dm, clean, name):
    x, y = clean[0][:8], clean[1][:8]
    state = torch.random.get_rng_state()
    adv = attack(dm, x, y, name, 8 / 255, mean=MEAN, std=STD, steps=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # no global RNG consumed
    assert adv.shape == x.shape and not dm.training
    px, pa = to_pixels(x, MEAN, STD), to_pixels(adv, MEAN, STD)
    assert pa.min() >= -1e-5 and pa.max() <= 1 + 1e-5  # returned normalised, valid pixels
    assert (pa - px).abs().max() <= 8 / 255 + 1e-5
    assert (pa - px).abs().max() > 1 / 255  # it did move
    again = attack(dm, x, y, name, 8 / 255, mean=MEAN, std=STD, steps=3)
    assert torch.allclose(adv, again)  # seeded


def test_attack_flips_predictions(dm, clean):
    x, y = clean[0][:32], clean[1][:32]
    adv = attack(dm, x, y, "pgd", 0.3, mean=MEAN, std=STD, steps=5)
    with torch.no_grad():
        assert (dm(adv).argmax(1) != y).float().mean() > 0.3


def test_attack_keeps_training_mode(dm, clean):
    dm.train()
    try:
        attack(dm, clean[0][:4], clean[1][:4], "fgsm", 0.03, mean=MEAN, std=STD)
        assert dm.training
    finally:
        dm.eval()


@pytest.mark.parametrize("name", ["cw", "deepfool"])
def test_minimum_norm_attacks_run(dm, clean, name):
    x, y = clean[0][:3], clean[1][:3]
    adv = attack(dm, x, y, name, 8 / 255, mean=MEAN, std=STD, steps=1)
    pa = to_pixels(adv, MEAN, STD)
    assert adv.shape == x.shape and pa.min() >= -1e-5 and pa.max() <= 1 + 1e-5


def test_attack_bad_input(dm, clean):
    x, y = clean[0][:2], clean[1][:2]
    with pytest.raises(UnknownAttackError, match="known attacks: fgsm, pgd"):
        attack(dm, x, y, "jsma2", 0.03, mean=MEAN, std=STD)
    for eps in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"eps must be in \(0, 1\]"):
            attack(dm, x, y, "fgsm", eps, mean=MEAN, std=STD)
    with pytest.raises(ConfigError, match="not \\[0, 1\\]"):
        attack(dm, x * 10, y, "fgsm", 0.03, mean=MEAN, std=STD)
    assert issubclass(UnknownAttackError, NDError)
    assert set(ATTACKS) >= {"fgsm", "pgd", "cw", "deepfool"}


# ------------------------------------------------------------------ probes and detectors


def test_feature_layer_skips_acm_linears(dm, clean):
    assert find_feature_layer(dm.model, clean[0][:2]) == "fc"
    with pytest.raises(DetectionError, match="no nn.Linear"):
        find_feature_layer(nn.Sequential(nn.Conv2d(3, 2, 1)), clean[0][:2])


def test_probe_hooks_removed_and_gates_vary(dm, clean):
    x, y = clean
    probe = collect_probe(dm, [(x[:100], y[:100]), (x[100:], y[100:])], feature_layer="fc")
    assert len(probe) == 160 and probe.features.shape == (160, 16)
    for g, z in zip(probe.gates, probe.z):
        assert np.array_equal(g, z > 0)  # the path is the binarised gate logits
        assert 0.05 < g.mean() < 0.95  # non-trivial gates
    for m in dm.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_path_detector_scores_and_separates_noise(dm, clean, tmp_path):
    x, y = clean
    det = PathDetector(knn_per_class=32, k=3).fit(dm, [(x[:100], y[:100]), (x[100:], y[100:])])
    s = det.score(x[:10])
    assert s.overall.shape == (10,) and s.per_layer.shape == (10, len(dm.site_names))
    assert np.array_equal(s.preds, y[:10].numpy())
    # inputs far from the clean distribution score higher under every variant
    g = torch.Generator().manual_seed(2)
    odd = to_normalised((torch.rand(40, 3, 8, 8, generator=g) > 0.5).float(), MEAN, STD)
    c_probe, o_probe = collect_probe(dm, x), collect_probe(dm, odd)
    for method in PathDetector.METHODS:
        for combine in PathDetector.COMBINES:
            cs = det.score_probe(c_probe, method=method, combine=combine).overall
            os_ = det.score_probe(o_probe, method=method, combine=combine).overall
            assert np.isfinite(cs).all() and np.isfinite(os_).all()
            assert detection_metrics(cs, os_)["auroc"] > 0.6, (method, combine)
    # save / load (npz, no pickle) gives the same scores
    det.save(tmp_path / "detector.npz", data="synthetic")
    back = PathDetector.load(tmp_path / "detector.npz", dm)
    assert back.meta == {"data": "synthetic"}
    assert np.allclose(back.score(x[:10]).overall, s.overall)
    with np.load(tmp_path / "detector.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


def test_path_detector_errors(dm, clean, tmp_path):
    with pytest.raises(DetectionError, match="not fitted"):
        PathDetector().score(clean[0][:2])
    with pytest.raises(ConfigError, match="unknown path score"):
        PathDetector(method="cosine")
    with pytest.raises(DetectionError, match="true labels"):
        PathDetector().fit(dm, clean[0][:20])  # a bare tensor has no labels
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(RunDirError, match="not a saved PathDetector"):
        PathDetector.load(tmp_path / "bad.npz")


def test_mahalanobis_baseline(dm, clean, tmp_path):
    x, y = clean
    maha = MahalanobisDetector().fit(dm, [(x, y)])
    assert maha.feature_layer == "fc"
    s = maha.score(x[:8])
    assert s.shape == (8,) and (s >= 0).all()
    far = maha.score(x[:8] * 5)
    assert far.mean() > s.mean()
    maha.save(tmp_path / "m.npz")
    assert np.allclose(MahalanobisDetector.load(tmp_path / "m.npz", dm).score(x[:8]), s)
    for m in dm.modules():
        assert not m._forward_hooks


def test_probe_select_and_concat(dm, clean):
    p = collect_probe(dm, clean[0][:6])
    both = Probe.concat([p.select(np.arange(3)), p.select(np.arange(3, 6))])
    assert np.array_equal(both.logits, p.logits) and (both.labels == -1).all()


# ------------------------------------------------------------------ run_detection / nd detect


def test_run_detection_validates_before_loading(tmp_path):
    with pytest.raises(UnknownAttackError, match="known attacks"):
        run_detection(tmp_path, attack="nope")
    with pytest.raises(ConfigError, match="eps must be"):
        run_detection(tmp_path, eps=2.0)
    with pytest.raises(RunDirError, match="no config.json"):
        run_detection(tmp_path)


def _fake_run(tmp_path, dm):
    """A run directory whose model and data are replaced by the tiny ones (monkeypatched)."""
    (tmp_path / "config.json").write_text(json.dumps({"model": "tiny", "num_classes": 3, "data": "tiny",
                                                     "mean": list(MEAN), "std": list(STD)}))
    return tmp_path


class _Bundle:
    def __init__(self, x, y):
        from torch.utils.data import TensorDataset

        self.train = TensorDataset(x, y)
        self.val = TensorDataset(x, y)
        self.mean, self.std = MEAN, STD


def test_run_detection_end_to_end(dm, clean, tmp_path, monkeypatch):
    from nd_plugin.run import Run

    x, y = clean
    monkeypatch.setattr(Run, "build_model", lambda self, device="cpu", **kw: dm)
    monkeypatch.setattr(Run, "data", lambda self, spec=None, **kw: _Bundle(x, y))
    run = _fake_run(tmp_path, dm)
    res = run_detection(run, attack="pgd", eps=0.3, n=60, steps=3, fit_n=160, batch_size=30)
    assert res.correct == 60 and 0 < res.successful <= 80
    assert res.success_rate == pytest.approx(res.successful / res.correct, abs=1e-4)
    assert set(res.detectors) == {"path", "mahalanobis", "max_softmax"}
    out = json.loads((tmp_path / "detect" / "pgd-eps0.3" / "detect.json").read_text())
    assert 0 <= out["detectors"]["path"]["auroc"] <= 1 and "tpr_at_5fpr" in out["detectors"]["path"]
    for f in res.figures:
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "detector.npz").is_file()  # fitted from the training split and saved
    # a second run reuses the saved detector
    again = run_detection(run, attack="pgd", eps=0.3, n=60, steps=3, batch_size=30, figures=False, out=tmp_path / "o")
    assert again.detectors["path"] == res.detectors["path"]


def test_run_detection_zero_success(dm, clean, tmp_path, monkeypatch):
    from nd_plugin.run import Run

    x, y = clean
    monkeypatch.setattr(Run, "build_model", lambda self, device="cpu", **kw: dm)
    monkeypatch.setattr(Run, "data", lambda self, spec=None, **kw: _Bundle(x, y))
    with pytest.raises(DetectionError, match=r"succeeded on none .*\(success rate 0\)"):
        run_detection(_fake_run(tmp_path, dm), attack="fgsm", eps=1e-6, n=30, fit_n=160, figures=False)


def test_cli_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from nd_plugin.cli._app import app

    runner = CliRunner()
    for args, msg in (
        (["detect", str(tmp_path), "--attack", "nope"], "known attacks"),
        (["detect", str(tmp_path), "--eps", "0"], "eps must be in (0, 1]"),
        (["detect", str(tmp_path / "missing")], "does not exist"),
    ):
        r = runner.invoke(app, args)
        assert r.exit_code != 0
        text = r.output.strip()
        assert msg in text and "Traceback" not in text and len(text.splitlines()) == 1, text
