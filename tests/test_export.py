"""Export: weights + manifest rebuilt with weights_only, torch.export and ONNX, and `nd prune` bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers import TinyNet, decoupled

import nd_plugin
from nd_plugin.commands.pruning import prune_run
from nd_plugin.errors import ConfigError, ExportError, RunDirError
from nd_plugin.pruning import export as export_mod
from nd_plugin.pruning import prune
from nd_plugin.pruning.export import export, load


@pytest.fixture(scope="module")
def compact_tiny():
    dm, stats, x = decoupled("tiny")
    return prune(dm, stats), x


def test_export_writes_checked_forms_and_load_rebuilds(compact_tiny, tmp_path: Path) -> None:
    compact, x = compact_tiny
    out = tmp_path / "export"
    result = export(compact, out, x)
    assert {p.name for p in out.iterdir()} == {"manifest.json", "weights.pt", "model.pt2", "model.onnx", "prune.json"}
    formats = {c["format"]: c for c in result["checks"]}
    assert formats.keys() == {"torch.export", "onnx"} and all(c["ok"] for c in formats.values())
    assert json.loads((out / "prune.json").read_text())["ok"] is True
    torch.manual_seed(0)
    rebuilt = load(out, model=TinyNet())  # not a registry model: the base network is passed in
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), compact(x), rtol=1e-5, atol=1e-6)
    assert [s.name for s in rebuilt.gate_sites] == [s.name for s in compact.gate_sites]
    assert not list(tmp_path.glob(".export.tmp-*"))


def test_load_by_registry_name(tmp_path: Path) -> None:
    adapters = pytest.importorskip("nd_plugin.adapters")
    dm, stats, x = decoupled("cifar:resnet20")
    compact = prune(dm, stats)
    result = export(
        compact, tmp_path / "e", x[:8], model_spec={"name": "cifar:resnet20", "num_classes": 10}, formats=("weights",)
    )
    assert result["checks"][0]["format"] == "weights+manifest (eager)" and result["ok"]
    rebuilt = nd_plugin.load(tmp_path / "e")
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), compact(x), rtol=1e-5, atol=1e-6)
    del adapters


def test_non_empty_export_dir_needs_force(compact_tiny, tmp_path: Path) -> None:
    compact, x = compact_tiny
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="pass force=True"):
        export(compact, out, x, formats=("weights",))
    assert (out / "keep.txt").read_text() == "mine"
    export(compact, out, x, formats=("weights",), force=True)
    assert not (out / "keep.txt").exists() and (out / "weights.pt").is_file()


def test_failed_check_leaves_nothing(compact_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compact, x = compact_tiny
    monkeypatch.setattr(export_mod, "CHECK_RTOL", -1.0)  # every check fails
    with pytest.raises(ExportError, match="check failed"):
        export(compact, tmp_path / "export", x, formats=("pt2",))
    assert list(tmp_path.iterdir()) == []


def _fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": "cifar:resnet20", "num_classes": 10, "input_size": [3, 32, 32]}))
    return run


def test_prune_run_without_paths_says_how_to_make_them(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="paths.npz.*nd "):
        prune_run(_fake_run(tmp_path))


@pytest.mark.parametrize("tolerance", [-0.5, 0.5, 1.0])
def test_prune_run_tolerance_outside_range(tmp_path: Path, tolerance: float) -> None:
    with pytest.raises(ConfigError, match=r"\[0, 0.5\)"):
        prune_run(_fake_run(tmp_path), tolerance=tolerance)


def test_prune_run_refuses_non_empty_export_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        prune_run(_fake_run(tmp_path), out)


def test_cli_prints_one_line_for_user_errors(tmp_path: Path) -> None:
    typer_testing = pytest.importorskip("typer.testing")
    from nd_plugin.cli._app import app, user_errors
    from nd_plugin.cli._prune import prune_command

    if not any(c.name == "prune" for c in app.registered_commands):
        app.command("prune")(user_errors(prune_command))
    result = typer_testing.CliRunner().invoke(app, ["prune", str(_fake_run(tmp_path)), "--tolerance", "1.5"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "tolerance" in lines[0]


def test_prune_run_decides_per_layer_and_exports_static_forms(resnet20_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = prune_run(resnet20_run, out, latency_repeats=2, round_to=8, engines=["eager", "ort"])
    decisions = result["deployment"]["decisions"]
    assert [d["site"] for d in decisions] == json.loads((out / "manifest.json").read_text())["prune"]["sites"]
    assert all(d["mode"] in ("dynamic", "static") and d["reason"] for d in decisions)
    assert set(result["engines"]) == {"eager/b1", "onnx/b1"}
    recorded = json.loads((resnet20_run / "prune.json").read_text())["engines"]  # how each engine was timed
    assert recorded["eager/b1"]["settings"]["process"] == "caller" and recorded["onnx/b1"]["settings"]["process"] == "own"
    assert {m["threads"] for m in recorded["onnx/b1"]["measured"]} >= {1} and "fastest" in recorded["onnx/b1"]
    assert all(c["ok"] for c in result["checks"]) and {c["format"] for c in result["checks"]} >= {"onnx", "torch.export"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert "cannot skip" in manifest["engines"]["onnx"] and manifest["static"]["static"] == manifest["static"]["sites"]
    static = nd_plugin.load(out, form="static")
    assert list(static.gate_sites) == [] and all(len(k) % 8 == 0 for k in manifest["static"]["kept"].values())
    program = torch.export.load(out / "model.pt2").module()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(program(x), static(x), rtol=1e-4, atol=1e-4)
    assert json.loads((resnet20_run / "prune.json").read_text())["round_to"] == 8


def test_prune_run_tolerance_reports_agreement_instead_of_failing(resnet20_run: Path) -> None:
    result = prune_run(resnet20_run, tolerance=0.3, latency_repeats=1, engines=["eager"])
    assert result["equality"]["strict"] is False and result["equality"]["ok"] is True


def test_prune_run_traces_each_network_once(resnet20_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``nd prune`` builds one torch-pruning DependencyGraph per network it works on, three in all:

    1. ``Run.build_model`` -> ``wrap()``: the network as the registry builds it (no gates yet), to
       find the gate sites;
    2. the gated network: every record (the exact compact model, the static one, the per-layer mix)
       is decided on this graph and applied to a copy of the model without tracing the copy;
    3. its gate-free twin (every gate replaced by conv + norm): the runtime plan (consumers, norms
       to fold) of every compact form, their expected FLOPs, the dense baseline's folding and the
       dynamic value's FLOPs counter all use it (removing filters changes none of it).

    The compact networks are the gated and the gate-free network with fewer channels: no graph of
    their own. (With ``--export``, the export's own check rebuilds each form from the directory
    alone, as a user's ``nd_plugin.load`` does, and traces that rebuild.)
    """
    import torch_pruning as tp

    from nd_plugin.gates import GatedSite
    from nd_plugin.pruning import FixedSite

    built: list[str] = []
    build = tp.DependencyGraph.build_dependency

    def counting(self, model, *args, **kwargs):
        kinds = {type(m) for m in model.modules()}
        built.append("gated" if GatedSite in kinds else "gate-free" if FixedSite in kinds else "as built")
        return build(self, model, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", counting)
    prune_run(resnet20_run, latency_repeats=1, engines=["eager", "onnx"])
    assert built == ["as built", "gated", "gate-free"]


def test_unknown_engine_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown engine 'tensorrt'"):
        prune_run(_fake_run(tmp_path), engines=["tensorrt"])


def test_engine_not_installed_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ExportError, match="needs onnxruntime.*pip install onnxruntime"):
        prune_run(_fake_run(tmp_path), engines=["ort"])
    typer_testing = pytest.importorskip("typer.testing")
    from nd_plugin.cli._app import app

    result = typer_testing.CliRunner().invoke(app, ["prune", str(_fake_run(tmp_path / "cli")), "--engine", "ort"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "onnxruntime" in lines[0]


@pytest.mark.parametrize("raw", ["aoti", "AOTInductor", "aot"])
def test_aoti_aliases_name_one_engine(raw: str) -> None:
    from nd_plugin.pruning.engines import check_engines

    assert check_engines([raw, "eager"]) == ("aoti", "eager")


@pytest.mark.parametrize("engine", ["aoti", "compile"])
def test_engine_without_a_compiler_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ExportError, match=f"engine '{engine}' needs a C\\+\\+ compiler"):
        prune_run(_fake_run(tmp_path), engines=[engine])


@pytest.mark.slow
def test_aoti_export_is_checked_and_loads_without_pickles(compact_tiny, tmp_path: Path) -> None:
    compact, x = compact_tiny
    out = tmp_path / "export"
    result = export(compact, out, x, formats=("aoti",))
    assert [c["format"] for c in result["checks"]] == ["aotinductor"] and result["ok"]
    runner = torch._inductor.aoti_load_package(str(out / "model_aoti.pt2"))
    with torch.no_grad():
        for batch in (1, 3):
            assert torch.allclose(runner(x[:batch]), compact(x[:batch]), rtol=1e-4, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["aoti"] == "model_aoti.pt2" and "AOTInductor" in manifest["engines"]["aoti"]
