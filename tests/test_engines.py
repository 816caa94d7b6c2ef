"""Engines timed as deployed: ONNX Runtime's settings, its own timing process, the settings recorded.

No timing is asserted (timings are measured by benchmarks): only that every setting is timed, for
both models, and recorded; that the timing process imports no torch; and that bad settings are a
typed error naming the parameter (one line and exit 2 from ``nd prune``).
"""

from __future__ import annotations

import ast
import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from nd_plugin.cli._app import app
from nd_plugin.commands.pruning import engine_latency, prune_run
from nd_plugin.errors import ConfigError, ExportError
from nd_plugin.pruning import engines, ort_timing
from nd_plugin.pruning.engines import onnx_latency, onnx_settings


def _net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4)).eval()


@pytest.fixture(scope="module")
def pair() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"dense": _net(8), "compact": _net(4)}


def _medians_ok(ms: dict[str, float]) -> bool:
    return set(ms) == {"dense", "compact"} and all(math.isfinite(v) and v > 0 for v in ms.values())


def test_onnx_settings_time_both_spinnings_and_one_thread() -> None:
    assert onnx_settings(4) == [
        {"threads": 4, "spinning": True},
        {"threads": 4, "spinning": False},
        {"threads": 1, "spinning": None},
    ]
    assert onnx_settings(4, "ON") == [{"threads": 4, "spinning": True}, {"threads": 1, "spinning": None}]
    assert onnx_settings(1, "off") == [{"threads": 1, "spinning": None}]  # one thread: no worker to spin


def test_onnx_latency_times_both_models_in_processes_of_their_own(pair: dict[str, nn.Module]) -> None:
    xs = [torch.randn(1, 3, 8, 8) for _ in range(3)]
    rows = onnx_latency(pair, xs, onnx_settings(2), repeats=2, warmup=1)
    assert [(r["threads"], r["spinning"], r["pool"], r["process"]) for r in rows] == [
        (2, True, "shared", "own"),
        (2, False, "per session", "own"),
        (1, None, "none", "own"),
    ]
    assert all(_medians_ok(r["ms"]) for r in rows)


def test_the_timing_process_imports_neither_torch_nor_the_package() -> None:
    """The timing process runs ``ort_timing`` as a file: its imports are the standard library's,
    numpy's and onnxruntime's only, so no torch thread pool lives next to the sessions."""
    tree = ast.parse(Path(ort_timing.__file__).read_text(encoding="utf-8"))
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert roots <= {
        "__future__",
        "json",
        "statistics",
        "sys",
        "time",
        "collections",
        "pathlib",
        "typing",
        "numpy",
        "onnxruntime",
    }


