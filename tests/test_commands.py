"""Tests of the commands layer (nd_plugin.commands, nd_plugin.files) and of the Trainer's contract with it."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nd_plugin
from nd_plugin.errors import ConfigError, RunDirError

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("timm", "torchvision", "torch_pruning", "fvcore", "sklearn", "matplotlib")


# ----------------------------------------------------------------------------- public names
def test_public_names_come_from_their_one_home() -> None:
    """Each public name has one module; the package's face hands out that module's object."""
    from nd_plugin import run
    from nd_plugin.commands import analyze, decoupling, detect, pruning

    assert nd_plugin.decouple is decoupling.decouple
    assert nd_plugin.open_run is run.open_run and nd_plugin.Run is run.Run
    assert callable(analyze.build_report) and callable(pruning.prune_run) and callable(detect.run_detection)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        nd_plugin.nope  # noqa: B018


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("nd_plugin.training.trainer", "decouple"),
        ("nd_plugin.report", "build_report"),
        ("nd_plugin.report", "_analysis_data"),
        ("nd_plugin.pruning.export", "prune_run"),
        ("nd_plugin.detect", "run_detection"),
        ("nd_plugin.detect.workflow", "run_detection"),
        ("nd_plugin.detect.workflow", "load_or_fit"),
        ("nd_plugin.commands", "open_run"),
    ],
)
def test_no_moved_name_is_kept_at_its_old_place(module: str, name: str) -> None:
    import importlib

    assert not hasattr(importlib.import_module(module), name)


def test_import_nd_plugin_and_its_commands_stays_light() -> None:
    code = f"import sys, nd_plugin, nd_plugin.commands, nd_plugin.run; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def _imports(file: Path) -> set[str]:
    tree = ast.parse(file.read_text(encoding="utf-8"))
    return {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module for a in n.names}


def test_the_cli_runs_decouple_analyze_and_detect_through_the_commands_layer() -> None:
    found = set().union(*(_imports(ROOT / "cli" / f) for f in ("_app.py", "_analyze.py", "_detect.py")))
    assert {"nd_plugin.commands.decoupling.decouple", "nd_plugin.commands.analyze.build_report",
            "nd_plugin.commands.detect.run_detection"} <= found
    assert not {i for i in found if i.startswith(("nd_plugin.training.trainer.", "nd_plugin.report.", "nd_plugin.detect."))}


def test_only_the_atomic_helpers_rename_files_into_place() -> None:
    """Every write of nd_plugin goes through nd_plugin.files; the run directory rotates its checkpoints."""
    renaming = sorted(
        str(f.relative_to(ROOT)) for d in ("nd_plugin", "adapters", "cli") for f in (ROOT / d).rglob("*.py")
        if "os.replace(" in f.read_text(encoding="utf-8")
    )
    assert renaming == ["nd_plugin/files.py", "nd_plugin/run.py"]


# ------------------------------------------------------------------------------ atomic writes
def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    from nd_plugin.files import atomic_path, atomic_write_text

    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="killed"), atomic_path(target) as part:
        part.write_text("half a fi", encoding="utf-8")
        raise RuntimeError("killed")
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_save_checkpoint_keeps_the_one_before(tmp_path: Path) -> None:
    from nd_plugin.files import load_tensors
    from nd_plugin.run import CHECKPOINT, PREVIOUS, save_checkpoint

    for epoch in (0, 1, 2):
        save_checkpoint(tmp_path, {"model": {"w": torch.full((2,), float(epoch))}, "epoch": epoch}, "cifar:resnet20")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, PREVIOUS])
    latest, before = (load_tensors(tmp_path / n, fix="") for n in (CHECKPOINT, PREVIOUS))
    assert (latest["epoch"], before["epoch"]) == (2, 1)
    assert latest["model"]["w"].tolist() == [2.0, 2.0] and latest["model_name"] == "cifar:resnet20"


def test_run_detections_reads_every_detect_json_and_skips_broken_ones(tmp_path: Path) -> None:
    from nd_plugin.run import Run

    for tag, text in (("pgd-eps0.1", '{"attack": "pgd"}'), ("fgsm-eps0.1", '{"attack": "fgsm"}'), ("bim-eps0.1", "{not json")):
        (tmp_path / "detect" / tag).mkdir(parents=True)
        (tmp_path / "detect" / tag / "detect.json").write_text(text, encoding="utf-8")
    assert [d["attack"] for d in Run(tmp_path).detections()] == ["fgsm", "pgd"]  # tag order; bim's file is damaged


def test_open_run_of_a_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="is not a run directory .no config.json."):
        nd_plugin.open_run(tmp_path)


# ------------------------------------------------------------------------------- RNG on resume
def test_rng_states_round_trip_exactly_through_a_checkpoint(tmp_path: Path) -> None:
    """NumPy's position in its key and its cached Gaussian, and random's cached Gaussian, come back too."""
    from nd_plugin.files import atomic_save, load_tensors
    from nd_plugin.training.trainer import _rng_state, _set_rng_state

    np.random.seed(3)
    np.random.rand(5)  # 10 of 624 words used: the position is no longer 624
    np.random.randn()  # leaves the second Gaussian of a pair cached
    random.seed(3)
    random.gauss(0, 1)  # the same in Python's random
    atomic_save(_rng_state(), tmp_path / "rng.pt")
    expected = (np.random.rand(3).tolist(), np.random.randn(3).tolist(), random.gauss(0, 1), random.random())
    np.random.rand(1000), random.random()  # move on
    _set_rng_state(load_tensors(tmp_path / "rng.pt", fix=""))  # what --resume does (weights_only)
    assert (np.random.rand(3).tolist(), np.random.randn(3).tolist(), random.gauss(0, 1), random.random()) == expected


def test_rng_state_of_an_old_checkpoint_still_loads() -> None:
    from nd_plugin.training.trainer import _rng_state, _set_rng_state

    old = {k: v for k, v in _rng_state().items() if k in ("torch", "numpy", "python")}  # before numpy_pos etc.
    _set_rng_state(old)
    assert np.random.get_state()[2] == 624


# --------------------------------------------------------------------- the Trainer's config
@pytest.fixture(scope="module")
def tiny():
    from nd_plugin.adapters import create_model
    from nd_plugin.data import load_data

    data = load_data("synthetic:64")
    torch.manual_seed(0)
    dm = nd_plugin.wrap(create_model("cifar:resnet20", num_classes=data.num_classes), torch.zeros(1, *data.input_size))
    return dm, data


def test_trainer_resolves_an_unresolved_config(tiny) -> None:
    from nd_plugin.training.config import TrainConfig
    from nd_plugin.training.trainer import Trainer

    dm, data = tiny
    cfg = TrainConfig(model="cifar:resnet20", data="synthetic:64", epochs=1, warmup_epochs=0, batch_size=32)
    trainer = Trainer(dm, data, cfg, progress=False)
    # the defaults of TrainConfig.resolved(): seed Table A's CIFAR-ResNet lambdas and R = 0.6, lr 0.05 from scratch
    assert (trainer.cfg.lambda_m, trainer.cfg.lambda_s, trainer.cfg.ratio, trainer.cfg.lr, trainer.cfg.acm_lr) == (0.01, 1.5e-4, 0.6, 0.05, 0.1)
    assert cfg.lr is None  # the caller's config is not changed
    assert sorted(g["lr"] for g in trainer.optimizer.param_groups) == [0.05, 0.1]  # the network, the gates


FULL = {  # every option that resolved() would fill in, given
    "model": "cifar:resnet20", "data": "synthetic:64", "ratio": 0.6, "lambda_m": 0.01, "lambda_k": 1.0, "lambda_s": 1.5e-4,
    "epochs": 1, "warmup_epochs": 0, "lr": 0.05, "acm_lr": 0.1, "batch_size": 32,
}


def test_trainer_refuses_an_invalid_config(tiny) -> None:
    """An option only TrainConfig checks (a schedule the Trainer would silently run as 'step')."""
    from nd_plugin.training.config import TrainConfig
    from nd_plugin.training.trainer import Trainer

    dm, data = tiny
    with pytest.raises(ConfigError, match="schedule must be one of step, cosine, got 'linear'"):
        Trainer(dm, data, TrainConfig(**{**FULL, "schedule": "linear"}), progress=False)


def test_trainer_writes_only_through_its_callback(tiny, tmp_path: Path, monkeypatch) -> None:
    from nd_plugin.training.config import TrainConfig
    from nd_plugin.training.trainer import Trainer

    dm, data = tiny
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(model="cifar:resnet20", data="synthetic:64", epochs=1, warmup_epochs=0, batch_size=32, bn_recalibrate=1)
    seen = []
    Trainer(dm, data, cfg, progress=False, on_epoch_end=lambda t, epoch: seen.append((epoch, len(t.history)))).fit()
    assert seen == [(0, 1)]
    assert list(tmp_path.iterdir()) == []  # no run directory given: nothing written anywhere
