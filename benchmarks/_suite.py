"""Shared helpers for benchmark scripts that run many short decoupling runs in one process.

The data set is decoded once (:class:`Suite` holds the bundle) and every run of the script goes
through :meth:`Suite.run`: ``decouple()`` with the script's common options plus per-run overrides,
into its own subdirectory, giving one flat row (λs and R as resolved, top-1, gate density, filter
state shares, FLOPs, wall seconds). :func:`write_json` writes the rows with the environment
(git commit, device, torch version, data spec, command line).

Used by ``table_c.py``, ``lambda_sweep.py`` and ``compare_pruners.py``; not a script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nd_plugin.commands.decoupling import decouple
from nd_plugin.errors import RunDirError
from nd_plugin.files import atomic_write_text
from nd_plugin.run import CHECKPOINT, PREVIOUS
from nd_plugin.training.config import EPOCHS, WARMUP_EPOCHS, TrainConfig, preset, resolve_device

REPO = Path(__file__).resolve().parents[1]
LAMBDAS = ("lambda_m", "lambda_k", "lambda_s")
# options that do not change what a run computes
_COSMETIC = ("device", "workers", "cuda_graphs", "compile", "amp")


def log(message: str) -> None:
    """Prints one progress line to stdout, flushed (long runs are often piped to a file)."""
    print(message, flush=True)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Adds the options every suite script shares (model, data, training length, λ overrides, output).

    Every training option defaults to :class:`TrainConfig`'s field (the one owner of the defaults);
    ``--epochs`` left out is filled by :func:`parse_args` from ``TrainConfig.resolved()`` for the data.
    The model and data default to the suite's subject (a CIFAR ResNet-20 on the shared CIFAR-10 copy).
    """
    d = TrainConfig
    parser.add_argument("--model", default="cifar:resnet20", help="model name (default: cifar:resnet20)")
    parser.add_argument("--data", default="imagefolder:/tmp/cifar10", help="data spec for nd_plugin.data.load_data")
    parser.add_argument(
        "--weights",
        default="auto",
        help="trained weights; 'auto' (default) looks for shared/weights/<model>-*.th next to or inside the repo, "
        "'none' starts untrained (a plain warm-up phase comes first)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=d.epochs,
        help=f"decoupling epochs per run (default: TrainConfig's, {EPOCHS['other']}; {EPOCHS['digits']} on digits)",
    )
    parser.add_argument(
        "--warmup-epochs",
        type=int,
        default=d.warmup_epochs,
        help=f"plain epochs first (default: {WARMUP_EPOCHS['trained']} with weights, else {WARMUP_EPOCHS['scratch']})",
    )
    parser.add_argument("--ratio", type=float, default=d.ratio, help="target ratio R (default: the model's preset)")
    parser.add_argument("--lambda-m", type=float, default=d.lambda_m, help="λ_m where a run uses L_mi (default: preset)")
    parser.add_argument("--lambda-k", type=float, default=d.lambda_k, help="λ_k where a run uses L_kl (default: preset)")
    parser.add_argument("--lambda-s", type=float, default=d.lambda_s, help="λ_s where a run uses L_s (default: preset)")
    parser.add_argument("--sites", choices=("internal", "all"), default=d.sites, help="gate sites (all: the paper's placement)")
    parser.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N]")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--workers", type=int, default=d.workers, help="data-loader worker processes per run")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="train eagerly on the GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out-dir", default=None, help="run directories go here (default: a new temporary directory)")
    parser.add_argument("--json", default=None, help="results file (default: <out-dir>/<script>.json)")
    parser.add_argument("--progress", action="store_true", help="show nd_plugin's per-epoch progress and log")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse a finished run directory under --out-dir whose configuration is the same (no retraining), "
        "and resume an interrupted one from its checkpoint",
    )
    parser.add_argument(
        "--set",
        default="",
        metavar="FIELD:VALUE[,...]",
        help="other TrainConfig settings for every run, e.g. acm_init:kaiming,schedule:cosine",
    )


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line; training options left out get :class:`TrainConfig`'s defaults resolved.

    ``--epochs`` left out becomes what ``TrainConfig.resolved()`` gives for ``--data``, so that the
    scripts can count with it (fine-tuning budgets, sparse-learning epochs).
    """
    return resolve_args(parser.parse_args(argv))


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fills ``args.epochs`` when None from :meth:`TrainConfig.resolved` for ``args.data``; returns ``args``."""
    if args.epochs is None:
        args.epochs = TrainConfig(data=args.data).resolved().epochs
    return args


