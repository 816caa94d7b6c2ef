"""Tests of nd_plugin.interpret: filter states, class paths, Hopkins, decision tree, path distribution, occlusion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from nd_plugin.errors import InputShapeError
from nd_plugin.interpret import (
    DYNAMIC,
    ENERGETIC,
    SILENT,
    class_paths,
    decision_tree,
    eta_squared,
    filter_states,
    grid_boxes,
    hopkins,
    occlusion_concepts,
    path_distribution,
)
from nd_plugin.paths import PathStats


def _stats_from_paths(paths: np.ndarray, labels: np.ndarray, sizes: list[int], k: int | None = None) -> PathStats:
    paths = paths.astype(bool)
    k = k or int(labels.max()) + 1
    class_counts = np.zeros((k, paths.shape[1]), dtype=np.int64)
    np.add.at(class_counts, labels, paths.astype(np.int64))
    return PathStats(
        site_names=[f"l{i}" for i in range(len(sizes))],
        site_channels=sizes,
        n=paths.shape[0],
        counts=paths.sum(0).astype(np.int64),
        class_counts=class_counts,
        class_n=np.bincount(labels, minlength=k),
        classes=[f"c{i}" for i in range(k)],
        paths=paths,
        labels=labels.astype(np.int64),
        preds=labels.astype(np.int64),
    )


@pytest.fixture
def hand_stats() -> PathStats:
    # 4 inputs (2 per class), layers of 3 and 2 filters.
    paths = np.array(
        [
            [0, 1, 1, 1, 1],
            [0, 1, 1, 0, 1],
            [0, 0, 1, 0, 1],
            [0, 0, 1, 0, 1],
        ]
    )
    return _stats_from_paths(paths, np.array([0, 0, 1, 1]), [3, 2])


# ------------------------------------------------------------------------------------ filter states


def test_filter_states_by_hand(hand_stats: PathStats) -> None:
    fs = filter_states(hand_stats, bins=4)
    # counts: [0, 2, 4 | 1, 4]
    assert fs["l0"] == (1, 1, 1)
    assert fs["l1"] == (0, 1, 1)
    silent, dynamic, energetic = fs["l1"]
    assert (silent, dynamic, energetic) == (0, 1, 1)
    assert fs.overall == (1, 2, 2)
    assert fs.shares == pytest.approx({"silent": 0.2, "dynamic": 0.4, "energetic": 0.4})
    assert list(fs) == ["l0", "l1"] and len(fs) == 2
    assert fs.states.tolist() == [SILENT, DYNAMIC, ENERGETIC, DYNAMIC, ENERGETIC]
    assert fs.histogram().tolist() == [1, 1, 1, 2]  # edges 0,1,2,3,4
    assert fs.histogram("l1").tolist() == [0, 1, 0, 1]
    d = json.loads(json.dumps(fs.to_dict()))
    assert d["overall"] == {"silent": 1, "dynamic": 2, "energetic": 2}
    assert d["layers"][1]["counts"] == [1, 4]


def test_filter_states_tolerance(hand_stats: PathStats) -> None:
    fs = filter_states(hand_stats, tolerance=0.25)  # silent <= 1, energetic >= 3
    assert fs["l0"] == (1, 1, 1)
    assert fs["l1"] == (1, 0, 1)
    with pytest.raises(ValueError, match="tolerance"):
        filter_states(hand_stats, tolerance=0.5)


# ------------------------------------------------------------------------------------- class paths


def test_eta_squared_by_hand() -> None:
    assert eta_squared(np.array([[2, 1], [0, 1]]), np.array([2, 2])) == pytest.approx(0.5)
    assert np.isnan(eta_squared(np.array([[2, 0], [2, 0]]), np.array([2, 2])))


def test_class_paths_by_hand(hand_stats: PathStats) -> None:
    cp = class_paths(hand_stats, n_permutations=0)
    assert cp.means.tolist() == [[0, 1, 1, 0.5, 1], [0, 0, 1, 0, 1]]
    assert cp.widths.tolist() == [[2, 1.5], [1, 1]]
    assert cp.total_width.tolist() == [3.5, 2]
    # filter 1: between 2*(.5)^2*2 = 1, total 4*.25 = 1; filter 3: between 2*(.25^2)*2 = .25, total 4*(.25*.75) = .75
    assert cp.eta2 == pytest.approx(1.25 / 1.75)
    assert cp.eta2_layers[0] == pytest.approx(1.0)
    assert cp.eta2_layers[1] == pytest.approx(1 / 3)
    assert cp.chi2[1] == pytest.approx(4.0)  # N * eta2_f, Pearson's chi-square of the 2x2 table
    assert cp.tested == 2
    # weighted Jaccard: sum(min) / sum(max) = 2 / 3.5
    assert cp.similarity[0, 1] == pytest.approx(2 / 3.5)
    assert cp.similarity[0, 0] == pytest.approx(1.0)
    json.dumps(cp.to_dict())


def test_class_paths_detects_class_structure() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 100)
    rates = rng.uniform(0.1, 0.9, size=(4, 64))
    structured = rng.random((400, 64)) < rates[labels]
    cp = class_paths(_stats_from_paths(structured, labels, [32, 32]), n_permutations=49, seed=0)
    assert cp.permutation_p == pytest.approx(1 / 50)
    assert cp.centroid_accuracy > 0.8
    assert cp.class_dependent > 32
    random = rng.random((400, 64)) < 0.5
    cp0 = class_paths(_stats_from_paths(random, labels, [32, 32]), n_permutations=49, seed=0)
    assert cp0.eta2 < 0.02 < cp.eta2
    assert cp0.permutation_p > 0.05
    assert cp0.class_dependent <= 1


# ----------------------------------------------------------------------------------------- Hopkins


def test_hopkins_continuous() -> None:
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(0, 0.1, (150, 5)), rng.normal(3, 0.1, (150, 5))])
    assert hopkins(blobs, seed=0) > 0.9
    uniform = [hopkins(rng.uniform(size=(500, 5)), seed=s) for s in range(5)]
    assert np.mean(uniform) == pytest.approx(0.5, abs=0.05)
    assert hopkins(blobs, seed=3) == hopkins(blobs, seed=3)


def test_hopkins_binary() -> None:
    rng = np.random.default_rng(1)
    protos = rng.random((2, 64)) < 0.5
    clustered = protos[rng.integers(0, 2, 400)] ^ (rng.random((400, 64)) < 0.05)
    assert hopkins(clustered.astype(float), seed=0) > 0.75
    independent = [hopkins((rng.random((400, 64)) < 0.3).astype(float), seed=s) for s in range(5)]
    assert np.mean(independent) == pytest.approx(0.5, abs=0.05)


def test_hopkins_degenerate() -> None:
    assert np.isnan(hopkins(np.ones((50, 4))))  # nothing varies
    assert np.isnan(hopkins(np.zeros((2, 4))))  # too few points
    with pytest.raises(ValueError):
        hopkins(np.zeros(5))


# ------------------------------------------------------------------------------------ decision tree


def _tree_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """4 classes, 3 layers of 24 filters: no structure, then {0,1} | {2,3}, then 0 | 1 and 2 | 3."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), 60)
    n = labels.size
    layer0 = rng.random((n, 24)) < 0.5
    a, b = rng.random((2, 24)) < 0.5
    layer1 = np.where((labels < 2)[:, None], a, b) ^ (rng.random((n, 24)) < 0.03)
    protos = rng.random((4, 24)) < 0.5
    layer2 = protos[labels] ^ (rng.random((n, 24)) < 0.03)
    return np.concatenate([layer0, layer1, layer2], 1), labels


