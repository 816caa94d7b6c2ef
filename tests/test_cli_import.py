"""``nd --import MODULE``: a user's module registers a data source and a model, and the command names them."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nd_plugin.adapters import list_models, unregister_model
from nd_plugin.cli._app import app
from nd_plugin.data import list_data_sources, unregister_data_source

PLUGIN = """
import torch
from torch import nn

from nd_plugin.adapters import register_model
from nd_plugin.data import DataBundle, TensorImageDataset, register_data_source


@register_data_source("stripes2", argument="N", optional=True)
def stripes2(arg, *, image_size=None, train_augment=True, download=False):
    n = int(arg or 30)
    y = torch.arange(n) % 2
    x = torch.zeros(n, 3, 8, 8)
    x[y == 0, :, :, ::2] = 1.0
    x[y == 1, :, ::2, :] = 1.0
    ds = TensorImageDataset(x, y, (0.5,) * 3, (0.5,) * 3, classes=["vertical", "horizontal"])
    return DataBundle(ds, ds, 2, ["vertical", "horizontal"], (0.5,) * 3, (0.5,) * 3, (3, 8, 8), name=f"stripes2:{n}")


@register_model("tiny2")
def tiny2(num_classes: int = 2) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The module ``nd_user_plugin`` in tmp_path, on sys.path; what it registers is undone afterwards."""
    name = "nd_user_plugin"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    (tmp_path / "more_models.py").write_text(
        "from nd_plugin.adapters import register_model\nfrom nd_user_plugin import tiny2\nregister_model('tiny3', tiny2)\n"
    )
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in (name, "more_models", "broken_plugin"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    yield name
    for model in ("tiny2", "tiny3"):
        if f"registered:{model}" in list_models("registered:*"):
            unregister_model(model)
    if "stripes2[:N]" in list_data_sources():
        unregister_data_source("stripes2")
    for mod in (name, "more_models", "broken_plugin"):
        sys.modules.pop(mod, None)


def test_import_registers_a_data_source_and_a_model_for_the_command(plugin: str, tmp_path: Path) -> None:
    listed = CliRunner().invoke(app, ["--import", plugin, "models", "registered:*"])
    assert listed.exit_code == 0, listed.output
    assert listed.output.split() == ["registered:tiny2"]
    out = tmp_path / "run"
    args = ["--import", plugin, "decouple", "tiny2", "--data", "stripes2:32", "--epochs", "1", "--warmup-epochs", "0",
            "--batch-size", "16", "--device", "cpu", "--out", str(out), "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == "stripes2:32" and config["model"] == "registered:tiny2"


def test_nd_import_env_var_is_comma_separated_and_takes_files(plugin: str, tmp_path: Path) -> None:
    env = {"ND_IMPORT": f"{plugin}, {tmp_path / 'more_models.py'}"}
    listed = CliRunner().invoke(app, ["models", "registered:*"], env=env)
    assert listed.exit_code == 0, listed.output
    assert listed.output.split() == ["registered:tiny2", "registered:tiny3"]


@pytest.mark.parametrize(
    "module, reason",
    [("no_such_plugin_xyz", "ModuleNotFoundError: No module named 'no_such_plugin_xyz'"),
     ("broken_plugin", "RuntimeError: boom at import"),
     ("missing/plugin.py", "FileNotFoundError: no file")],
)  # fmt: skip
def test_a_module_that_does_not_import_is_one_line_and_exit_2(plugin: str, module: str, reason: str) -> None:
    result = CliRunner().invoke(app, ["--import", module, "models", "registered:*"])
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert f"error: --import {module} failed: {reason}" in text and len(text.splitlines()) == 1 and "Traceback" not in text
