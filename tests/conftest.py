"""Shared pytest fixtures: a finished run, and the read-only ``../shared`` material when it is there.

Shared helpers that are not fixtures (small networks, real images, benchmark scripts as modules)
are in ``_helpers.py`` beside this file.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from _helpers import detect_clean_set, detect_model

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's ``../shared`` folder; skips the test when it is absent (a fresh clone)."""
    if not SHARED.is_dir():
        pytest.skip(f"needs the shared material at {SHARED} (absent in a fresh clone)")
    return SHARED


@pytest.fixture(scope="session")
def cifar10_jpeg(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared JPEG CIFAR-10, extracted once per session: ``train/`` and ``test/`` folders."""
    archive = shared_dir / "data" / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"needs {archive}")
    root = tmp_path_factory.mktemp("cifar10-jpeg")
    tar = shutil.which("tar")
    if tar is not None:  # GNU/BSD tar is several times faster than tarfile on 60,000 files
        subprocess.run([tar, "xzf", str(archive), "-C", str(root)], check=True)
    else:  # pragma: no cover
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                tf.extractall(root, filter="data")
            else:
                tf.extractall(root)
    if not (root / "test").is_dir():
        pytest.fail(f"{archive} has no test/ folder")
    return root


@pytest.fixture(scope="session")
def _resnet20_run_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch cifar:resnet20 run on 64 synthetic images, trained once per session."""
    from nd_plugin.commands.decoupling import decouple
    from nd_plugin.training.config import TrainConfig

    out = tmp_path_factory.mktemp("resnet20-run") / "run"
    cfg = TrainConfig(
        model="cifar:resnet20", data="synthetic:64", batch_size=32, epochs=1, warmup_epochs=0, ratio=0.5, device="cpu"
    )
    decouple(cfg, out, progress=False)
    return out


@pytest.fixture
def resnet20_run(_resnet20_run_once: Path, tmp_path: Path) -> Path:
    """A copy of the session's finished cifar:resnet20 run for this test alone (its own ``prune.json``,
    ``report/``, ...): ``config.json``, ``checkpoint.pt``, ``metrics.jsonl``, ``paths.npz``, ``summary.json``."""
    return Path(shutil.copytree(_resnet20_run_once, tmp_path / "resnet20-run"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors (faster, and much faster on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dm():
    """The detection tests' toy decoupled model (a module that defines its own ``dm`` overrides it)."""
    return detect_model()


@pytest.fixture(scope="module")
def clean(dm):
    """Clean inputs and labels the toy model classifies (the detection tests' negatives)."""
    return detect_clean_set(dm)