@pytest.mark.parametrize("test", ["copula", "hopkins"])
def test_decision_tree_recovers_known_splits(test: str) -> None:
    paths, labels = _tree_data()
    tree = decision_tree(_stats_from_paths(paths, labels, [24, 24, 24]), test=test, seed=0)
    root = tree.nodes[0]
    assert 0 not in [n.split_layer for n in tree.splits]  # the unstructured layer splits nothing
    assert root.split_layer == 1
    assert not root.tests[0].reject and root.tests[1].reject
    if test == "hopkins":
        assert root.statistics[0] < 0.75 <= root.statistics[1]
    else:
        assert root.tests[0].p_value > 0.01 >= root.tests[1].p_value == pytest.approx(1 / 100)
        assert root.tests[1].null_draws == 99 and root.tests[1].statistic < root.tests[1].null_mean
    assert tree.parting_layer("c0", "c2") == "l1"
    assert tree.parting_layer("c0", "c1") == "l2"
    assert tree.parting_layer("c2", "c3") == "l2"
    groups = sorted(sorted(g) for g in tree.first_parting()[1])
    assert groups == [["c0", "c1"], ["c2", "c3"]]
    assert sorted(sorted(tree.classes[c] for c in leaf.classes) for leaf in tree.leaves) == [["c0"], ["c1"], ["c2"], ["c3"]]
    for leaf in tree.leaves:  # each leaf is pure
        assert leaf.composition.max() == leaf.size == 60
    d = json.loads(json.dumps(tree.to_dict()))
    assert d["nodes"][0]["split_layer"] == "l1"
    assert d["first_parting"]["layer"] == "l1"
    assert d["test"]["name"] == test and d["no_split_reason"] is None
    assert d["nodes"][0]["tests"]["l1"]["reject"] is True and d["nodes"][0]["reason"].startswith("split at l1")


