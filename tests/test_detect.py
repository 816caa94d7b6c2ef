"""Tests of nd_plugin.detect's parts: attacks, probes, the path detector, the baselines, the metrics.

The protocol on a run directory and ``nd detect``: test_detect_run.py; the detector base class,
the registry and the built-in detectors: test_detect_registry.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import DETECT_MEAN as MEAN
from _helpers import DETECT_STD as STD
from torch import nn

from nd_plugin._hooks import ForwardHooks
from nd_plugin.detect import (
    ATTACKS,
    LeeMahalanobis,
    MahalanobisDetector,
    PathDetector,
    PixelSpaceModel,
    Probe,
    attack,
    collect_probe,
    confidence_features,
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
from nd_plugin.errors import ConfigError, DetectionError, NDError, RunDirError, UnknownAttackError

pytest.importorskip("torchattacks")


pytestmark = pytest.mark.usefixtures("one_thread")  # dm, clean: the detection fixtures of conftest.py


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
    splits = [
        (np.array([], int), np.array([], int), np.array([0, 1, 2, 3])),
        (np.array([], int), np.array([], int), np.array([1, 2])),
    ]
    r = evaluate_unsupervised(clean, adv, adv_index, splits)
    # part 1: attacks 2.5, 0.5, 3.5 beat 3, 1, 4 of the 4 clean scores: AUROC 8/12; above every clean score (FPR 0): 1 of 3
    # part 2: clean 1, 2 and their attacks 0.5, 3.5: AUROC 2/4; 1 of 2 attacks above both clean scores
    assert r == {
        "auroc": round((8 / 12 + 2 / 4) / 2, 4),
        "auroc_std": round((8 / 12 - 2 / 4) / 2, 4),
        "tpr_at_5fpr": round((1 / 3 + 1 / 2) / 2, 4),
        "tpr_at_5fpr_std": round((1 / 2 - 1 / 3) / 2, 4),
        "seeds": 2,
    }


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


def test_confidence_features_and_lee_scores_without_a_pass(dm, clean):
    x, y = clean
    probe = collect_probe(dm, [(x, y)], feature_layer="fc", stages=find_stage_layers(dm.model))
    f = confidence_features(probe.logits)
    assert f.shape == (len(x), 6) and np.allclose(f[:, 0], 1 - msp_score(probe.logits))
    assert (f[:, 2] >= 0).all() and (f[:, 4] >= 0).all() and (f[:, 1] >= 0).all()  # margins and entropy
    lee = LeeMahalanobis().fit_probe(probe, find_stage_layers(dm.model))
    assert np.allclose(lee.score_probe(probe), lee.scores(dm, x, (0.0,), std=STD)[0.0], rtol=1e-3)  # float64 vs float32
    with pytest.raises(DetectionError, match="no stage features"):
        lee.score_probe(collect_probe(dm, x[:4]))