def parse_settings(spec: str) -> dict[str, Any]:
    """``"hard_share:0.1,schedule:cosine"`` → ``{"hard_share": 0.1, "schedule": "cosine"}``.

    Values are read as JSON where they can be (``0.1``, ``true``), else as strings.

    Example:
        >>> parse_settings("hard_share:0.1,acm_init:kaiming")
        {'hard_share': 0.1, 'acm_init': 'kaiming'}
    """
    known = {f.name for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, _, raw = item.partition(":")
        if key not in known:
            raise SystemExit(f"{item!r}: {key!r} is not a TrainConfig field")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def resolve_weights(model: str, weights: str | None) -> str | None:
    """Turns the ``--weights`` option into a path or None.

    Args:
        model: the model name, e.g. ``cifar:resnet20``.
        weights: a path, ``none`` or ``auto`` (``shared/weights/<arch>-*.th`` above or inside the
            repository; None when there is none, an error for a ``cifar:`` model).

    Returns:
        The weights file, or None to start untrained.
    """
    if weights is None or weights.lower() == "none":
        return None
    if weights.lower() != "auto":
        if not Path(weights).is_file():
            raise SystemExit(f"--weights {weights}: no such file")
        return weights
    arch = model.split(":")[-1]
    for folder in (REPO.parent / "shared" / "weights", REPO / "shared" / "weights"):
        found = sorted(folder.glob(f"{arch}-*.th"))
        if found:
            return str(found[0])
    if model.startswith("cifar:"):  # never fall back to training a CIFAR model from scratch silently
        raise SystemExit(f"--weights auto: no shared/weights/{arch}-*.th found; pass --weights PATH (or none)")
    return None


def git_state() -> dict[str, Any]:
    """The checkout's commit, and whether its tracked files differ from it (None without git).

    A device machine's copy of the tree carries the ``.git`` of the session's start, so its commit
    can be stale (``dirty`` says so); there, pass the real commit as ``ND_GIT_COMMIT``.
    """
    if os.environ.get("ND_GIT_COMMIT"):
        return {"commit": os.environ["ND_GIT_COMMIT"], "dirty": False}

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    changes = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if changes is None else bool(changes)}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Where the numbers come from: commit, device, versions, data spec and the command line."""
    state = git_state()
    dev = resolve_device(args.device)
    if dev.type == "cuda":
        device = f"{dev} ({torch.cuda.get_device_name(dev)})"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "git_commit": state["commit"],
        "git_dirty": state["dirty"],
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "data": args.data,
        "model": args.model,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


@dataclass
class Row:
    """One run's results, flat, for tables and JSON (FLOPs per input; reductions are original / compact)."""

    name: str
    lambda_m: float
    lambda_k: float
    lambda_s: float
    ratio: float
    epochs: int
    warmup_epochs: int
    top1: float
    density: float
    silent: float
    dynamic: float
    energetic: float
    flops_original: float | None
    flops_static: float | None
    flops_expected: float | None
    static_reduction: float | None
    expected_reduction: float | None
    seconds: float
    run_dir: str
    config: dict[str, Any] = field(default_factory=dict)
    static_top1: float | None = None  # the static network of the same FLOPs (nd_plugin.pruning.dynamic_value)
    dynamic_value: float | None = None  # top1 - static_top1

    def key(self) -> str:
        """What makes two runs the same configuration: every option that changes what is computed."""
        return run_key(self.config)


def run_key(config: dict[str, Any]) -> str:
    """A configuration's identity, for reusing identical runs (cosmetic options left out)."""
    return json.dumps({k: v for k, v in sorted(config.items()) if k not in _COSMETIC})


