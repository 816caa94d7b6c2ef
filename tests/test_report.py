"""Tests of nd_plugin.report and `nd analyze`: figures, analysis.json, index.html, bad input."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from nd_plugin.errors import DataError, InputShapeError, RunDirError

CLASSES = [f"class{i}" for i in range(10)]  # the classes of the `synthetic` data set


@functools.lru_cache(maxsize=1)
def _template() -> tuple[dict, list[str]]:
    """A decoupled CIFAR ResNet-20 with random ACMs (gates that depend on the input), built once."""
    from nd_plugin import wrap
    from nd_plugin.adapters import create_model

    torch.manual_seed(0)
    dm = wrap(create_model("cifar:resnet20", num_classes=10), torch.zeros(1, 3, 32, 32))
    for site in dm.sites():
        torch.nn.init.normal_(site.acm.fc1.weight, std=1.0)
        torch.nn.init.normal_(site.acm.fc2.weight, std=1.0)
        torch.nn.init.normal_(site.acm.fc2.bias, std=0.5)
    return dm.state_dict(), dm.site_names


def _make_run(path: Path, *, classes: list[str] = CLASSES, checkpoint: bool = True) -> Path:
    """A run directory as `nd decouple` writes it (config + checkpoint, no paths.npz)."""
    state, sites = _template()
    path.mkdir(parents=True)
    config = {
        "model": "cifar:resnet20",
        "data": "synthetic:200",
        "num_classes": 10,
        "classes": classes,
        "input_size": [3, 32, 32],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "sites": sites,
        "reduction": 4,
        "noise_std": 1.0,
    }
    (path / "config.json").write_text(json.dumps(config))
    if checkpoint:
        torch.save({"model": state, "epoch": 0}, path / "checkpoint.pt")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One report, built once for the module (the run has no paths.npz: paths are collected)."""
    from nd_plugin.commands.analyze import build_report

    run = _make_run(tmp_path_factory.mktemp("runs") / "r")
    index = build_report(run, n_permutations=19)
    return index


def test_report_files(report: Path) -> None:
    out = report.parent
    assert report.name == "index.html" and out.name == "report"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(
        ["filter_states.png", "layer_histograms.png", "class_paths.png", "class_stats.png",
         "decision_tree.png", "path_distribution.png", "occlusion.png"]
    )
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))


def test_analysis_json_has_every_number(report: Path) -> None:
    a = json.loads((report.parent / "analysis.json").read_text())
    assert a["paths"]["n"] == 40 and a["paths"]["classes"] == CLASSES
    fs = a["filter_states"]
    assert sum(fs["overall"].values()) == a["paths"]["num_filters"]
    assert sum(fs["shares"].values()) == pytest.approx(1.0)
    cp = a["class_paths"]
    assert len(cp["means"]) == 10 and len(cp["means"][0]) == a["paths"]["num_filters"]
    # η² from its definition (classes.py): Σ_f Σ_k n_k (p_kf − p_f)² / Σ_f N p_f (1 − p_f), p_f the overall rate
    p_kf, n_k = np.array(cp["means"]), np.array(a["paths"]["class_n"], dtype=float)
    p_f = n_k @ p_kf / n_k.sum()
    eta2 = (n_k[:, None] * (p_kf - p_f) ** 2).sum() / (n_k.sum() * p_f * (1 - p_f)).sum()
    assert cp["statistic"]["eta2"] == pytest.approx(eta2, rel=1e-4) and 0.0 < eta2 < 1.0
    assert cp["statistic"]["permutation_p"] is not None
    tree = a["decision_tree"]
    assert tree["nodes"][0]["size"] == 40 and tree["test"]["name"] == "copula" and tree["test"]["alpha"] == 0.01
    for test in tree["nodes"][0]["tests"].values():  # every test stored with its statistic and p-value or reason
        assert (test["statistic"] is not None and test["p_value"] is not None) or test["reason"]
    assert tree["no_split_reason"] is None or not tree["nodes"][0]["children"]
    assert a["path_distribution"]["n"] == 40
    occ = a["occlusion"]
    # default: 12 images over the first two classes, but the synthetic split has 4 of each; 8-px patches, stride 4
    assert len(occ["images"]) == 8 and len(occ["boxes"]) == 49
    assert a["meta"]["occlusion_groups"] == {"class0": 4, "class1": 4}
    assert set(occ["concept_consistency"]) == {"class0", "class1"}
    for cc in occ["concept_consistency"].values():  # consistency: the share of the class's images where the concept is localised
        assert len(cc["images"]) == 4 and cc["top"]
        assert all(t["consistency"] == pytest.approx(t["localised"] / 4) and t["localised"] <= 4 for t in cc["top"])
    assert a["meta"]["occlusion_patch"] == 8
    assert a["timings_s"]["total"] > 0