def test_decision_tree_accepts_dict_of_tensors_and_no_structure() -> None:
    paths, labels = _tree_data(1)
    gates = {"a": torch.from_numpy(paths[:, :24]).float(), "b": torch.from_numpy(paths[:, 24:48]).float()}
    tree = decision_tree(gates, torch.from_numpy(labels))
    assert tree.layers == ["a", "b"]
    assert tree.nodes[0].split_layer == 1
    rng = np.random.default_rng(0)
    flat = decision_tree(rng.random((300, 40)) < 0.5, rng.integers(0, 3, 300), layer_sizes=[20, 20])
    assert flat.splits == [] and flat.first_parting() is None
    assert (flat.parting == -1).all()
    with pytest.raises(ValueError, match="labels"):
        decision_tree(paths)


# -------------------------------------------------------------------------------- path distribution


def test_path_distribution_by_hand() -> None:
    paths = np.array([[1, 0], [1, 0], [0, 1], [1, 1]])
    pd = path_distribution(_stats_from_paths(paths, np.array([0, 0, 1, 1]), [1, 1]), pairs=200)
    assert pd.distinct == 3
    assert pd.top_counts.tolist() == [2, 1, 1]
    assert pd.class_distinct.tolist() == [1, 2]
    assert pd.class_entropy.tolist() == pytest.approx([0.0, 1.0])
    assert pd.entropy == pytest.approx(1.5)
    assert pd.layer_distinct.tolist() == [2, 2]
    assert pd.mean_hamming_within == pytest.approx(0.5 * 0 + 0.5 * 0.5, abs=0.15)
    assert pd.embedding.shape == (4, 2)
    json.dumps(pd.to_dict())


def test_path_distribution_needs_raw_paths(hand_stats: PathStats) -> None:
    hand_stats.paths = None
    with pytest.raises(ValueError, match="raw=True"):
        path_distribution(hand_stats)


# ---------------------------------------------------------------------------------------- occlusion


