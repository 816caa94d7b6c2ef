"""Faults: damaged or foreign run artefacts, kills mid-write, a held --out, resume after damage.

The fault matrix: every artefact a command (or the API, where no command reads it) reads is
truncated, emptied, replaced by another model's, or made unreadable; each case must end in one
line naming the file, exit 2 (``NDError`` for the API), no traceback, and no other file touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nd_plugin.cli._app import app
from nd_plugin.commands.decoupling import decouple
from nd_plugin.errors import NDError
from nd_plugin.run import open_run
from nd_plugin.training.config import TrainConfig

TINY = dict(data="synthetic:64", batch_size=32, bn_recalibrate=2, epochs=1, warmup_epochs=0, ratio=0.5, device="cpu")
FAULTS = ("truncated", "emptied", "foreign", "unreadable")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ND = [sys.executable, "-m", "nd_plugin.cli._app"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished cifar:resnet20 run (warm-up + decoupling: two checkpoints) and a cifar:resnet32 run
    (the 'other model'), each with an export."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for key, model, warmup in (("run", "cifar:resnet20", 1), ("other", "cifar:resnet32", 0)):
        decouple(TrainConfig(model=model, **{**TINY, "warmup_epochs": warmup}), root / key, progress=False)
        made[key] = root / key
    for key in ("run", "other"):  # weights + manifest only: the other formats have their own tests
        from nd_plugin.pruning import prune
        from nd_plugin.pruning.export import export

        run = open_run(made[key])
        dm = run.build_model()
        x = torch.randn(4, 3, 32, 32)
        spec = {"name": run.config["model"], "num_classes": 10, "input_size": [3, 32, 32]}
        export(prune(dm, run.stats()), root / f"{key}-export", x, model_spec=spec, formats=("weights",))
        made[f"{key}-export"] = root / f"{key}-export"
    return made


def _snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and os.access(p, os.R_OK):
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(folder))] = "dir" if p.is_dir() else "unreadable"
    return out


def _damage(file: Path, fault: str, foreign: Path) -> None:
    if fault == "truncated":
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
    elif fault == "emptied":
        file.write_bytes(b"")
    elif fault == "foreign":
        shutil.copyfile(foreign, file)
    elif os.geteuid() == 0:  # root reads any file: a folder in its place cannot be read either
        file.unlink()
        file.mkdir()
    else:
        file.chmod(0)


def _one_line_exit_2(args: list[str], name: str) -> str:
    result = CliRunner().invoke(app, args)
    message = result.stderr.strip()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and message.count("\n") == 0 and message.startswith("error:"), message
    assert name in message, message
    return message


# --- the matrix: artefacts a command reads ----------------------------------------------------
CLI_CASES = [("checkpoint.pt", "prune"), ("paths.npz", "prune"), ("config.json", "prune"), ("config.json", "analyze")]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name, command", CLI_CASES)
def test_damaged_artefact_read_by_a_command(runs: dict[str, Path], tmp_path: Path, name: str, command: str, fault: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    _damage(run / name, fault, runs["other"] / name)
    before = _snapshot(run)
    message = _one_line_exit_2([command, str(run), "--repeats", "1"] if command == "prune" else [command, str(run), "--no-figures", "--quiet"], name)
    assert "nd " in message  # names the command that writes it again
    assert _snapshot(run) == before  # nothing else touched, nothing written


API_CASES: list[tuple[str, str, Callable[[Path], object]]] = [
    ("run", "summary.json", lambda p: open_run(p).summary()),
    ("run", "metrics.jsonl", lambda p: open_run(p).metrics()),
    ("run-export", "manifest.json", lambda p: __import__("nd_plugin").load(p)),
    ("run-export", "weights.pt", lambda p: __import__("nd_plugin").load(p)),
]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("where, name, read", API_CASES, ids=[c[1] for c in API_CASES])
def test_damaged_artefact_read_by_the_api(runs: dict[str, Path], tmp_path: Path, where: str, name: str, read, fault: str) -> None:
    folder = tmp_path / where
    shutil.copytree(runs[where], folder)
    _damage(folder / name, fault, runs[where.replace("run", "other")] / name)
    before = _snapshot(folder)
    with pytest.raises(NDError) as info:
        read(folder)
    message = str(info.value)
    assert name in message and "\n" not in message and "nd " in message, message
    assert _snapshot(folder) == before


@pytest.fixture(scope="module")
def detector_runs(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both runs with their detectors fitted and saved (RUN/detector*.npz), as `nd detect` leaves them."""
    from nd_plugin.detect.protocol import fit_detectors

    root = tmp_path_factory.mktemp("detector-runs")
    made = {}
    for key in ("run", "other"):
        shutil.copytree(runs[key], root / key)
        run = open_run(root / key)
        dm = run.build_model()
        fit_detectors(dm, run.data().loader("train", batch_size=32, shuffle=False), meta={"data": "synthetic:64"}).save(run.path)
        made[key] = root / key
    return made


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_detector_cache(detector_runs: dict[str, Path], tmp_path: Path, fault: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(detector_runs["run"], run)
    _damage(run / "detector.npz", fault, detector_runs["other"] / "detector.npz")
    before = _snapshot(run)
    message = _one_line_exit_2(["detect", str(run), "--n", "16", "--seeds", "1"], "detector.npz")
    assert "--refit" in message
    assert _snapshot(run) == before  # not silently refitted over


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"model": torch.nn.Linear(2, 2), "epoch": 0}, "holds pickled Python objects (torch.nn.modules.linear.Linear); nd-plugin loads tensors only"),
        ({"state_dict": {"w": torch.zeros(2)}}, "is not an nd-plugin checkpoint (found keys ['state_dict'], expected 'model' and 'epoch')"),
        ({"model": {"w": torch.zeros(2)}, "epoch": 0}, "holds weights of another model"),
    ],
    ids=["pickled-module", "other-dict", "other-weights"],
)
def test_checkpoint_holding_something_else_names_the_way_out(runs: dict[str, Path], tmp_path: Path, content: dict, expected: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    torch.save(content, run / "checkpoint.pt")
    before = _snapshot(run)
    message = _one_line_exit_2(["prune", str(run)], "checkpoint.pt")
    assert expected in message and "--resume" in message, message
    assert _snapshot(run) == before


# --- resume after damage, kills mid-write ----------------------------------------------------
def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("damaged", ["truncated", "foreign", "missing"])  # missing: killed between the two renames
def test_resume_on_a_damaged_latest_checkpoint_falls_back_and_loses_nothing(runs: dict[str, Path], tmp_path: Path, damaged: str) -> None:
    whole, run = runs["run"], tmp_path / "run"
    shutil.copytree(whole, run)
    if damaged == "missing":
        (run / "checkpoint.pt").unlink()
    else:
        _damage(run / "checkpoint.pt", damaged, runs["other"] / "checkpoint.pt")  # epoch 2's checkpoint lost
    result = CliRunner().invoke(app, ["decouple", "cifar:resnet20", "--out", str(run), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "resuming after epoch 1 from" in result.stderr and "checkpoint.prev.pt" in result.stderr
    assert _epochs(run) == [1, 2]  # epoch 2 trained again, once
    a, b = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (whole, run))
    assert a["epoch"] == b["epoch"] == 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # as if never interrupted
    assert (run / "checkpoint.prev.pt").is_file() and (run / "checkpoint.pt.damaged").exists() == (damaged != "missing")


def test_resume_with_no_good_checkpoint_says_so(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        _damage(run / name, "truncated", runs["other"] / name)
    before = _snapshot(run)
    message = _one_line_exit_2(["decouple", "cifar:resnet20", "--out", str(run), "--resume", "--quiet"], "checkpoint.pt")
    assert "no good checkpoint" in message and "--overwrite" in message
    assert _snapshot(run) == before


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([*ND, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _temp(parent: Path, name: str, inner: str) -> Callable[[], bool]:
    return lambda: any((d / inner).exists() for d in parent.glob(f".{name}.tmp-*"))


@pytest.mark.slow
@pytest.mark.parametrize("existing", [False, True])
def test_kill_during_prune_export_and_analyze_leaves_complete_or_nothing(runs: dict[str, Path], tmp_path: Path, existing: bool) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    export, report = tmp_path / "export", run / "report"
    if existing:  # a finished output from before stays whole
        assert subprocess.run([*ND, "analyze", str(run), "--no-figures", "--quiet"], env=ENV, capture_output=True).returncode == 0
        shutil.copytree(runs["run-export"], export)
    old = {p: _snapshot(p) for p in (export, report) if p.exists()}
    _kill_when(_start(["prune", str(run), "--export", str(export), "--force", "--repeats", "1"]), _temp(tmp_path, "export", "manifest.json"))
    _kill_when(_start(["analyze", str(run), "--quiet"]), _temp(run, "report", "filter_states.png"))
    for folder in (export, report):
        assert _snapshot(folder) == old[folder] if existing else not folder.exists()
    done = subprocess.run([*ND, "prune", str(run), "--export", str(export), "--force", "--repeats", "1"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {"manifest.json", "weights.pt", "model.pt2", "model.onnx", "prune.json"} <= {p.name for p in export.iterdir()}
    assert not list(tmp_path.glob(".export.*"))  # the killed run's temporary folder is swept away


@pytest.mark.slow
def test_second_decouple_into_a_held_out_is_refused_and_a_stale_lock_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["decouple", "cifar:resnet20", "--data", "synthetic:320", "--batch-size", "16", "--epochs", "3",
            "--warmup-epochs", "0", "--out", str(out), "--quiet"]  # fmt: skip
    proc = _start(args)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (out / "config.json").is_file():
        time.sleep(0.05)
    holder = (out / ".lock").read_text().strip()
    assert holder == str(proc.pid)
    before = _snapshot(out)
    for extra in (["--overwrite"], ["--resume"]):
        message = _one_line_exit_2([*args, *extra], ".lock")
        assert f"in use by another nd decouple (pid {proc.pid}" in message
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert {k: v for k, v in _snapshot(out).items() if not k.startswith("checkpoint") and k != "metrics.jsonl"} == {
        k: v for k, v in before.items() if not k.startswith("checkpoint") and k != "metrics.jsonl"
    }
    assert (out / ".lock").read_text().strip() == holder  # a stale lock of a dead pid
    result = CliRunner().invoke(app, ["decouple", "cifar:resnet20", "--data", "synthetic:64", "--epochs", "1", "--warmup-epochs", "0",
                                      "--out", str(out), "--overwrite", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (out / ".lock").exists() and _epochs(out) == [1]
