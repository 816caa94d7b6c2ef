"""Tests of nd_plugin.detect: attacks, the path detector, baselines, metrics, `nd detect` errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import nd_plugin
from nd_plugin._hooks import ForwardHooks
from nd_plugin.commands.detect import run_detection
from nd_plugin.detect import (
    ATTACKS,
    DETECTORS,
    LeeMahalanobis,
    MahalanobisDetector,
    PathDetector,
    PixelSpaceModel,
    Probe,
    UnknownDetectorError,
    attack,
    check_detectors,
    collect_probe,
    detection_metrics,
    evaluate_supervised,
    evaluate_unsupervised,
    find_feature_layer,
    find_stage_layers,
    lee_splits,
    lid_scores,
    msp_score,
    to_normalised,
    to_pixels,
)
from nd_plugin.detect.features import run_pooled
from nd_plugin.detect.protocol import SUPERVISED
from nd_plugin.errors import (
    ConfigError,
    DetectionError,
    NDError,
    RunDirError,
    UnknownAttackError,
)

pytest.importorskip("torchattacks")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class Tiny(nn.Module):
    """Stem and two stages named like a ResNet's (Lee's feature sites: input:layer1, layer1, layer2)."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.stem, self.layer1, self.layer2 = _stage(3, 8), _stage(8, 16), _stage(16, 16)
        self.fc = nn.Linear(16, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


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
    x, _ = _toy_data(480, seed=1)
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
    assert len(probe) == len(x) and probe.features.shape == (len(x), 16)
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
    for method in (m for m in PathDetector.METHODS if m != "mi"):  # mi: the L_mi test below
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


# ------------------------------------------------------------------ features, baselines, protocol


def test_stage_sites_and_truncated_pass(dm):
    assert find_stage_layers(dm.model) == ["input:layer1", "layer1", "layer2"]
    called = []
    with ForwardHooks([dm.model.fc], lambda *_: called.append(1)):
        feats = run_pooled(dm.model, torch.zeros(2, 3, 8, 8), find_stage_layers(dm.model), stop_at=1)
    assert [f.shape[1] for f in feats] == [8, 16] and not called  # stopped before the classifier
    with pytest.raises(DetectionError, match="layers="):
        find_stage_layers(nn.Sequential(nn.Conv2d(3, 2, 1)))


@pytest.mark.parametrize("n, seeds", [(200, 1), (1000, 3)])
def test_lee_splits_partition(n, seeds):
    splits = lee_splits(n, seeds)
    assert len(splits) == seeds
    for fit, val, test in splits:
        assert (len(fit), len(val), len(test)) == (n // 20, n // 20, n - n // 10)
        assert np.array_equal(np.sort(np.concatenate([fit, val, test])), np.arange(n))
    if seeds > 1:
        assert not np.array_equal(splits[0][0], splits[1][0])


def test_evaluate_unsupervised_hand_made():
    clean, adv = np.zeros(400), np.ones(300)  # 300 of 400 attacks succeeded, perfectly separated
    r = evaluate_unsupervised(clean, adv, np.arange(300), lee_splits(400, 3))
    assert (r["auroc"], r["auroc_std"], r["tpr_at_5fpr"], r["seeds"]) == (1.0, 0.0, 1.0, 3)
    r = evaluate_unsupervised(clean, -adv, np.arange(300), lee_splits(400, 2))
    assert r["auroc"] == 0.0


def test_evaluate_unsupervised_means_and_stds_over_the_test_parts():
    """Four clean inputs, attacks of the first three; two test parts whose AUROC and TPR are counted by hand."""
    clean, adv, adv_index = np.array([0.0, 1.0, 2.0, 3.0]), np.array([2.5, 0.5, 3.5]), np.array([0, 1, 2])
    splits = [(np.array([], int), np.array([], int), np.array([0, 1, 2, 3])), (np.array([], int), np.array([], int), np.array([1, 2]))]
    r = evaluate_unsupervised(clean, adv, adv_index, splits)
    # part 1: attacks 2.5, 0.5, 3.5 beat 3, 1, 4 of the 4 clean scores: AUROC 8/12; above every clean score (FPR 0): 1 of 3
    # part 2: clean 1, 2 and their attacks 0.5, 3.5: AUROC 2/4; 1 of 2 attacks above both clean scores
    assert r == {"auroc": round((8 / 12 + 2 / 4) / 2, 4), "auroc_std": round((8 / 12 - 2 / 4) / 2, 4),
                 "tpr_at_5fpr": round((1 / 3 + 1 / 2) / 2, 4), "tpr_at_5fpr_std": round((1 / 2 - 1 / 3) / 2, 4), "seeds": 2}


def test_evaluate_supervised_chooses_informative_feature_and_transfers():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(400, 3))
    shift = np.array([2.5, 0.0, 0.0])
    cands = {"noise": (c, rng.normal(size=(400, 3))), "signal": (c, rng.normal(size=(400, 3)) + shift)}
    r = evaluate_supervised(cands, np.arange(400), lee_splits(400, 2))
    assert r["chosen"] == ["signal"] * 2 and r["auroc"] > 0.9
    # fitted on "signal", tested where the attacks carry no signal: chance
    flat = {k: (c, rng.normal(size=(400, 3))) for k in cands}
    t = evaluate_supervised(cands, np.arange(400), lee_splits(400, 2), test_candidates=flat, test_adv_index=np.arange(400))
    assert abs(t["auroc"] - 0.5) < 0.1


def test_evaluate_supervised_too_few_attacks():
    c = np.random.default_rng(0).normal(size=(100, 2))
    with pytest.raises(DetectionError, match=r"holds 5 attacked .* at least 10 of each: .*200 successful attacks"):
        evaluate_supervised({0: (c, c + 1)}, np.arange(100), lee_splits(100, 1))


@pytest.mark.parametrize("dim", [1, 3])
def test_lid_estimates_intrinsic_dimension(dim):
    rng = np.random.default_rng(dim)
    basis = np.linalg.qr(rng.normal(size=(6, 6)))[0][:, :dim]
    clean = [rng.uniform(size=(400, dim)) @ basis.T]  # a dim-dimensional patch in 6-D
    adv = [clean[0][:100] + 0.05 * rng.normal(size=(100, 6))]  # pushed off it
    out = lid_scores(clean, adv, np.arange(100), ks=(20,), batch_size=200)[20]
    assert abs(np.median(out[0]) - dim) < 0.5 * dim + 0.3
    assert np.median(out[1]) > np.median(out[0]) + 0.5


def test_lee_mahalanobis_fit_preprocessing_and_round_trip(dm, clean, tmp_path):
    x, y = clean
    lee = LeeMahalanobis().fit(dm, [(x, y)])
    assert lee.layers == ["input:layer1", "layer1", "layer2"] and [m.shape for m in lee.means] == [(3, 8), (3, 16), (3, 16)]
    s = lee.scores(dm, x[:64], (0.0, 0.01), std=STD)
    assert s[0.0].shape == (64, 3) and (s[0.0] >= 0).all()
    # the preprocessing step moves inputs towards their closest class: most distances shrink
    assert (s[0.01] < s[0.0]).mean() > 0.8 and (s[0.01].mean(0) < s[0.0].mean(0)).all()
    far = lee.scores(dm, x[:64] * 4, (0.0,), std=STD)[0.0]
    assert (far.mean(0) > s[0.0].mean(0)).all()
    lee.save(tmp_path / "lee.npz")
    back = LeeMahalanobis.load(tmp_path / "lee.npz")
    assert np.allclose(back.scores(dm, x[:8], (0.01,), std=STD)[0.01], s[0.01][:8])


def test_path_scores_all_class_mi_and_features(dm, clean):
    x, y = clean
    probe = collect_probe(dm, [(x, y)])
    k = 3
    mi = [np.random.default_rng(l).normal(size=(k, g.shape[1])) for l, g in enumerate(probe.gates)]
    det = PathDetector(knn_per_class=32, k=3).fit_probe(probe, dm.site_names, mi_weights=mi)
    def raw(m: str) -> np.ndarray:
        return det._overall(probe, m, probe.preds)

    assert (raw("joint_min") <= raw("joint") + 1e-9).all() and (raw("joint_margin") >= -1e-9).all()
    feats = det.path_features(probe)
    L = len(dm.site_names)
    assert feats.shape == (len(probe), L * 2 * k)
    gauss = det._raw(probe, "gauss", probe.preds)
    for l in range(L):  # the distance to the predicted class is the gauss score; posteriors are log-probabilities
        block = feats[:, l * 2 * k : (l + 1) * 2 * k]
        assert np.allclose(block[np.arange(len(probe)), probe.preds], gauss[:, l], atol=1e-6)
        assert np.allclose(np.exp(block[:, k:]).sum(1), 1.0)
    # the L_mi posteriors are the given classifiers' softmax over the binary path
    logit = probe.gates[0].astype(float) @ mi[0].T
    expect = -(logit[np.arange(len(probe)), probe.preds] - np.log(np.exp(logit).sum(1)))
    assert np.allclose(det._raw(probe, "mi", probe.preds)[:, 0], expect)
    with pytest.raises(DetectionError, match="without the L_mi classifiers"):
        PathDetector().fit_probe(probe, dm.site_names).score_probe(probe, method="mi")
    # path_supervised_full reads both: the per-layer features, then the raw soft path, nothing else
    from nd_plugin.detect.protocol import FittedDetectors, detector_features

    fitted = FittedDetectors(path=det, penultimate=None, lee=None, meta={})
    out = detector_features(fitted, dm, x, probe, std=STD, detectors=["path_supervised_full", "path_supervised_raw"])
    assert out["path_supervised_full"].shape == (len(probe), L * 2 * k + sum(z.shape[1] for z in probe.z))
    assert np.array_equal(out["path_supervised_full"][:, : L * 2 * k], feats)
    assert np.array_equal(out["path_supervised_full"][:, L * 2 * k :], out["path_supervised_raw"])


def test_path_preprocessing_moves_paths_towards_a_class(dm, clean):
    x, y = clean
    det = PathDetector(knn_per_class=32, k=3).fit(dm, [(x, y)])
    moved = det.preprocess(x[:64], (0.0, 0.02), std=STD)
    d0, d1 = (det._overall(moved[m], "joint_min", moved[m].preds) for m in (0.0, 0.02))
    assert np.allclose(moved[0.0].logits, collect_probe(dm, x[:64]).logits, atol=1e-5)  # magnitude 0: the inputs as they are
    assert d1.mean() < d0.mean() and (d1 < d0).mean() > 0.7
    for m in dm.modules():
        assert not m._forward_hooks


# ------------------------------------------------------------------ run_detection / nd detect


def test_run_detection_validates_before_loading(tmp_path):
    with pytest.raises(UnknownAttackError, match="known attacks"):
        run_detection(tmp_path, attack="nope")
    with pytest.raises(ConfigError, match="eps must be"):
        run_detection(tmp_path, eps=2.0)
    with pytest.raises(UnknownDetectorError, match="known detectors: path, path_supervised"):
        run_detection(tmp_path, detectors=["path", "odin"])
    with pytest.raises(UnknownAttackError):
        run_detection(tmp_path, transfer_from=("jsma2", 0.1))  # JSMA itself is a torchattacks attack
    with pytest.raises(RunDirError, match="no config.json"):
        run_detection(tmp_path)
    assert check_detectors(None) == list(DETECTORS)


def _fake_run(tmp_path, dm, checkpoint: bool = True):
    """A run directory with a real config and checkpoint; its model and data are the tiny ones (monkeypatched)."""
    cfg = {"model": "tiny", "num_classes": 3, "data": "tiny", "input_size": [3, 8, 8], "sites": dm.site_names,
           "mean": list(MEAN), "std": list(STD)}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if checkpoint:
        loss = {f"classifiers.{l}.weight": torch.randn(3, s.acm.fc2.out_features) for l, s in enumerate(dm.sites())}
        torch.save({"model": dm.state_dict(), "loss": loss, "epoch": 1}, tmp_path / "checkpoint.pt")
    return tmp_path


class _Bundle:
    def __init__(self, x, y):
        from torch.utils.data import TensorDataset

        self.train = TensorDataset(x, y)
        self.val = TensorDataset(x, y)
        self.mean, self.std = MEAN, STD


@pytest.fixture()
def tiny_run(dm, clean, tmp_path, monkeypatch):
    from nd_plugin.run import Run

    x, y = clean
    monkeypatch.setattr(Run, "build_model", lambda self, device="cpu", **kw: dm)
    monkeypatch.setattr(Run, "data", lambda self, spec=None, **kw: _Bundle(x, y))
    return _fake_run(tmp_path, dm)


def test_run_detection_end_to_end(tiny_run):
    kw = {"steps": 3, "batch_size": 120, "seeds": 2, "magnitudes": (0.0, 0.005), "path_magnitudes": (0.0, 0.005)}
    res = run_detection(tiny_run, attack="pgd", eps=0.3, n=480, transfer_from=("fgsm", 0.3), **kw)
    assert res.correct == 480 and res.successful >= 200 and res.protocol == "lee-5/5/90" and res.transfer["protocol"] == "lee-5/5/90"
    assert set(res.detectors) == set(DETECTORS)
    for name, m in res.detectors.items():
        assert m["seeds"] == 2, name  # the numbers themselves: test_evaluate_unsupervised_means_and_stds_over_the_test_parts
    # PGD at 0.3 moves inputs far from the clean data: the feature-ensemble detectors see it
    assert res.detectors["mahalanobis_lee"]["auroc"] > 0.9 and res.detectors["path_supervised"]["auroc"] > 0.8
    assert res.detectors["mahalanobis_lee"]["chosen"][0] in (0.0, 0.005)
    assert res.detectors["path_supervised"]["chosen"][0] in (0.0, 0.005)  # preprocessing through the path score
    assert res.transfer["fitted_on"] == "fgsm-eps0.3" and set(res.transfer["detectors"]) == set(SUPERVISED)
    assert res.recommended == "combined" and res.detectors["combined"]["auroc"] > 0.8
    assert set(res.detectors["combined"]["chosen"]) <= {"scores", "scores+path_features"}
    out = json.loads((tiny_run / "detect" / "pgd-eps0.3" / "detect.json").read_text())
    assert out["detectors"]["lid"] == res.detectors["lid"] and out["detector"]["fit_n"] == "480"
    for f in res.figures:
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all((tiny_run / f).is_file() for f in ("detector.npz", "detector_mahalanobis.npz", "detector_lee.npz"))
    from nd_plugin import open_run
    from nd_plugin.detect.figures import detection_section_html

    page = detection_section_html(open_run(tiny_run).detections())  # what the report shows
    lee = res.detectors["mahalanobis_lee"]
    assert f"<td>mahalanobis_lee</td><td>{lee['auroc']:.3f} ± {lee['auroc_std']:.3f}</td>" in page
    assert "lid (fitted on fgsm-eps0.3)" in page and page.count("<tr><td>") == len(DETECTORS) + len(SUPERVISED)
    assert "<td>combined (recommended)</td>" in page and "protocol lee-5/5/90; recommended detector: combined" in page
    # a second run reuses the saved detectors (same data, same fit_n): same numbers
    again = run_detection(tiny_run, attack="pgd", eps=0.3, n=480, figures=False, out=tiny_run / "o",
                          detectors=["path", "mahalanobis_lee"], **kw)
    assert again.detector["fit_seconds"] == res.detector["fit_seconds"]
    assert again.detectors["path"] == res.detectors["path"] and again.detectors["mahalanobis_lee"] == res.detectors["mahalanobis_lee"]


def test_run_detection_small_set_is_cross_validated(tiny_run):
    """Too few attacks for Lee's 5% fit part (issue 24): every input is used in a stratified k-fold, and the output says so."""
    res = run_detection(tiny_run, attack="pgd", eps=0.3, n=100, steps=2, figures=False, detectors=["path", "lid"], seeds=5)
    assert res.protocol.startswith("stratified-kfold-") and res.protocol_info["name"] == res.protocol
    k = int(res.protocol.rsplit("-", 1)[1])
    assert res.detectors["lid"]["seeds"] == res.detectors["path"]["seeds"] == res.protocol_info["splits"] == k * max(1, 5 // k)
    assert "Lee's 5% fit part would hold" in res.protocol_info["reason"]
    saved = json.loads((Path(res.out_dir) / "detect.json").read_text())
    assert saved["protocol"] == res.protocol and saved["protocol_info"]["splits"] == res.protocol_info["splits"]
    assert saved["attack_class"] == "PGD" and saved["attack_args"] == {"eps": 0.3, "alpha": 0.075, "steps": 2, "random_start": True}
    res = run_detection(tiny_run, attack="pgd", eps=0.3, n=100, steps=2, figures=False, detectors=["path", "max_softmax"], seeds=1)
    assert set(res.detectors) == {"path", "max_softmax"} and res.protocol == "lee-5/5/90"  # unsupervised: no fit part needed


def test_run_detection_too_small_for_any_estimate(tiny_run):
    with pytest.raises(DetectionError, match=r"only \d+ of the \d+ correctly classified inputs were attacked successfully; .*"
                       r"at least 15 successful attacks: raise eps \(--eps, now 0.3.*--n, now 12.*--detectors path,max_softmax\)$"):
        run_detection(tiny_run, attack="pgd", eps=0.3, n=12, steps=2, figures=False, detectors=["path", "lid", "max_softmax"])


def test_run_detection_any_torchattacks_attack(tiny_run):
    res = run_detection(tiny_run, attack="TPGD", eps=0.3, n=100, figures=False, detectors=["path"], seeds=1,
                        attack_args={"steps": 2, "alpha": 0.1})
    assert res.attack == "tpgd" and res.attack_class == "TPGD" and res.steps == 2
    assert res.attack_args == {"eps": 0.3, "alpha": 0.1, "steps": 2} and res.successful > 0
    assert Path(res.out_dir).name == "tpgd-eps0.3-alpha=0.1-steps=2"  # the parameters set are in the folder's name


def test_cli_small_run_prints_the_protocol_and_a_table(tiny_run):
    from typer.testing import CliRunner

    from nd_plugin.cli._app import app

    r = CliRunner().invoke(app, ["detect", str(tiny_run), "--attack", "Pgd", "--eps", "0.3", "--n", "100", "--detectors", "path,lid",
                                 "--attack-arg", "steps=2", "--attack-arg", "random_start=false"])
    assert r.exit_code == 0, r.output
    assert "protocol stratified-kfold-" in r.output and "Lee's 5% fit part would hold" in r.output
    assert "lid " in r.output and "AUROC" in r.output and "pgd-eps0.3-random_start=False-steps=2" in r.output
    # no combined measured: the highest AUROC of those measured is recommended, and marked in the table
    rows = {ln.split()[0].lstrip("*"): float(ln.split()[2]) for ln in r.output.splitlines() if "AUROC" in ln}
    best = max(rows, key=rows.get)
    assert set(rows) == {"path", "lid"} and f"recommended: {best} (*)" in r.output and f" *{best} " in r.output


def test_run_detection_zero_success(tiny_run):
    with pytest.raises(DetectionError, match=r"succeeded on none .*\(success rate 0\)"):
        run_detection(tiny_run, attack="fgsm", eps=1e-6, n=30, figures=False, detectors=["path"])


def test_run_detection_without_checkpoint(dm, tmp_path):
    with pytest.raises(RunDirError, match="has no checkpoint.pt"):
        run_detection(_fake_run(tmp_path, dm, checkpoint=False))


def test_cli_one_line_errors(dm, tmp_path):
    from typer.testing import CliRunner

    from nd_plugin.cli._app import app

    runner = CliRunner()
    bare = _fake_run(tmp_path / "bare", dm, checkpoint=False) if (tmp_path / "bare").mkdir() is None else None
    for args, msg in (
        (["detect", str(tmp_path), "--attack", "nope"], "known attacks"),
        (["detect", str(tmp_path), "--eps", "0"], "eps must be in (0, 1]"),
        (["detect", str(tmp_path), "--eps", "1.5"], "eps must be in (0, 1]"),
        (["detect", str(tmp_path), "--detectors", "path,odin"], "unknown detector 'odin'"),
        (["detect", str(tmp_path), "--transfer-from", "fgsm:x"], "ATTACK:EPS"),
        (["detect", str(tmp_path / "missing")], "does not exist"),
        (["detect", str(bare)], "has no checkpoint.pt"),
    ):
        r = runner.invoke(app, args)
        assert r.exit_code != 0
        text = r.output.strip()
        assert msg in text and "Traceback" not in text and len(text.splitlines()) == 1, text


# ------------------------------------------------------------------ the combined detector (issue 24, item 3)


def test_confidence_features_and_lee_scores_without_a_pass(dm, clean):
    from nd_plugin.detect import confidence_features

    x, y = clean
    probe = collect_probe(dm, [(x, y)], feature_layer="fc", stages=find_stage_layers(dm.model))
    f = confidence_features(probe.logits)
    assert f.shape == (len(x), 6) and np.allclose(f[:, 0], 1 - msp_score(probe.logits))
    assert (f[:, 2] >= 0).all() and (f[:, 4] >= 0).all() and (f[:, 1] >= 0).all()  # margins and entropy
    lee = LeeMahalanobis().fit_probe(probe, find_stage_layers(dm.model))
    assert np.allclose(lee.score_probe(probe), lee.scores(dm, x, (0.0,), std=STD)[0.0], rtol=1e-3)  # float64 vs float32
    with pytest.raises(DetectionError, match="no stage features"):
        lee.score_probe(collect_probe(dm, x[:4]))


def test_combined_detector_features_and_recommendation(dm, clean):
    from nd_plugin.detect import COMBINED_SETS, combined_features, detector_features, fit_detectors, recommend

    x, y = clean
    fitted = fit_detectors(dm, [(x, y)])
    probe = collect_probe(dm, x[:20], feature_layer="fc", stages=fitted.lee.layers)
    sets = combined_features(fitted, probe)
    assert tuple(sets) == COMBINED_SETS
    L, k, stages = len(dm.site_names), 3, len(fitted.lee.layers)
    assert sets["scores"].shape == (20, 1 + 6 + 1 + stages)
    path = fitted.path.path_features(probe)
    assert np.array_equal(sets["scores+path_features"], np.c_[sets["scores"], path]) and path.shape[1] == L * 2 * k
    assert np.allclose(sets["scores"][:, 0], fitted.path.score_probe(probe).overall)
    # a probe without penultimate or stage features: the scores it has (the path score and the confidence)
    bare = combined_features(fitted, collect_probe(dm, x[:20]))
    assert bare["scores"].shape == (20, 7)
    out = detector_features(fitted, dm, x[:20], probe, std=STD, detectors=["combined", "path_supervised"])
    assert np.array_equal(out["combined"]["scores+path_features"][:, 8 + stages :], out["path_supervised"])
    assert "combined" in DETECTORS and "combined" in SUPERVISED
    assert recommend({"path": {"auroc": 0.99}, "combined": {"auroc": 0.9}}) == "combined"
    assert recommend({}) is None