def test_index_html_is_offline(report: Path) -> None:
    page = report.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 7
    for src in srcs:
        assert not src.startswith(("http:", "https:", "//")) and (report.parent / src).is_file()
    assert "http://" not in page and "https://" not in page
    assert "analysis.json" in page


def test_report_reuses_raw_paths_npz(tmp_path: Path) -> None:
    from nd_plugin.commands.analyze import build_report
    from nd_plugin.data import load_data
    from nd_plugin.run import open_run

    run = _make_run(tmp_path / "r")
    r = open_run(run)
    data = load_data("synthetic:200")
    stats = r.build_model().paths(data.loader("val", batch_size=64), raw=True, classes=data.classes)
    stats.save(run / "paths.npz")
    out = tmp_path / "elsewhere"
    index = build_report(run, out=out, n_permutations=0, num_occlusion_images=0, figures=False)
    assert index == out / "index.html"
    a = json.loads((out / "analysis.json").read_text())
    assert a["meta"]["paths"].endswith("paths.npz")
    assert a["paths"]["n"] == 40
    assert a["occlusion"] is None and not list(out.glob("*.png"))
    assert "<img" not in index.read_text()
    assert not (run / "report").exists()


def test_no_pyplot_no_global_backend() -> None:
    """Figures come from matplotlib.figure.Figure on the Agg canvas: no pyplot, no backend switch."""
    import nd_plugin.interpret
    import nd_plugin.report

    files = [*Path(nd_plugin.report.__file__).parent.glob("*.py"), *Path(nd_plugin.interpret.__file__).parent.glob("*.py")]
    for f in files:
        text = f.read_text()
        assert not re.search(r"import\s+matplotlib\.pyplot|from\s+matplotlib\s+import\s+pyplot|\bplt\.", text), f
        assert "matplotlib.use(" not in text, f


def test_plot_functions_return_figures() -> None:
    from matplotlib.figure import Figure

    from nd_plugin.interpret import class_paths, decision_tree, filter_states, path_distribution
    from nd_plugin.paths import PathStats
    from nd_plugin.report import (
        plot_class_paths,
        plot_class_stats,
        plot_decision_tree,
        plot_filter_states,
        plot_layer_histograms,
        plot_path_distribution,
    )

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30)
    paths = rng.random((90, 12)) < np.where(labels[:, None] == 0, 0.9, 0.2)
    cc = np.stack([paths[labels == c].sum(0) for c in range(3)])
    stats = PathStats(["a", "b"], [6, 6], 90, paths.sum(0), cc, np.bincount(labels), classes=["x", "y", "z"],
                      paths=paths, labels=labels, preds=labels)
    figs = [
        plot_filter_states(filter_states(stats)),
        plot_layer_histograms(filter_states(stats)),
        plot_class_paths(class_paths(stats, n_permutations=0)),
        plot_class_stats(class_paths(stats, n_permutations=0)),
        plot_decision_tree(decision_tree(stats)),
        plot_path_distribution(path_distribution(stats)),
    ]
    assert all(isinstance(f, Figure) for f in figs)


def _occlusion_fixture():
    """4 images, 4 patches, 3 filters: filter 0 is silenced by patch 0 on every image, filter 1 by
    patch 1 on images 0-1 only, filter 2 never; image 3 is not silenced except through filter 0."""
    from nd_plugin.interpret import OcclusionConcepts, grid_boxes

    sil = np.zeros((4, 4, 3), bool)
    sil[:, 0, 0] = True
    sil[:2, 1, 1] = True
    return OcclusionConcepts(("l",), (3,), (8, 8), grid_boxes(8, 8, 4, 4), np.ones((4, 3), bool), ~sil,
                             np.zeros(4, int), np.zeros((4, 4), int))


