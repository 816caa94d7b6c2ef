"""Tests of the detection protocol on a run directory (:func:`~nd_plugin.commands.detect.run_detection`) and of ``nd detect``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _helpers import DetectBundle, fake_detect_run

from nd_plugin.commands.detect import run_detection
from nd_plugin.detect import COMBINED_SETS, list_detectors
from nd_plugin.errors import ConfigError, DetectionError, RunDirError, UnknownAttackError, UnknownDetectorError
from nd_plugin.run import DETECTOR_LEE, DETECTOR_PATH, DETECTOR_PENULTIMATE

pytest.importorskip("torchattacks")


pytestmark = pytest.mark.usefixtures("one_thread")  # dm, clean: the detection fixtures of conftest.py


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


@pytest.fixture()
def tiny_run(dm, clean, tmp_path, monkeypatch):
    from nd_plugin.run import Run

    x, y = clean
    monkeypatch.setattr(Run, "build_model", lambda self, device="cpu", **kw: dm)
    monkeypatch.setattr(Run, "data", lambda self, spec=None, **kw: DetectBundle(x, y))
    return fake_detect_run(tmp_path, dm)


def test_run_detection_end_to_end(tiny_run):
    kw = {"steps": 3, "batch_size": 120, "seeds": 2, "magnitudes": (0.0, 0.005), "path_magnitudes": (0.0, 0.005)}
    res = run_detection(tiny_run, attack="pgd", eps=0.3, n=480, transfer_from=("fgsm", 0.3), **kw)
    assert (
        res.correct == 480 and res.successful >= 200 and res.protocol == "lee-5/5/90" and res.transfer["protocol"] == "lee-5/5/90"
    )
    assert list(res.detectors) == list_detectors()
    for name, m in res.detectors.items():
        assert m["seeds"] == 2, name  # the numbers themselves: test_evaluate_unsupervised_means_and_stds_over_the_test_parts
    # PGD at 0.3 moves inputs far from the clean data: the feature-ensemble detectors see it
    assert res.detectors["mahalanobis_lee"]["auroc"] > 0.9 and res.detectors["path_supervised"]["auroc"] > 0.8
    assert res.detectors["mahalanobis_lee"]["chosen"][0] in (0.0, 0.005)
    assert res.detectors["path_supervised"]["chosen"][0] in (0.0, 0.005)  # preprocessing through the path score
    assert res.transfer["fitted_on"] == "fgsm-eps0.3" and list(res.transfer["detectors"]) == list_detectors(supervised=True)
    assert res.recommended == "combined" and res.detectors["combined"]["auroc"] > 0.8
    assert set(res.detectors["combined"]["chosen"]) <= set(COMBINED_SETS)
    out = json.loads((tiny_run / "detect" / "pgd-eps0.3" / "detect.json").read_text())
    assert out["detectors"]["lid"] == res.detectors["lid"] and out["detector"]["fit_n"] == "480"
    for f in res.figures:
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all((tiny_run / f).is_file() for f in (DETECTOR_PATH, DETECTOR_PENULTIMATE, DETECTOR_LEE))  # run.py's names
    from nd_plugin import open_run
    from nd_plugin.detect.figures import detection_section_html

    page = detection_section_html(open_run(tiny_run).detections())  # what the report shows
    lee = res.detectors["mahalanobis_lee"]
    assert f"<td>mahalanobis_lee</td><td>{lee['auroc']:.3f} ± {lee['auroc_std']:.3f}</td>" in page
    assert "lid (fitted on fgsm-eps0.3)" in page and page.count("<tr><td>") == len(list_detectors()) + len(
        list_detectors(supervised=True)
    )
    assert "<td>combined (recommended)</td>" in page and "protocol lee-5/5/90; recommended detector: combined" in page
    # a second run reuses the saved detectors (same data, same fit_n): same numbers
    again = run_detection(
        tiny_run, attack="pgd", eps=0.3, n=480, figures=False, out=tiny_run / "o", detectors=["path", "mahalanobis_lee"], **kw
    )
    assert again.detector["fit_seconds"] == res.detector["fit_seconds"]
    assert (
        again.detectors["path"] == res.detectors["path"]
        and again.detectors["mahalanobis_lee"] == res.detectors["mahalanobis_lee"]
    )


def test_run_detection_small_set_is_cross_validated(tiny_run):
    """Too few attacks for Lee's 5% fit part (issue 24): every input is used in a stratified k-fold, and the output says so."""
    res = run_detection(tiny_run, attack="pgd", eps=0.3, n=100, steps=2, figures=False, detectors=["path", "lid"], seeds=5)
    assert res.protocol.startswith("stratified-kfold-") and res.protocol_info["name"] == res.protocol
    k = int(res.protocol.rsplit("-", 1)[1])
    assert res.detectors["lid"]["seeds"] == res.detectors["path"]["seeds"] == res.protocol_info["splits"] == k * max(1, 5 // k)
    assert "Lee's 5% fit part would hold" in res.protocol_info["reason"]
    saved = json.loads((Path(res.out_dir) / "detect.json").read_text())
    assert saved["protocol"] == res.protocol and saved["protocol_info"]["splits"] == res.protocol_info["splits"]
    assert saved["attack_class"] == "PGD" and saved["attack_args"] == {
        "eps": 0.3,
        "alpha": 0.075,
        "steps": 2,
        "random_start": True,
    }
    res = run_detection(
        tiny_run, attack="pgd", eps=0.3, n=100, steps=2, figures=False, detectors=["path", "max_softmax"], seeds=1
    )
    assert set(res.detectors) == {"path", "max_softmax"} and res.protocol == "lee-5/5/90"  # unsupervised: no fit part needed


def test_run_detection_too_small_for_any_estimate(tiny_run):
    with pytest.raises(
        DetectionError,
        match=r"only \d+ of the \d+ correctly classified inputs were attacked successfully; .*"
        r"at least 15 successful attacks: raise eps \(now 0.3.*attack=pgd.*\(n, now 12.*\(detectors=path,max_softmax\)$",
    ) as info:
        run_detection(tiny_run, attack="pgd", eps=0.3, n=12, steps=2, figures=False, detectors=["path", "lid", "max_softmax"])
    assert "--" not in str(info.value) and info.value.params == ("eps", "attack", "n", "detectors")
    from nd_plugin.cli._app import app, flag_message, option_flags

    detect = next(c.callback for c in app.registered_commands if c.name == "detect")
    line = flag_message(info.value, option_flags(detect))  # what `nd detect` prints
    assert "raise --eps (now 0.3" in line and "--attack=pgd" in line and "(--n, now 12" in line
    assert line.endswith("(--detectors=path,max_softmax)") and "successful attacks" in line


def test_run_detection_any_torchattacks_attack(tiny_run):
    res = run_detection(
        tiny_run,
        attack="TPGD",
        eps=0.3,
        n=100,
        figures=False,
        detectors=["path"],
        seeds=1,
        attack_args={"steps": 2, "alpha": 0.1},
    )
    assert res.attack == "tpgd" and res.attack_class == "TPGD" and res.steps == 2
    assert res.attack_args == {"eps": 0.3, "alpha": 0.1, "steps": 2} and res.successful > 0
    assert Path(res.out_dir).name == "tpgd-eps0.3-alpha=0.1-steps=2"  # the parameters set are in the folder's name


def test_cli_small_run_prints_the_protocol_and_a_table(tiny_run):
    from typer.testing import CliRunner

    from nd_plugin.cli._app import app

    r = CliRunner().invoke(
        app,
        [
            "detect",
            str(tiny_run),
            "--attack",
            "Pgd",
            "--eps",
            "0.3",
            "--n",
            "100",
            "--detectors",
            "path,lid",
            "--attack-arg",
            "steps=2",
            "--attack-arg",
            "random_start=false",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "protocol stratified-kfold-" in r.output and "Lee's 5% fit part would hold" in r.output
    assert "lid " in r.output and "AUROC" in r.output and "pgd-eps0.3-random_start=False-steps=2" in r.output
    # no combined measured: the highest AUROC of those measured is recommended, and marked in the table
    rows = {ln.split()[0].lstrip("*"): float(ln.split()[2]) for ln in r.output.splitlines() if "AUROC" in ln}
    best = max(rows, key=rows.get)
    assert set(rows) == {"path", "lid"} and f"recommended: {best} (*)" in r.output and f" *{best} " in r.output


def test_cli_measures_a_registered_detector(tiny_run):
    """A detector registered in the process (no edit of the library) is a valid --detectors name, tabled and saved."""
    from typer.testing import CliRunner

    from nd_plugin.cli._app import app
    from nd_plugin.detect import Detector, register_detector, unregister_detector

    @register_detector("neg_max_logit")
    class NegMaxLogit(Detector):
        def features(self, inputs):
            return -inputs.probe.logits.max(1)

    try:
        r = CliRunner().invoke(app, ["detect", str(tiny_run), "--attack", "fgsm", "--eps", "0.3", "--n", "100", "--seeds", "1",
                                     "--detectors", "neg_max_logit,path"])  # fmt: skip
    finally:
        unregister_detector("neg_max_logit")
    assert r.exit_code == 0, r.output
    rows = [ln.split()[0].lstrip("*") for ln in r.output.splitlines() if "AUROC" in ln]
    assert rows == ["neg_max_logit", "path"]
    saved = json.loads((tiny_run / "detect" / "fgsm-eps0.3" / "detect.json").read_text())
    assert 0.0 <= saved["detectors"]["neg_max_logit"]["auroc"] <= 1.0


def test_run_detection_zero_success(tiny_run):
    with pytest.raises(DetectionError, match=r"succeeded on none .*\(success rate 0\).*raise eps") as info:
        run_detection(tiny_run, attack="fgsm", eps=1e-6, n=30, figures=False, detectors=["path"])
    assert info.value.params == ("eps",)


def test_run_detection_without_checkpoint(dm, tmp_path):
    with pytest.raises(RunDirError, match="has no checkpoint.pt"):
        run_detection(fake_detect_run(tmp_path, dm, checkpoint=False))


def test_cli_one_line_errors(dm, tmp_path):
    from typer.testing import CliRunner

    from nd_plugin.cli._app import app

    runner = CliRunner()
    bare = fake_detect_run(tmp_path / "bare", dm, checkpoint=False) if (tmp_path / "bare").mkdir() is None else None
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
