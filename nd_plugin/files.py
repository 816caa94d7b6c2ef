"""Atomic writes and validated reads: the one place nd-plugin writes a file safely.

Every file nd-plugin writes goes through :func:`atomic_path` (a temporary sibling, then a rename),
so a crash or a kill never leaves half a file: text and JSON (:func:`atomic_write_text`,
:func:`atomic_write_json`), ``torch.save`` (:func:`atomic_save`), NumPy archives
(:func:`atomic_savez`) and whole folders (:func:`atomic_dir`). The objects of the method modules
(path statistics, detectors, reports) write themselves with these in their ``save()`` methods;
what the files of a run directory are called is :mod:`nd_plugin.run`'s business.

Reads are validated: a missing, empty, damaged or foreign file is one line naming it and what to
do (:func:`load_tensors`, :func:`read_json`).

Example:
    >>> atomic_write_json(tmp / "a.json", {"x": 1})
    >>> read_json(tmp / "a.json", fix="write it again")
    {'x': 1}
    >>> sorted(p.name for p in tmp.iterdir())
    ['a.json']
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nd_plugin.errors import NDError, RunDirError

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_save",
    "atomic_savez",
    "atomic_write_json",
    "atomic_write_text",
    "load_tensors",
    "read_json",
    "read_text",
    "weights_mismatch",
]


# ------------------------------------------------------------------------------ atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed onto ``path`` when the block succeeds.

    On any error or interrupt the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the file to produce.
        fsync: flush the temporary file to disk before the rename (checkpoints).

    Example:
        >>> with atomic_path(tmp / "out.bin") as part:
        ...     _ = part.write_bytes(b"ok")
        ...     (tmp / "out.bin").exists()
        False
        >>> (tmp / "out.bin").read_bytes()
        b'ok'
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """Writes ``obj`` as indented JSON (and a final newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_save(obj: Any, path: str | os.PathLike, *, fsync: bool = False) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        torch.save(obj, tmp)


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez_compressed(**arrays)`` to ``path`` atomically (the name is kept as given)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, marker: str | None = None) -> Iterator[Path]:
    """A folder that appears at ``target`` complete or not at all.

    Yields a temporary sibling folder to write into; on success it replaces ``target`` by a rename
    (an old ``target`` is moved aside first and deleted after), on any error or interrupt it is
    removed. Temporary folders of killed processes are swept away first.

    Args:
        target: the folder to produce.
        marker: a file that an existing ``target`` must hold to be replaced (e.g. ``index.html``
            for a report), so that a user's unrelated folder is never deleted; ``None``: the
            caller has checked ``target``.

    Example:
        >>> target = tmp / "report"
        >>> with atomic_dir(target) as part:
        ...     _ = (part / "index.html").write_text("<html></html>")
        ...     target.exists()
        False
        >>> sorted(p.name for p in target.iterdir())
        ['index.html']
    """
    target = Path(target)
    if marker is not None and target.is_dir() and any(target.iterdir()) and not (target / marker).is_file():
        raise RunDirError(f"{target} exists and holds no {marker}, so it is not an nd-plugin output folder; choose an empty or new folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            backup = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------- validated reads
def first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message (library messages run on for lines)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(exc).__name__


def unreadable(path: Path, exc: OSError) -> str:
    """``"PATH cannot be read (REASON)"`` for an :class:`OSError` raised reading ``path``."""
    return f"{path} cannot be read ({exc.strerror or first_line(exc)})"


def load_tensors(path: str | os.PathLike, *, fix: str, error: type[NDError] = RunDirError, device: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; every failure becomes one line naming the file and ``fix``.

    Args:
        path: a file written by ``torch.save``.
        fix: what to do about a bad file (a command that writes it again, or how to convert it).
        error: the :class:`~nd_plugin.errors.NDError` subclass to raise.
        device: ``map_location``.

    Example:
        >>> bad = tmp / "checkpoint.pt"
        >>> _ = bad.write_bytes(b"")
        >>> load_tensors(bad, fix="train again")
        Traceback (most recent call last):
        ...
        nd_plugin.errors.RunDirError: ...checkpoint.pt is empty; train again.
    """
    path = Path(path)
    if not path.exists():
        raise error(f"{path} does not exist; {fix}.")
    try:
        if path.stat().st_size == 0:
            raise error(f"{path} is empty; {fix}.")
        with open(path, "rb") as fh:
            head = fh.read(2)
        return torch.load(path, map_location=device, weights_only=True)
    except NDError:
        raise
    except (PermissionError, IsADirectoryError) as exc:
        raise error(f"{unreadable(path, exc)}; check its permissions, or {fix}.") from None
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found or head[:1] == b"\x80":  # a pickle: torch.save of objects, or pickle.dump
            what = f" ({found.group(1)})" if found else ""
            raise error(
                f"{path} holds pickled Python objects{what}; nd-plugin loads tensors only "
                f"(torch.load(weights_only=True) never runs code from a file); {fix}."
            ) from None
        raise error(f"{path} is not a torch.save file; {fix}.") from None
    except (EOFError, OSError, RuntimeError, ValueError, zipfile.BadZipFile) as exc:  # a truncated zip can be EINVAL
        raise error(f"{path} is damaged (truncated or corrupt: {first_line(exc)}); {fix}.") from None


def read_text(path: str | os.PathLike, fix: str, error: type[NDError] = RunDirError) -> str:
    """The text of ``path``; missing, unreadable, binary or empty is one line naming it and ``fix``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path} does not exist; {fix}.") from None
    except OSError as exc:
        raise error(f"{unreadable(path, exc)}; check its permissions, or {fix}.") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not text (damaged); {fix}.") from None
    if not text.strip():
        raise error(f"{path} is empty; {fix}.")
    return text


def read_json(path: str | os.PathLike, *, fix: str, error: type[NDError] = RunDirError) -> Any:
    """Parses a JSON file; a missing, empty, unreadable or broken one is one line naming the file and ``fix``."""
    path = Path(path)
    text = read_text(path, fix, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path} is damaged (not valid JSON: {exc.msg} at line {exc.lineno}); {fix}.") from None


def weights_mismatch(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps ``state`` from loading into a model whose state dict is ``own`` (None: it fits).

    Example:
        >>> weights_mismatch({"w": torch.zeros(2)}, {"w": torch.zeros(3)})
        'w: file (2,) vs model (3,)'
    """
    def listed(label: str, keys: list[str]) -> list[str]:
        return [f"{label}{', '.join(keys[:2])}" + (f" (+{len(keys) - 2})" if len(keys) > 2 else "")] if keys else []

    shapes = [
        f"{k}: file {tuple(getattr(v, 'shape', ()))} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and (not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own[k].shape))
    ]
    problems = listed("", shapes) + listed("missing ", [k for k in own if k not in state])
    problems += listed("unexpected ", [k for k in state if k not in own])
    return "; ".join(problems) or None