def test_occlusion_figure_every_cell_used() -> None:
    from nd_plugin.interpret import concept_consistency
    from nd_plugin.report import plot_occlusion

    oc = _occlusion_fixture()
    cc = concept_consistency(oc)
    assert cc.consistency.tolist() == [1.0, 0.5, 0.0] and cc.top(3) == [0, 1]
    assert cc.iou[0] == 1.0 and cc.chance_iou[0] == pytest.approx(0.25)  # one of 4 patches each: E[IoU] = 1/4
    images = [np.full((8, 8, 3), 0.5)] * 4
    fig = plot_occlusion(oc, images, groups={"a": [0, 1], "b": [2, 3]}, filters=2, cols=3)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    # group a: filter 0 on images 0, 1, filter 1 on images 0, 1; group b: filter 0 on images 2, 3 (1 is not
    # localised there): 6 panels, 2 full rows of 3
    assert len(visible) == 6 == len(fig.axes)
    assert all(ax.images for ax in visible)  # no empty panel
    assert [ax.get_title().split(" (")[0] for ax in visible] == ["l[0]", "l[0]", "l[1]", "l[1]", "l[0]", "l[0]"]
    one = plot_occlusion(oc, images, groups={"c": [2]}, filters=2)  # image 2 has filter 0: one panel
    assert len(one.axes) == 1 and one.axes[0].images
    wrapped = plot_occlusion(oc, images, groups={"a": [0, 1], "b": [2, 3]}, filters=2, cols=4)
    assert sum(not ax.get_visible() for ax in wrapped.axes) == 2  # only the last row has empty places
    none = plot_occlusion(_occlusion_fixture().__class__(**{**_occlusion_fixture().__dict__,
                                                         "occluded": np.ones((4, 4, 3), bool)}), images)
    assert len(none.axes) == 1 and "no filter is turned off" in none.axes[0].texts[0].get_text()


@pytest.mark.parametrize("kind", ["one class", "no dynamic filter"])
def test_report_says_why_the_tree_made_no_split(kind: str, tmp_path: Path) -> None:
    from nd_plugin.paths import PathStats
    from nd_plugin.report import analyze_paths, write_report

    rng = np.random.default_rng(0)
    labels = np.zeros(60, int) if kind == "one class" else np.arange(60) % 2
    paths = rng.random((60, 8)) < 0.5 if kind == "one class" else np.tile(rng.random(8) < 0.5, (60, 1))
    cc = np.stack([paths[labels == c].sum(0) for c in range(2)])
    stats = PathStats(["a", "b"], [4, 4], 60, paths.sum(0), cc, np.bincount(labels, minlength=2), classes=["x", "y"],
                      paths=paths, labels=labels, preds=labels)
    a = analyze_paths(stats, n_permutations=0)
    reason = a.tree.no_split_reason
    assert reason.startswith("every input is of one class (x)" if kind == "one class" else "no dynamic filter")
    index = write_report(a, tmp_path, figures=False)
    assert f"no split: {reason}" in index.read_text()
    assert json.loads((tmp_path / "analysis.json").read_text())["decision_tree"]["no_split_reason"] == reason


# --------------------------------------------------------------------------------------- bad input


def test_missing_checkpoint(tmp_path: Path) -> None:
    from nd_plugin.commands.analyze import build_report

    run = _make_run(tmp_path / "r", checkpoint=False)
    with pytest.raises(RunDirError, match="no checkpoint.pt"):
        build_report(run)
    with pytest.raises(RunDirError, match="does not exist"):
        build_report(tmp_path / "nothing")
    assert not (run / "report").exists()


def test_bad_images(tmp_path: Path) -> None:
    from nd_plugin.commands.analyze import build_report
    from nd_plugin.report import load_images

    run = _make_run(tmp_path / "r")
    with pytest.raises(DataError, match="does not exist"):
        build_report(run, images=[tmp_path / "missing.png"], n_permutations=0)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DataError, match="is not an image"):
        load_images([text], (32, 32), [0.5] * 3, [0.25] * 3)