def test_a_failed_timing_process_is_an_export_error(
    pair: dict[str, nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "fails.py"
    script.write_text("import sys\nsys.exit('onnxruntime could not start')\n")
    monkeypatch.setattr(ort_timing, "__file__", str(script))
    with pytest.raises(ExportError, match="process of its own failed.*onnxruntime could not start"):
        onnx_latency(pair, [torch.randn(1, 3, 8, 8)], [{"threads": 1, "spinning": None}], repeats=1)


def test_a_shared_pool_setting_must_be_timed_alone() -> None:
    with pytest.raises(ValueError, match="process of its own"):
        ort_timing.time_sessions({}, [], [{"threads": 2, "spinning": True}, {"threads": 1, "spinning": None}], repeats=1)


def test_engine_latency_records_how_each_engine_was_timed(pair: dict[str, nn.Module]) -> None:
    forms = {"eager": pair["compact"], "onnx": pair["compact"]}
    out = engine_latency(pair["dense"], forms, torch.randn(4, 3, 8, 8), repeats=2, threads=2)
    eager, onnx = out["eager/b1"], out["onnx/b1"]
    assert eager["settings"] == {"threads": 2, "process": "caller"}
    assert onnx["settings"]["threads"] == 2 and onnx["settings"]["process"] == "own"
    assert onnx["settings"]["spinning"] in (True, False) and onnx["settings"]["onnx_spinning"] == "auto"
    assert [(m["threads"], m["spinning"]) for m in onnx["measured"]] == [(2, True), (2, False), (1, None)]
    asked = [m for m in onnx["measured"] if m["threads"] == 2]
    assert onnx["compact_ms"] == min(m["compact_ms"] for m in asked)  # auto: the faster spinning for the compact model
    assert onnx["fastest"]["compact_ms"] == min(m["compact_ms"] for m in onnx["measured"])
    for row in (eager, onnx, *onnx["measured"]):
        assert _medians_ok({"dense": row["dense_ms"], "compact": row["compact_ms"]})
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["compact_ms"])


def test_engine_latency_times_the_static_model_beside_the_eager_form(pair: dict[str, nn.Module]) -> None:
    out = engine_latency(pair["dense"], {"eager": pair["compact"]}, torch.randn(4, 3, 8, 8), repeats=3, threads=1, static=pair["dense"])
    eager = out["eager/b1"]
    assert _medians_ok({"dense": eager["dense_ms"], "compact": eager["compact_ms"]}) and eager["static_ms"] > 0
    assert eager["vs_static"] == pytest.approx(eager["static_ms"] / eager["compact_ms"])
    assert "static_ms" not in engine_latency(pair["dense"], {"eager": pair["compact"]}, torch.randn(2, 3, 8, 8), repeats=1)["eager/b1"]


def test_engine_latency_with_spinning_off_times_only_that(pair: dict[str, nn.Module]) -> None:
    out = engine_latency(
        pair["dense"], {"onnx": pair["compact"]}, torch.randn(2, 3, 8, 8), repeats=1, threads=2, onnx_spinning="off"
    )
    assert out["onnx/b1"]["settings"]["spinning"] is False
    assert [(m["threads"], m["spinning"]) for m in out["onnx/b1"]["measured"]] == [(2, False), (1, None)]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"threads": 0}, "threads"),
        ({"threads": -2}, "threads"),
        ({"threads": 1.5}, "threads"),
        ({"onnx_spinning": "sometimes"}, "onnx_spinning"),
        ({"static_match": "flops"}, "static_match"),
        ({"match_tolerance": -0.001}, "match_tolerance"),
        ({"match_tolerance": 1.0}, "match_tolerance"),
        ({"match_tolerance": "some"}, "match_tolerance"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_parameter(tmp_path: Path, kwargs: dict, param: str) -> None:
    with pytest.raises(ConfigError, match=f"^{param} must be") as info:
        prune_run(tmp_path / "run", **kwargs)
    assert info.value.params == (param,)
    if param in ("threads", "onnx_spinning"):  # engine_latency's own settings
        with pytest.raises(ConfigError, match=f"^{param} must be"):
            engine_latency(_net(2), {"eager": _net(2)}, torch.randn(1, 3, 8, 8), repeats=1, **kwargs)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--threads", "0"], "--threads"),
        (["--onnx-spinning", "sometimes"], "--onnx-spinning"),
        (["--static-match", "flops"], "--static-match"),
        (["--match-tolerance", "1.5"], "--match-tolerance"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(tmp_path: Path, args: list[str], flag: str) -> None:
    result = CliRunner().invoke(app, ["prune", str(tmp_path / "run"), *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and f"{flag} must be" in lines[0], result.output


def test_the_engine_table_shows_the_settings_and_the_fastest() -> None:
    from rich.console import Console

    from nd_plugin.cli._prune import print_engines

    def timing(threads: int, spinning: bool | None, compact: float) -> dict:
        return {"threads": threads, "spinning": spinning, "dense_ms": 1.0, "compact_ms": compact, "speedup": 1.0 / compact}

    measured = [timing(2, True, 0.8), timing(2, False, 0.9), timing(1, None, 0.7)]
    onnx = {"engine": "onnx", "batch": 1, **{k: measured[0][k] for k in ("dense_ms", "compact_ms", "speedup")}}
    onnx |= {"settings": {"threads": 2, "spinning": True, "process": "own"}, "measured": measured, "fastest": measured[2]}
    old = {"engine": "eager", "batch": 1, "dense_ms": 3.0, "compact_ms": 2.0, "speedup": 1.5}  # a prune.json from before
    result = {"engines": {"eager/b1": old, "onnx/b1": onnx}, "latency_ms": {"threads": 2, "repeats": 10}, "accuracy": {}}
    console = Console(file=io.StringIO(), width=400)
    print_engines(result, console)
    text = console.file.getvalue()
    assert "2 threads, spinning, own process" in text and "Fastest: 1 thread (dense 1.00 ms, 1.43x)" in text
    assert "2 threads, no spinning: 0.90 ms" in text


@pytest.mark.parametrize("threads", [0, None, 2.0])
def test_a_bad_setting_is_a_config_error_naming_settings(pair: dict[str, nn.Module], threads: object) -> None:
    with pytest.raises(ConfigError, match=r"^settings\[0\]\['threads'\] must be a positive integer") as info:
        onnx_latency(pair, [torch.randn(1, 3, 8, 8)], [{"threads": threads, "spinning": None}], repeats=1)
    assert info.value.params == ("settings",)


def test_engine_runner_onnx_sets_spinning_explicitly(pair: dict[str, nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = ort_timing.ort_session

    def recording(model: bytes, threads: int | None, spinning: bool, **kwargs: bool) -> object:
        seen.append((threads, spinning))
        return real(model, threads, spinning, **kwargs)

    monkeypatch.setattr(ort_timing, "ort_session", recording)
    engines.engine_runner("onnx", pair["dense"], torch.randn(1, 3, 8, 8), threads=2)(torch.randn(1, 3, 8, 8))
    assert seen == [(2, False)]