class Suite:
    """Many decoupling runs of one model on one data set, decoded once.

    Args:
        args: the parsed common options (see :func:`add_common_args`).
        script: the script's name, used for the default JSON file and temporary directory.

    Example:
        >>> suite = Suite(args, "table_c")  # doctest: +SKIP
        >>> row = suite.run("ACM", lambda_m=0.0, lambda_k=0.0, lambda_s=0.0)  # doctest: +SKIP
    """

    def __init__(self, args: argparse.Namespace, script: str) -> None:
        from nd_plugin.data import load_data

        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = resolve_args(args)
        self.weights = resolve_weights(args.model, args.weights)
        self.out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix=f"nd_{script}_"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = Path(args.json) if args.json else self.out_dir / f"{script}.json"
        self.env = environment(args) | {"weights": self.weights}
        self.rows: list[Row] = []
        log(f"[{script}] {args.model} on {args.data}, weights {self.weights}, device {self.env['device']}")
        log(f"[{script}] runs in {self.out_dir}, results to {self.json_path}")
        t = time.perf_counter()
        self.data = load_data(args.data)
        log(f"[{script}] data loaded in {time.perf_counter() - t:.0f}s ({len(self.data.train)} train / {len(self.data.val)} val)")

    def dense_model(self) -> nn.Module:
        """A fresh copy of the suite's trained network (``--weights``), the teacher of every distilled row."""
        from nd_plugin.adapters import create_model

        if self.weights is None or self.config().warmup_epochs > 0:
            # the decoupling rows distil from their network as decoupling begins: the same network only without a warm-up
            raise SystemExit("distill_weight > 0: the teacher is the trained network, so pass --weights and no --warmup-epochs")
        return create_model(self.args.model, num_classes=self.data.num_classes, checkpoint=self.weights).eval()

    def preset(self) -> dict[str, float]:
        """The λs this suite uses where a loss is on: the model's preset, overridden by the flags."""
        values = {k: v for k, v in preset(self.args.model).items() if k in LAMBDAS}
        for key in LAMBDAS:
            if getattr(self.args, key) is not None:
                values[key] = getattr(self.args, key)
        return values

    def config(self, **overrides: Any) -> TrainConfig:
        """The resolved :class:`TrainConfig` of a run: common options, then ``overrides``."""
        a = self.args
        base = TrainConfig(
            model=a.model,
            data=a.data,
            ratio=a.ratio,
            epochs=a.epochs,
            warmup_epochs=a.warmup_epochs,
            batch_size=a.batch_size,
            sites=a.sites,
            weights=self.weights,
            device=a.device,
            seed=a.seed,
            workers=a.workers,
            cuda_graphs=not a.no_cuda_graphs,
            **self.preset(),
            **parse_settings(getattr(a, "set", "")),
        )
        return TrainConfig(**(asdict(base) | overrides)).resolved()

    def finetune_overrides(self) -> dict[str, Any]:
        """Overrides that make a run the fine-tuned baseline: as many epochs, all plain (gates open, λ = 0)."""
        base = self.config()
        return {"warmup_epochs": base.warmup_epochs + base.epochs, "epochs": 0, "lambda_m": 0.0, "lambda_k": 0.0, "lambda_s": 0.0}

    def find(self, cfg: TrainConfig) -> Row | None:
        """An earlier row of this suite with the same configuration, if any."""
        key = run_key(asdict(cfg))
        return next((r for r in self.rows if r.key() == key), None)

    def run(self, name: str, **overrides: Any) -> Row:
        """Runs one decoupling (or reuses an identical earlier run) and returns its row.

        Args:
            name: the run's label; also (made file-name safe) its subdirectory of ``out_dir``.
            **overrides: :class:`TrainConfig` fields for this run (e.g. ``lambda_m=0.0``).

        Returns:
            The :class:`Row`, also appended to :attr:`rows` (not for a reused run).
        """
        cfg = self.config(**overrides)
        if (same := self.find(cfg)) is not None:
            log(f"  {name}: same configuration as {same.name}, reused")
            return same
        out = self.out_dir / re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name).strip("_")
        reuse = getattr(self.args, "reuse", False)
        previous = self._finished(out, cfg) if reuse else None
        if previous is not None:
            log(f"  {name}: finished run {out} has the same configuration, reused")
            return self._row(name, cfg, previous, out, seconds=0.0)
        resume = reuse and self._interrupted(out, cfg)
        log(
            f"  {name}: λm={cfg.lambda_m:g} λk={cfg.lambda_k:g} λs={cfg.lambda_s:g} R={cfg.ratio:g} "
            f"epochs={cfg.warmup_epochs}+{cfg.epochs}" + (f", resumed from its checkpoint in {out}" if resume else "") + " ..."
        )
        t = time.perf_counter()
        if resume:
            try:
                summary = decouple(cfg, out, resume=True, progress=self.args.progress, data=self.data)
                return self._row(name, cfg, summary, out, seconds=time.perf_counter() - t)
            except RunDirError as e:  # no good checkpoint after all: nothing was cleared, train again
                log(f"  {name}: cannot resume ({e}); training again")
        summary = decouple(cfg, out, overwrite=True, progress=self.args.progress, data=self.data)
        return self._row(name, cfg, summary, out, seconds=time.perf_counter() - t)

    @staticmethod
    def _same_config(out: Path, cfg: TrainConfig) -> bool:
        """Whether ``out/config.json`` records ``cfg``; a field the run predates counts as its default."""
        try:
            saved = json.loads((out / "config.json").read_text()).get("train", {})
        except (OSError, ValueError, AttributeError):
            return False
        return run_key(asdict(TrainConfig()) | saved) == run_key(asdict(cfg))

    @classmethod
    def _finished(cls, out: Path, cfg: TrainConfig) -> dict[str, Any] | None:
        """The summary of a finished run in ``out`` made with ``cfg``, else None."""
        try:
            summary = json.loads((out / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        return summary if cls._same_config(out, cfg) else None

    @classmethod
    def _interrupted(cls, out: Path, cfg: TrainConfig) -> bool:
        """Whether ``out`` holds an unfinished run made with ``cfg`` that ``resume=True`` can continue."""
        has_checkpoint = (out / CHECKPOINT).is_file() or (out / PREVIOUS).is_file()
        return has_checkpoint and cls._same_config(out, cfg)

    def _row(self, name: str, cfg: TrainConfig, summary: dict[str, Any], out: Path, seconds: float) -> Row:
        states = summary["filter_states"]
        flops = summary.get("flops") or {}
        row = Row(
            name=name,
            lambda_m=cfg.lambda_m,
            lambda_k=cfg.lambda_k,
            lambda_s=cfg.lambda_s,
            ratio=cfg.ratio,
            epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            top1=summary["top1"],
            density=summary["density"],
            silent=states["silent"],
            dynamic=states["dynamic"],
            energetic=states["energetic"],
            flops_original=flops.get("original"),
            flops_static=flops.get("compact_static"),
            flops_expected=flops.get("compact_expected"),
            static_reduction=flops.get("static_reduction"),
            expected_reduction=flops.get("expected_reduction"),
            seconds=seconds,
            run_dir=str(out),
            config=asdict(cfg),
            static_top1=(summary.get("dynamic_value") or {}).get("static_top1"),
            dynamic_value=(summary.get("dynamic_value") or {}).get("value"),
        )
        self.rows.append(row)
        log(
            f"  {name}: top-1 {row.top1:.4f} density {row.density:.3f} silent/dynamic/energetic "
            f"{row.silent:.3f}/{row.dynamic:.3f}/{row.energetic:.3f} expected FLOPs x{row.expected_reduction or 0:.2f} "
            f"dynamic value {100 * (row.dynamic_value or 0):+.2f} ({seconds:.0f}s)"
        )
        return row

    def write(self, **extra: Any) -> dict[str, Any]:
        """Writes the results so far (environment, rows, ``extra``) to :attr:`json_path`; returns them."""
        payload = {"environment": self.env, "rows": [asdict(r) for r in self.rows], **extra}
        write_json(self.json_path, payload)
        return payload


def _path_text(value: Any) -> str:
    """``json.dumps``'s ``default``: a path (e.g. an option of type ``Path``) as its text; anything else fails."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` as indented JSON (atomically: a killed script leaves the previous file).

    Paths anywhere in ``payload`` (options such as ``--rows-from``) are written as their text.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "r.json"
        >>> write_json(out, {"options": {"rows_from": [Path("a/b.json")]}})
        >>> json.loads(out.read_text())
        {'options': {'rows_from': ['a/b.json']}}
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2, default=_path_text))


def fmt_flops(value: float | None) -> str:
    """FLOPs as ``12.3M`` (``-`` when unknown)."""
    return "-" if value is None else f"{value / 1e6:.1f}M"


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    """A GitHub markdown table from a header and rows of already formatted cells."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)
