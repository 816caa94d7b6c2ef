"""Tests of the detector extension point: the Detector base class, the registry, the built-in detectors.

A user's detector is registered in the test, as a user would, and measured by the protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
from _helpers import DETECT_MEAN as MEAN
from _helpers import DETECT_STD as STD

from nd_plugin.detect import (
    COMBINED_SETS,
    RECOMMENDED,
    AttackedSet,
    Detector,
    DetectorInput,
    FittedDetectors,
    MahalanobisLee,
    PathSupervised,
    attack_set,
    collect_probe,
    combined_features,
    create_detector,
    detector_features,
    evaluate,
    evaluate_supervised,
    evaluate_unsupervised,
    fit_detectors,
    list_detectors,
    plan,
    recommend,
    register_detector,
    resolve_detectors,
    unregister_detector,
)
from nd_plugin.detect import builtin as builtin_detectors
from nd_plugin.errors import ConfigError, NDError, UnknownDetectorError

pytest.importorskip("torchattacks")

BUILTIN = [
    "path", "path_supervised", "path_supervised_raw", "path_supervised_full", "combined",
    "mahalanobis_lee", "lid", "mahalanobis_penultimate", "max_softmax",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # dm, clean: the detection fixtures of conftest.py


@pytest.fixture(scope="module")
def protocol_inputs(dm, clean) -> tuple[FittedDetectors, AttackedSet]:
    """Clean statistics fitted on half the toy inputs, the other half attacked (PGD at 0.3)."""
    x, y = clean
    fitted = fit_detectors(dm, [(x[:240], y[:240])])
    aset = attack_set(
        dm, [(x[240:], y[240:])], "pgd", 0.3, mean=MEAN, std=STD, steps=3, feature_layer="fc", stages=fitted.lee.layers
    )
    assert aset.successful >= 60
    return fitted, aset


@pytest.fixture()
def register() -> Iterator[Callable[[str, type[Detector]], type[Detector]]]:
    """``register(name, cls)``: :func:`register_detector`, undone after the test (pass or fail)."""
    names: list[str] = []

    def _register(name: str, cls: type[Detector]) -> type[Detector]:
        names.append(name)
        return register_detector(name, cls)

    yield _register
    for name in names:
        unregister_detector(name)


class NegMaxLogit(Detector):
    """A user's unsupervised detector: minus the largest logit."""

    def features(self, inputs: DetectorInput) -> np.ndarray:
        return -inputs.probe.logits.max(1)


class Logits(Detector):
    """A user's supervised detector: the logits, into the protocol's regression."""

    supervised = True

    def features(self, inputs: DetectorInput) -> np.ndarray:
        return inputs.probe.logits


def test_builtin_detectors_are_registered_like_a_users():
    assert list_detectors() == BUILTIN
    assert list_detectors(supervised=True) == [n for n in BUILTIN if n not in ("path", "mahalanobis_penultimate", "max_softmax")]
    assert list_detectors(reads=()) == ["path", "path_supervised", "path_supervised_raw", "path_supervised_full", "max_softmax"]
    for name in BUILTIN:
        det = create_detector(name)
        assert isinstance(det, Detector) and det.name == name and type(det).__module__ == builtin_detectors.__name__
    assert RECOMMENDED == "combined" and RECOMMENDED in list_detectors(supervised=True)
    assert create_detector("lid", ks=(5, 7)).ks == (5, 7)
    with pytest.raises(TypeError):
        Detector()  # abstract: features() is what a detector is


@pytest.mark.parametrize("names", [["odin"], ["path", "Odin"], ["path", "path supervised"]])
def test_unknown_detector_is_a_typed_error_listing_the_registered(names, register):
    register("neg_max_logit", NegMaxLogit)
    with pytest.raises(
        UnknownDetectorError,
        match=r"unknown detector '.+'; known detectors: path, path_supervised, .*, max_softmax, neg_max_logit\.$",
    ):
        resolve_detectors(names)
    assert issubclass(UnknownDetectorError, ConfigError) and issubclass(UnknownDetectorError, NDError)
    with pytest.raises(UnknownDetectorError, match="no detector named"):
        resolve_detectors([])
    with pytest.raises(UnknownDetectorError, match="unknown detector 'odin'"):
        unregister_detector("odin")


