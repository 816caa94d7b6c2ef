"""What ``nd`` tells a user during a normal command: messages true to the options, no third-party warnings.

Run in a fresh interpreter: a warning raised on a library's first import (``import fvcore.nn``
calls the deprecated ``torch.jit.script``) would not show in a process where an earlier test
imported it already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

# what the `nd` console script runs (``-m nd_plugin.cli._app`` would add runpy's own RuntimeWarning)
ND = [sys.executable, "-W", "default::FutureWarning", "-c", "from nd_plugin.cli import main; main()"]
ROOT = Path(__file__).resolve().parents[1]


def test_decouple_from_weights_says_so_and_leaks_no_warning(tmp_path: Path) -> None:
    from nd_plugin.adapters import create_model

    warmup = 1
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(create_model("cifar:resnet20", num_classes=10).state_dict(), weights)
    out = tmp_path / "run"
    args = ["decouple", "cifar:resnet20", "--data", "synthetic:40", "--weights", str(weights), "--warmup-epochs", str(warmup),
            "--epochs", "1", "--batch-size", "16", "--out", str(out)]  # fmt: skip
    done = subprocess.run([*ND, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert f"starting from the weights in {weights}: training the plain model for {warmup} warm-up epoch(s)" in said
    assert "no pretrained weights" not in said.lower()
    assert "Warning" not in done.stderr, done.stderr  # FutureWarning, UserWarning, ... of any library
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["warmup"] == f"{warmup} plain epochs before decoupling, from the weights in {weights}"
