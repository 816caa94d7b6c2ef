"""The run-directory format: what ``nd decouple`` writes and every other command reads.

::

    RUN/config.json              every option, versions, seed, the gated layers
    RUN/checkpoint.pt            model, optimiser, scheduler, RNG states, epoch (atomic, resumable)
    RUN/checkpoint.prev.pt       the checkpoint before it (``--resume`` falls back to it)
    RUN/metrics.jsonl            one line per epoch
    RUN/paths.npz                path statistics on the validation split
    RUN/summary.json             accuracy, FLOPs, filter states, dynamic value
    RUN/prune.json               ``nd prune``: filters, FLOPs, latency per engine, dynamic value
    RUN/.lock                    while ``nd decouple`` runs: the pid that holds the directory
    RUN/report/                  ``nd analyze``: figures, ``analysis.json``, ``index.html``
    RUN/detector.npz             ``nd detect``: the fitted path detector
    RUN/detector_mahalanobis.npz ``nd detect``: Mahalanobis on penultimate features
    RUN/detector_lee.npz         ``nd detect``: Lee et al.'s Gaussians per stage
    RUN/detect/TAG/detect.json   ``nd detect``: one attack's results (and its figures)

This module is the one place that knows the layout; it sits below the Trainer (which writes its
checkpoints through :func:`epoch_writer`) and the commands layer. Its names are the constants below, it
writes through :mod:`nd_plugin.files` (temporary file or folder, then a rename), keeps the last
two good checkpoints, locks a directory against a second ``nd decouple``, and validates every
artefact it reads. A damaged or foreign artefact raises a one-line
:class:`~nd_plugin.errors.RunDirError` naming the file and the command that writes it again.

Example:
    >>> with hold_run(tmp):
    ...     (tmp / LOCK).is_file()
    True
    >>> (tmp / LOCK).exists()
    False
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from nd_plugin.errors import NDError, RunDirError
from nd_plugin.files import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    first_line,
    load_tensors,
    read_json,
    read_text,
    unreadable,
    weights_mismatch,
)
from nd_plugin.paths import PathStats

__all__ = [
    "ANALYSIS_JSON",
    "ARTEFACTS",
    "CHECKPOINT",
    "CONFIG",
    "DETECT",
    "DETECT_JSON",
    "DETECTOR_LEE",
    "DETECTOR_PATH",
    "DETECTOR_PENULTIMATE",
    "INDEX_HTML",
    "LOCK",
    "METRICS",
    "PATHS",
    "PREVIOUS",
    "PRUNE",
    "REPORT",
    "SUMMARY",
    "Run",
    "check_new_out",
    "check_unlocked",
    "epoch_writer",
    "hold_run",
    "open_run",
    "prepare_out",
    "save_checkpoint",
    "write_config",
    "write_metrics",
    "write_paths",
    "write_summary",
]

FORMAT = "nd-plugin-run/1"  # config.json's "format"
CHECKPOINT_FORMAT = 1  # checkpoint.pt's "format"
CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
METRICS = "metrics.jsonl"
PATHS = "paths.npz"
SUMMARY = "summary.json"
PRUNE = "prune.json"  # nd prune's record
LOCK = ".lock"
REPORT = "report"  # nd analyze's folder (default)
ANALYSIS_JSON = "analysis.json"  # in it: every number of nd analyze
INDEX_HTML = "index.html"  # in it: the offline report page
DETECT = "detect"  # nd detect's folders: DETECT/TAG/
DETECT_JSON = "detect.json"  # in each of them
DETECTOR_PATH = "detector.npz"  # nd detect's fitted detectors (nd_plugin.detect.protocol.FittedDetectors)
DETECTOR_PENULTIMATE = "detector_mahalanobis.npz"
DETECTOR_LEE = "detector_lee.npz"
ARTEFACTS = (CHECKPOINT, PREVIOUS, METRICS, PATHS, SUMMARY)  # what a new run clears
_CONFIG_KEYS = ("model", "num_classes", "input_size")  # and "sites", checked where used


# ----------------------------------------------------------------------------------- the lock
@contextlib.contextmanager
def hold_run(out: str | os.PathLike) -> Iterator[None]:
    """Holds ``out`` for one ``nd decouple``: ``out/.lock`` names this pid, a second holder is refused.

    The lock is an ``flock`` on ``out/.lock``, which the kernel drops when the holder dies, so
    the lock file of a killed run (its pid dead) is simply taken over.

    Raises:
        RunDirError: another live process holds ``out``.
    """
    file = Path(out) / LOCK
    file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = file.read_text(encoding="utf-8").strip() if file.is_file() else "?"
            raise RunDirError(
                f"out {file.parent} is in use by another nd decouple (pid {holder or '?'}, {file}); "
                "wait for it to finish, or choose another out.",
                params=("out",),
            ) from None
        try:
            same = os.stat(file).st_ino == os.fstat(fd).st_ino  # not unlinked by a holder that just finished
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        file.unlink(missing_ok=True)
        os.close(fd)


def check_unlocked(out: Path) -> None:
    """Refuses early (before any work) when a live ``nd decouple`` holds ``out``.

    Under ``torchrun`` only rank 0 holds the directory, so only rank 0 checks (the other ranks would
    otherwise collide with its own brief check).
    """
    if int(os.environ.get("RANK", "0")) == 0 and (out / LOCK).is_file():
        with hold_run(out):
            pass


# --------------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: str | os.PathLike, state: dict[str, Any], model: str) -> None:
    """Writes ``out/checkpoint.pt`` atomically and keeps the one before as ``checkpoint.prev.pt``.

    A kill at any point leaves a good ``checkpoint.pt`` or, for the instant between the two
    renames, a good ``checkpoint.prev.pt``; ``--resume`` reads whichever is newest and good.
    """
    out = Path(out)
    with atomic_path(out / CHECKPOINT, fsync=True) as tmp:
        torch.save({**state, "format": CHECKPOINT_FORMAT, "model_name": model}, tmp)
        if (out / CHECKPOINT).is_file():
            os.replace(out / CHECKPOINT, out / PREVIOUS)


def write_metrics(out: str | os.PathLike, records: list[dict[str, Any]], model: str) -> None:
    """Rewrites ``out/metrics.jsonl`` (atomically) from the epoch records a checkpoint carries."""
    atomic_write_text(Path(out) / METRICS, "".join(json.dumps({**r, "model": model}) + "\n" for r in records))


def epoch_writer(out: str | os.PathLike, model: str) -> Callable[[Any, int], None]:
    """What a :class:`~nd_plugin.training.trainer.Trainer` calls after each epoch to keep ``out`` resumable.

    The checkpoint carries the history; ``metrics.jsonl`` is rewritten from it, so a kill between
    the two writes leaves nothing that ``--resume`` cannot repair.

    Args:
        out: the run directory.
        model: the run's model name (stored in the checkpoint and every metrics line).

    Returns:
        ``write(trainer, epoch)``: saves ``trainer.state_dict(epoch)`` (the last two kept) and the
        metrics of ``trainer.history``.
    """

    def write(trainer: Any, epoch: int) -> None:
        save_checkpoint(out, trainer.state_dict(epoch), model)
        write_metrics(out, [r.to_dict() for r in trainer.history], model)

    return write


def write_config(out: str | os.PathLike, config: dict[str, Any]) -> None:
    """Writes ``out/config.json`` (atomically), stamped with this nd-plugin's run format."""
    atomic_write_json(Path(out) / CONFIG, {"format": FORMAT, **config})