@pytest.mark.parametrize(
    "name, cls, message",
    [
        ("path", NegMaxLogit, "already registered"),
        ("two words", NegMaxLogit, "letters, digits"),
        ("", NegMaxLogit, "letters, digits"),
        ("plain_class", int, "subclass of nd_plugin.detect.Detector"),
        ("reads_odd", type("ReadsOdd", (NegMaxLogit,), {"reads": frozenset({"gradients"})}), "known: "),
    ],
)
def test_registration_errors(name, cls, message):
    with pytest.raises(ConfigError, match=message):
        register_detector(name, cls)
    assert list_detectors() == BUILTIN  # nothing half-registered


def test_named_twice_or_nameless_instances_are_refused():
    with pytest.raises(ConfigError, match="named twice"):
        resolve_detectors(["path", "path"])
    with pytest.raises(ConfigError, match="NegMaxLogit has no name"):
        resolve_detectors([NegMaxLogit()])
    with pytest.raises(ConfigError, match="unsupervised"):
        create_detector("path").evaluate(np.zeros(4), np.ones(2), np.arange(2), [], transfer=(np.ones(2), np.arange(2)))


@pytest.mark.parametrize("cls", [NegMaxLogit, Logits])
def test_a_users_detector_is_measured_by_the_protocol(cls, register, dm, protocol_inputs):
    """Registered without editing the library: the protocol featurises, plans and measures it beside a built-in one."""
    fitted, aset = protocol_inputs
    register("toy", cls)
    assert list_detectors()[-1] == "toy" and ("toy" in list_detectors(supervised=True)) == cls.supervised
    names = ["toy", "path"]
    splits = plan(aset, names, seeds=2)
    clean_f = detector_features(fitted, dm, aset.x_clean, aset.clean, std=STD, detectors=names)
    adv_f = detector_features(fitted, dm, aset.x_adv, aset.adv, std=STD, detectors=names)
    res = evaluate(clean_f, adv_f, aset, detectors=names, splits=splits)
    assert list(res) == names and 0.0 <= res["toy"]["auroc"] <= 1.0 and res["toy"]["seeds"] == len(splits)
    # the numbers are those of the user's features under the library's own evaluation
    toy = cls().features
    c, a = toy(DetectorInput(aset.clean)), toy(DetectorInput(aset.adv))
    if cls.supervised:
        expect = evaluate_supervised({None: (c, a)}, aset.adv_index, splits)
    else:
        expect = evaluate_unsupervised(c, a, aset.adv_index, splits)
    assert res["toy"] == expect
    assert recommend(res) != "combined"  # not measured: the best of those measured


def test_detector_options_reach_the_features(dm, protocol_inputs):
    fitted, aset = protocol_inputs
    x = aset.x_clean[:16]
    probe = collect_probe(dm, x, feature_layer="fc", stages=fitted.lee.layers)
    lee, path = MahalanobisLee(magnitudes=(0.0, 0.002)), PathSupervised(magnitudes=(0.0, 0.005))
    out = detector_features(fitted, dm, x, probe, std=STD, detectors=[lee, path, "lid"])
    assert sorted(out["mahalanobis_lee"]) == [0.0, 0.002] and out["mahalanobis_lee"][0.0].shape == (16, len(fitted.lee.layers))
    assert sorted(out["path_supervised"]) == [0.0, 0.005]  # preprocessing through the path score
    assert np.array_equal(out["path_supervised"][0.0], fitted.path.path_features(probe))
    (by_name,) = resolve_detectors(["mahalanobis_lee"], {"mahalanobis_lee": {"magnitudes": (0.0,)}, "unmeasured": {"x": 1}})
    assert by_name.magnitudes == (0.0,)
    with pytest.raises(ConfigError, match="'mahalanobis_lee' is named twice"):
        resolve_detectors([lee, "mahalanobis_lee"])


def test_combined_detector_features_and_recommendation(dm, clean):
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
    raw = np.concatenate(probe.z, axis=1)  # the raw soft path, one column per gated filter
    assert np.array_equal(sets["scores+raw_path"], np.c_[sets["scores"], raw]) and raw.shape[1] == sum(
        s.channels for s in dm.gate_sites
    )
    # a probe without penultimate or stage features: the scores it has (the path score and the confidence)
    bare = combined_features(fitted, collect_probe(dm, x[:20]))
    assert bare["scores"].shape == (20, 7)
    out = detector_features(fitted, dm, x[:20], probe, std=STD, detectors=["combined", "path_supervised"])
    assert np.array_equal(out["combined"]["scores+path_features"][:, 8 + stages :], out["path_supervised"])
    assert recommend({"path": {"auroc": 0.99}, "combined": {"auroc": 0.9}}) == "combined"
    assert recommend({}) is None