class _TinyGated(nn.Module):
    """A stand-in for a DecoupledModel: gate c is on when channel c's mean over rows 0-3 exceeds 0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.gate_sites = None

    def forward(self, x: torch.Tensor, return_path: bool = False):
        top = x[:, :, :4].mean((2, 3)) > 0
        bottom = x[:, :, 4:].mean((2, 3)) > 0
        logits = torch.cat([top, bottom], 1).float()
        path = {"top": top.float(), "bottom": bottom.float()}
        return (logits, path) if return_path else logits


def test_grid_boxes() -> None:
    boxes = grid_boxes(8, 8, 4)
    assert boxes.tolist()[:3] == [[0, 0, 4, 4], [0, 2, 4, 6], [0, 4, 4, 8]]
    assert len(boxes) == 9
    assert grid_boxes(7, 7, 4, 4).tolist() == [[0, 0, 4, 4], [0, 3, 4, 7], [3, 0, 7, 4], [3, 3, 7, 7]]
    with pytest.raises(InputShapeError, match="larger than the 8x8 image"):
        grid_boxes(8, 8, 9)


def test_occlusion_concepts_regions() -> None:
    model = _TinyGated()
    img = torch.ones(1, 2, 8, 8)
    oc = occlusion_concepts(model, img, patch=4, stride=4, fill=-1.0, batch_size=3)
    # boxes: (0,0) (0,4) (4,0) (4,4); a patch over rows 0-3 halves... mean of top half: (16*1 + 16*-1)/32 = 0 -> off
    assert oc.base.tolist() == [[True, True, True, True]]
    assert oc.silenced[0].tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [False, False, True, True],
        [False, False, True, True],
    ]
    region = oc.region(0, 0)
    assert region[:4].min() == 1.0 and region[4:].max() == 0.0
    assert oc.filter_name(3) == ("layer1", 1)
    assert oc.concept_filters(0) == [0, 1, 2, 3]
    same = occlusion_concepts(model, img, boxes=[(0, 0, 4, 4), (0, 4, 4, 8), (4, 0, 8, 4), (4, 4, 8, 8)], fill=-1.0, batch_size=64)
    assert (same.occluded == oc.occluded).all()
    json.dumps(oc.to_dict())


def test_occlusion_fill_equal_to_image_changes_nothing() -> None:
    oc = occlusion_concepts(_TinyGated(), torch.full((2, 2, 8, 8), 0.5), patch=3, fill=0.5)
    assert not oc.silenced.any()
    assert oc.occluded.shape == (2, len(grid_boxes(8, 8, 3)), 4)


def test_occlusion_bad_input() -> None:
    model = _TinyGated()
    with pytest.raises(InputShapeError, match="larger than"):
        occlusion_concepts(model, torch.zeros(1, 2, 8, 8), patch=16)
    with pytest.raises(InputShapeError, match="outside"):
        occlusion_concepts(model, torch.zeros(1, 2, 8, 8), boxes=[(0, 0, 9, 4)])
    with pytest.raises(InputShapeError, match="channels"):
        occlusion_concepts(model, torch.zeros(1, 2, 8, 8), patch=4, fill=[0.0, 0.0, 0.0])


# ------------------------------------------------------------------------- calibrated cluster test


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (np.array([[0, 0], [0, 0], [1, 1], [1, 1]]), 0.0),  # two distinct paths: W = 0
        (np.array([[0.0], [1.0], [2.0], [3.0]]), 0.2),  # cut 2 | 2 of 0..3: W = 1, T = 5
        (np.array([[0.0], [0.0], [0.0], [3.0]]), 0.0),  # ties: the cut can only fall between 0 and 3
        (np.ones((5, 3)), 1.0),  # nothing varies
    ],
)
def test_cluster_index_by_hand(x: np.ndarray, expected: float) -> None:
    from nd_plugin.interpret.cluster_test import cluster_index

    ci, first = cluster_index(x)
    assert float(ci) == pytest.approx(expected, abs=1e-6)
    batch, _ = cluster_index(np.stack([x, x]))
    assert batch.tolist() == pytest.approx([expected] * 2, abs=1e-6)
    if expected == 0.0:  # identical rows stay on one side
        rows = [tuple(r) for r in x[first]]
        assert not set(rows) & {tuple(r) for r in x[~first]}


@pytest.mark.parametrize(("h", "k", "rho"), [(0.0, 0.0, 0.5), (0.3, -1.2, -0.6), (1.5, 1.0, 0.9), (-0.4, 0.8, 0.0)])
def test_orthant_probability_matches_scipy(h: float, k: float, rho: float) -> None:
    from scipy.stats import multivariate_normal

    from nd_plugin.interpret.copula import orthant_probability

    # P(z1 > h, z2 > k) = P(-z1 < -h, -z2 < -k), and (-z1, -z2) has the same correlation
    exact = multivariate_normal(mean=[0, 0], cov=[[1, rho], [rho, 1]]).cdf([-h, -k])
    assert float(orthant_probability(np.array(h), np.array(k), np.array(rho))) == pytest.approx(exact, abs=1e-6)


@pytest.mark.parametrize("rho", [-0.5, 0.0, 0.4, 0.8])
def test_copula_recovers_marginals_and_correlation(rho: float) -> None:
    from nd_plugin.interpret.copula import GaussianCopula

    truth = GaussianCopula(np.array([0.15, 0.6]), np.array([[1.0, rho], [rho, 1.0]]))
    x = truth.sample(40000, seed=0)
    fit = GaussianCopula.fit(x)
    assert fit.rates == pytest.approx([0.15, 0.6], abs=0.01)
    assert fit.corr[0, 1] == pytest.approx(rho, abs=0.04)


def test_cluster_test_false_splits_and_power_small() -> None:
    """Seeded miniature of benchmarks/cluster_calibration.py (the full one: docs/benchmarks.md)."""
    from nd_plugin.interpret.calibration import kmeans_agreement, structure_free_paths, two_group_paths
    from nd_plugin.interpret.cluster_test import cluster_test

    # structure-free, correlated, U-shaped on-rates (many near-silent / near-energetic filters)
    null = [cluster_test(structure_free_paths(400, [24], seed=s), seed=s) for s in range(40)]
    assert all(not t.reason for t in null)
    assert sum(t.reject for t in null) <= 2  # expected 0.4 at alpha = 0.01
    assert np.mean([t.p_value for t in null]) > 0.3
    # two groups that k-means separates at >= 95%
    power = []
    for s in range(10):
        x, g = two_group_paths(400, [24], 0, separation=2.0, seed=s)
        assert kmeans_agreement(x, g) >= 0.95
        power.append(cluster_test(x, seed=s))
    assert all(t.reject and t.p_value == pytest.approx(0.01) and t.null_draws == 99 for t in power)


@pytest.mark.parametrize("null", ["permutation", "gaussian"])
def test_cluster_test_other_nulls_run(null: str) -> None:
    from nd_plugin.interpret.calibration import two_group_paths
    from nd_plugin.interpret.cluster_test import cluster_test

    x, _ = two_group_paths(300, [16], 0, separation=2.0, seed=0)
    t = cluster_test(x, null=null, seed=0)
    assert t.null == null and t.reject and 0 < t.p_value <= 0.01
    with pytest.raises(ValueError, match="null"):
        cluster_test(x, null="uniform")


def test_score_tree_counts_false_and_found() -> None:
    from nd_plugin.interpret.calibration import score_tree, two_group_paths

    x, g = two_group_paths(600, [16, 16, 32], 1, separation=2.0, seed=3)
    sc = score_tree(x, [16, 16, 32], g, 1, seed=0)
    assert sc.found and sc.split_layer == 1 and sc.split_agreement >= 0.95
    assert sc.false_splits == 0 and sc.tested >= 1 + 2  # root at layer 0, both pure children at layer 2


# --------------------------------------------------------------------------- bad input of the tree


def _bad_tree_input(kind: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.random((300, 12)) < 0.5
    y = np.arange(300) % 3
    if kind == "one class":
        return x, np.zeros(300, int)
    if kind == "too few inputs":
        return x[:15], y[:15]
    if kind == "no dynamic filter":
        return np.tile(rng.random(12) < 0.5, (300, 1)), y
    if kind == "empty":
        return x[:0], y[:0]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("one class", "every input is of one class (0): no two classes can part"),
        ("too few inputs", "15 inputs: a split needs at least 2 x min_size = 20"),
        ("no dynamic filter", "no dynamic filter: every gate is constant over the 300 inputs"),
        ("empty", "0 inputs: a split needs at least 2 x min_size = 20"),
    ],
)
@pytest.mark.parametrize("test", ["copula", "hopkins"])
def test_decision_tree_says_why_it_made_no_split(kind: str, reason: str, test: str) -> None:
    x, y = _bad_tree_input(kind)
    tree = decision_tree(x, y, layer_sizes=[6, 6], test=test, classes=["0", "1", "2"])
    assert tree.splits == [] and tree.no_split_reason == reason
    d = json.loads(json.dumps(tree.to_dict()))
    assert d["no_split_reason"] == reason and d["nodes"][0]["reason"] == reason


def test_cluster_test_too_few_rows_untested() -> None:
    from nd_plugin.interpret.cluster_test import cluster_test

    t = cluster_test(np.eye(5, dtype=bool), min_samples=20)
    assert not t.reject and np.isnan(t.p_value) and t.reason == "5 inputs, fewer than the 20 the test needs"
    assert cluster_test(np.ones((50, 4), bool)).reason == "no filter varies over the group's inputs"


@pytest.mark.parametrize("batch_size", [1, 5, 256])
def test_occlusion_batches_across_images_change_nothing(batch_size: int) -> None:
    torch.manual_seed(0)
    imgs = torch.randn(3, 2, 8, 8)
    ref = occlusion_concepts(_TinyGated(), imgs, patch=3, fill=-2.0, batch_size=1000)
    oc = occlusion_concepts(_TinyGated(), imgs, patch=3, fill=-2.0, batch_size=batch_size)
    assert (oc.occluded == ref.occluded).all() and (oc.base == ref.base).all()
    assert oc.occluded.shape == (3, len(grid_boxes(8, 8, 3)), 4) and oc.occluded_pred.shape == (3, len(grid_boxes(8, 8, 3)))
    # each copy is its own image with its own patch: image 1's copies equal a one-image run of image 1
    one = occlusion_concepts(_TinyGated(), imgs[1:2], patch=3, fill=-2.0)
    assert (one.occluded[0] == oc.occluded[1]).all()