def write_paths(out: str | os.PathLike, stats: PathStats) -> None:
    """Writes the validation path statistics of a finished training to ``out/paths.npz``."""
    stats.save(Path(out) / PATHS)


def write_summary(out: str | os.PathLike, summary: dict[str, Any]) -> None:
    """Writes a finished training's summary (accuracy, FLOPs, filter states) to ``out/summary.json``."""
    atomic_write_json(Path(out) / SUMMARY, summary)


# ------------------------------------------------------------------------- a run's directory
def _check_new(out: Path, model: str, overwrite: bool) -> None:
    config_file = out / CONFIG
    if config_file.exists():
        try:
            previous = read_json(config_file, fix="").get("model")
        except (RunDirError, AttributeError):
            if not overwrite:
                raise RunDirError(
                    f"out {out} holds a damaged {CONFIG}; pass overwrite=True to start a new run there.",
                    params=("out", "overwrite"),
                ) from None
            previous = model  # a damaged run: --overwrite starts again
        if previous != model:
            raise RunDirError(f"out {out} holds a run of another model ({previous!r}); choose another out.", params=("out",))
        if not overwrite:
            raise RunDirError(
                f"out {out} already holds a run of {model!r}; pass resume=True to continue it or overwrite=True to start again.",
                params=("out", "resume", "overwrite"),
            )
    elif out.exists() and any(p.name != LOCK for p in out.iterdir()) and not overwrite:
        raise RunDirError(f"out {out} exists and is not a run directory; choose an empty or new directory.", params=("out",))


