"""Shared pytest fixtures: the read-only ``../shared`` material, when it is there."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

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