def test_good_image_file(tmp_path: Path) -> None:
    from PIL import Image

    from nd_plugin.report import load_images

    img = tmp_path / "cat.png"
    Image.fromarray((np.random.default_rng(0).random((50, 40, 3)) * 255).astype(np.uint8)).save(img)
    batch, display = load_images([img], (32, 32), [0.5] * 3, [0.25] * 3)
    assert batch.shape == (1, 3, 32, 32) and display[0].shape == (32, 32, 3)
    assert display[0].max() <= 1.0


def test_patch_larger_than_image(tmp_path: Path) -> None:
    from nd_plugin.commands.analyze import build_report

    run = _make_run(tmp_path / "r")
    with pytest.raises(InputShapeError, match="patch 40 px does not fit the run's 32x32"):
        build_report(run, patch=40)


def test_classes_do_not_match(tmp_path: Path) -> None:
    from nd_plugin.commands.analyze import build_report

    run = _make_run(tmp_path / "r", classes=list("abcdefghij"))
    with pytest.raises(DataError, match="do not match the run's"):
        build_report(run, n_permutations=0)
    with pytest.raises(DataError, match="classes"):
        build_report(run, data="digits", n_permutations=0)


def test_cli_one_line_errors(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from nd_plugin.cli._analyze import analyze_command
    from nd_plugin.cli._app import user_errors

    app = typer.Typer()
    app.command("analyze")(user_errors(analyze_command))
    app.command("noop")(lambda: None)  # a second command keeps `analyze` a subcommand
    run = _make_run(tmp_path / "r", checkpoint=False)
    res = CliRunner().invoke(app, ["analyze", str(run)])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    assert "no checkpoint.pt" in res.output
    good = _make_run(tmp_path / "good")
    res = CliRunner().invoke(app, ["analyze", str(good), "--patch", "33"])
    assert res.exit_code == 2 and "patch 33 px" in res.output
    res = CliRunner().invoke(app, ["analyze", str(good), "--out", str(tmp_path / "rep"), "--no-figures", "--quiet"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith("index.html")
    assert json.loads((tmp_path / "rep" / "analysis.json").read_text())["occlusion"]["boxes"]
    for args, says in ((["--test", "dip"], "--test must be one of"), (["--alpha", "1.5"], "--alpha must be between 0 and 1")):
        res = CliRunner().invoke(app, ["analyze", str(good), "--no-figures", "--quiet", *args])
        assert res.exit_code == 2 and "Traceback" not in res.output and says in res.output, res.output
    res = CliRunner().invoke(app, ["analyze", str(good), "--out", str(tmp_path / "hop"), "--no-figures", "--quiet",
                                   "--test", "hopkins", "--occlusion-images", "0"])
    tree = json.loads((tmp_path / "hop" / "analysis.json").read_text())["decision_tree"]
    assert res.exit_code == 0 and tree["test"]["name"] == "hopkins" and tree["test"]["threshold"] == 0.75


# ----------------------------------------------------------------------------------- in a browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("needs Chromium (Debian: apt-get install -y chromium)")
    probe = report.parent / "_probe.html"
    # The report page in an iframe (same origin, file://); a script marks the result once every image settled.
    probe.write_text(
        """<!DOCTYPE html><html><body><iframe id="f" src="index.html" width="1400" height="900"></iframe>
<script>
document.getElementById('f').addEventListener('load', () => {
  const imgs = [...document.getElementById('f').contentDocument.images];
  const check = () => {
    if (!imgs.every(i => i.complete)) { setTimeout(check, 50); return; }
    const ok = imgs.filter(i => i.naturalWidth > 0).length;
    document.body.setAttribute('data-images', imgs.length + ':' + ok);
  };
  check();
});
</script></body></html>""",
        encoding="utf-8",
    )
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--allow-file-access-from-files",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
    ]
    try:
        dom = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
        shot = tmp_path / "report.png"
        subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1400,2000", report.as_uri()],
                       capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    match = re.search(r'data-images="(\d+):(\d+)"', dom)
    assert match, f"the probe did not finish: {dom[:300]!r}"
    total, loaded = int(match.group(1)), int(match.group(2))
    assert total == 7 and loaded == total
    assert shot.is_file() and shot.stat().st_size > 10_000