def check_new_out(out: Path, model: str, overwrite: bool) -> None:
    """Raises :class:`RunDirError` when ``out`` cannot take a new run of ``model`` (checked before any work)."""
    check_unlocked(out)
    _check_new(out, model, overwrite)


def prepare_out(out: Path, model: str, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any] | None:
    """Checks ``out`` for ``--resume`` (returns its config) or, for a new run, clears old artefacts.

    The new-run branch runs with the lock held (:func:`hold_run`); the resume branch runs before any
    work and refuses a directory that another ``nd decouple`` holds.
    """
    if resume:
        check_unlocked(out)
        if not any((out / name).exists() for name in (CHECKPOINT, PREVIOUS)):
            raise RunDirError(
                f"resume=True: no {CHECKPOINT} to continue from in {out}; drop resume=True to start a new run there.",
                params=("resume",),
            )
        run = Run(out)
        previous = run.config
        if previous["model"] != model:
            raise RunDirError(f"resume=True: {out} holds a run of {previous['model']!r}, not {model!r}.", params=("resume",))
        if not isinstance(previous.get("train"), dict):
            raise RunDirError(f"{out / CONFIG} has no training options ('train'); {run.fix(CONFIG)}.")
        return previous
    _check_new(out, model, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for name in (*ARTEFACTS, CHECKPOINT + ".damaged"):
        (out / name).unlink(missing_ok=True)
    return None


# ---------------------------------------------------------------------------------- the run
class Run:
    """A run directory, every read validated.

    Args:
        path: the directory.

    Example:
        >>> run = open_run("runs/resnet18")  # doctest: +SKIP
        >>> dm = run.build_model()  # doctest: +SKIP
        >>> stats = run.stats()  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    # -- what writes each artefact again
    def _model(self) -> str:
        try:
            return str(read_json(self.path / CONFIG, fix="")["model"])
        except (NDError, KeyError, TypeError):
            return "MODEL"

    def fix(self, name: str) -> str:
        """The command that writes artefact ``name`` of this run again."""
        cmd = f"`nd decouple {self._model()} --out {self.path}"
        if name == CONFIG:
            return f"start the run again with {cmd} --overwrite`"
        if name in (CHECKPOINT, PREVIOUS):
            return f"{cmd} --resume` continues from the last good checkpoint, {cmd} --overwrite` trains again"
        return f"{cmd} --resume` writes it again from the checkpoint"

    @property
    def config(self) -> dict[str, Any]:
        """The run's ``config.json``, checked for the keys every command needs."""
        file = self.path / CONFIG
        if not file.exists():
            raise RunDirError(
                f"{self.path} is not a run directory (no {CONFIG}); create one with `nd decouple MODEL --out {self.path}`."
            )
        cfg = read_json(file, fix=self.fix(CONFIG))
        if not isinstance(cfg, dict) or any(k not in cfg for k in _CONFIG_KEYS):
            keys = ", ".join(k for k in _CONFIG_KEYS if not isinstance(cfg, dict) or k not in cfg)
            raise RunDirError(f"{file} is not an nd-plugin run config (no {keys}); {self.fix(CONFIG)}.")
        if cfg.get("format", FORMAT) != FORMAT:
            raise RunDirError(f"{file} has format {cfg['format']!r}; this nd-plugin reads {FORMAT!r}; {self.fix(CONFIG)}.")
        return cfg

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    def _read_checkpoint(self, file: Path, device: Any) -> dict[str, Any]:
        fix = self.fix(file.name)
        state = load_tensors(file, fix=fix, device=device)
        if not isinstance(state, dict) or not isinstance(state.get("model"), Mapping) or "epoch" not in state:
            found = f"keys {sorted(map(str, state))[:4]}" if isinstance(state, dict) else type(state).__name__
            raise RunDirError(f"{file} is not an nd-plugin checkpoint (found {found}, expected 'model' and 'epoch'); {fix}.")
        if state.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
            raise RunDirError(
                f"{file} has checkpoint format {state['format']!r}; this nd-plugin reads {CHECKPOINT_FORMAT}; {fix}."
            )
        model = self.config["model"]
        if state.get("model_name", model) != model:
            raise RunDirError(
                f"{file} is a checkpoint of {state['model_name']!r} but {self.path / CONFIG} names {model!r}; {fix}."
            )
        return state

    def load_checkpoint(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Loads and checks ``checkpoint.pt`` (tensors and plain containers only: ``weights_only=True``)."""
        if not self.checkpoint_path.exists():
            raise RunDirError(
                f"{self.path} has no {CHECKPOINT}; train first with `nd decouple MODEL --out {self.path}` "
                f"(or finish an interrupted run with `nd decouple MODEL --out {self.path} --resume`)."
            )
        return self._read_checkpoint(self.checkpoint_path, device)

    def _check_weights(self, state: dict[str, Any], file: Path, own: Mapping[str, torch.Tensor]) -> None:
        problem = weights_mismatch(state["model"], own)
        if problem:
            raise RunDirError(
                f"{file} holds weights of another model than {self.path / CONFIG} describes ({problem}); {self.fix(file.name)}."
            )

    def resume_state(self, own: Mapping[str, torch.Tensor], device: Any = "cpu") -> tuple[dict[str, Any], str]:
        """The newest good checkpoint for ``--resume`` and a line saying which epoch it resumes from.

        A damaged ``checkpoint.pt`` is moved aside (``checkpoint.pt.damaged``) and
        ``checkpoint.prev.pt`` is used; with neither good, the error names both.

        Args:
            own: the state dict of the model the run trains (for the shape check).
            device: ``map_location``.
        """
        errors = []
        for file in (self.path / CHECKPOINT, self.path / PREVIOUS):
            if not file.exists():
                continue
            try:
                state = self._read_checkpoint(file, device)
                self._check_weights(state, file, own)
            except RunDirError as exc:
                errors.append(str(exc).split("; ")[0])
                continue
            note = f"resuming after epoch {int(state['epoch']) + 1} from {file}"
            if errors:
                note = f"{errors[0]}: moved aside to {CHECKPOINT}.damaged; {note}"
                if file.name == PREVIOUS and (self.path / CHECKPOINT).exists():
                    with contextlib.suppress(OSError):
                        os.replace(self.path / CHECKPOINT, self.path / (CHECKPOINT + ".damaged"))
            return state, note
        if not errors:
            raise RunDirError(
                f"resume=True: no {CHECKPOINT} to continue from in {self.path}; drop resume=True to start a new run there.",
                params=("resume",),
            )
        raise RunDirError(
            f"resume=True: no good checkpoint in {self.path} ({'; '.join(errors)}); start again with overwrite=True.",
            params=("resume", "overwrite"),
        )

    def build_model(self, device: torch.device | str = "cpu", *, load_weights: bool = True):
        """Rebuilds the decoupled model of this run, in eval mode, with its trained weights."""
        from nd_plugin.adapters import create_model
        from nd_plugin.decoupled import wrap

        cfg = self.config
        if "sites" not in cfg:
            raise RunDirError(f"{self.path / CONFIG} names no gated layers ('sites'); {self.fix(CONFIG)}.")
        ckpt = self.load_checkpoint(device) if load_weights else None
        model = create_model(cfg["model"], num_classes=cfg["num_classes"])
        dm = wrap(
            model,
            torch.zeros(1, *cfg["input_size"]),
            sites=cfg["sites"],
            reduction=cfg.get("reduction", 4),
            noise_std=cfg.get("noise_std", 1.0),
        )
        if ckpt is not None:
            self._check_weights(ckpt, self.checkpoint_path, dm.state_dict())
            dm.load_state_dict(ckpt["model"])
        return dm.to(device).eval()

    def data(self, spec: str | None = None, **kwargs: Any):
        """The run's data set (or ``spec``) at the run's input size, checked against its classes.

        A run trained on resized images (``decouple(..., data=load_data("digits", image_size=224))``)
        gets its images at that size again, not at the data set's own size.
        """
        from nd_plugin.data import load_data
        from nd_plugin.errors import DataError

        cfg = self.config
        if cfg.get("input_size") and "image_size" not in kwargs:
            kwargs["image_size"] = cfg["input_size"][-1]  # a data set at its own size is left as it is
        bundle = load_data(spec or cfg["data"], **kwargs)
        if bundle.num_classes != cfg["num_classes"]:
            raise DataError(
                f"data {spec or cfg['data']!r} has {bundle.num_classes} classes but the run was trained on "
                f"{cfg['num_classes']} ({cfg['data']!r}); pass data with the run's classes."
            )
        return bundle

    def stats(self) -> PathStats:
        """The validation path statistics ``paths.npz``, checked against the run's gated layers."""
        file = self.path / PATHS
        if not file.exists():
            raise RunDirError(
                f"{self.path} has no {PATHS} (path statistics); they are written at the end of `nd decouple`, "
                f"or collect them with `nd analyze {self.path}`."
            )
        fix = self.fix(PATHS)
        try:
            stats = PathStats.load(file)
        except OSError as exc:
            raise RunDirError(f"{unreadable(file, exc)}; check its permissions, or {fix}.") from None
        except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise RunDirError(f"{file} is damaged or not path statistics ({first_line(exc)}); {fix}.") from None
        cfg = self.config
        channels = sum(stats.site_channels)
        if stats.site_names != list(cfg.get("sites", stats.site_names)):
            raise RunDirError(
                f"{file} holds path statistics of other gated layers than {self.path / CONFIG} names (another model's?); {fix}."
            )
        if stats.counts.shape != (channels,) or stats.class_counts.shape != (cfg["num_classes"], channels):
            raise RunDirError(
                f"{file} has counts of shape {stats.counts.shape} / {stats.class_counts.shape} for {channels} filters and {cfg['num_classes']} classes; {fix}."
            )
        if stats.paths is not None and stats.paths.shape != (stats.n, channels):
            raise RunDirError(f"{file} has raw paths of shape {stats.paths.shape}, not ({stats.n}, {channels}); {fix}.")
        return stats

    def summary(self) -> dict[str, Any]:
        """The run's ``summary.json`` (empty when training has not finished)."""
        file = self.path / SUMMARY
        if not file.exists():
            return {}
        summary = read_json(file, fix=self.fix(SUMMARY))
        model = self.config["model"]
        if not isinstance(summary, dict) or "top1" not in summary:
            raise RunDirError(f"{file} is not a run summary (no 'top1'); {self.fix(SUMMARY)}.")
        if summary.get("model", model) != model:
            raise RunDirError(
                f"{file} is the summary of {summary['model']!r} but {self.path / CONFIG} names {model!r}; {self.fix(SUMMARY)}."
            )
        return summary

    def metrics(self) -> list[dict[str, Any]]:
        """Every line of ``metrics.jsonl``, checked (epochs 1, 2, ... of this run's model)."""
        file = self.path / METRICS
        if not file.exists():
            return []
        fix = self.fix(METRICS)
        text = read_text(file, fix, RunDirError)
        model = self.config["model"]
        lines = []
        for i, line in enumerate(text.splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise RunDirError(f"{file} is damaged (line {i} is not JSON); {fix}.") from None
            if not isinstance(record, dict) or record.get("epoch") != i or record.get("model", model) != model:
                raise RunDirError(f"{file} line {i} is not epoch {i} of a {model!r} run; {fix}.")
            lines.append(record)
        return lines

    def dynamic_value(self) -> tuple[dict[str, Any], Path] | None:
        """The recorded dynamic value and the file it comes from, or None when none records it.

        ``summary.json`` (written with the checkpoint) first, then ``prune.json``; a file that
        cannot be read, or records none, is passed over.
        """
        for name in (SUMMARY, PRUNE):
            file = self.path / name
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(file.read_text(encoding="utf-8"))
                value = record.get("dynamic_value") if isinstance(record, dict) else None
                if isinstance(value, dict) and "value" in value:
                    return value, file
        return None

    def detections(self) -> list[dict[str, Any]]:
        """The results of every ``nd detect`` on this run (``RUN/detect/*/detect.json``), in tag order.

        Files that cannot be read or parsed are left out (an old or partial ``detect.json``).
        """
        found = []
        for file in sorted(self.path.glob(f"{DETECT}/*/{DETECT_JSON}")):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(file.read_text(encoding="utf-8"))
                if isinstance(record, dict):
                    found.append(record)
        return found


def open_run(path: str | os.PathLike) -> Run:
    """Opens a run directory, checking that it exists and has a valid config."""
    run = Run(path)
    if not run.path.is_dir():
        raise RunDirError(f"run directory {run.path} does not exist; create one with `nd decouple MODEL --out {run.path}`.")
    run.config  # noqa: B018 - validates
    return run
