"""The Trainer: one loop for CPU, GPU (bf16 autocast) and ``torchrun`` (DistributedDataParallel).

Training has up to two phases. Without pretrained weights (the usual case offline) the plain model
is first trained for ``warmup_epochs`` with every gate forced open and cross-entropy alone, as the
paper fine-tunes an already trained network; then the gates are trained with the decoupling
losses for ``epochs``. Every epoch ends with a validation pass that collects path statistics and
a call of ``on_epoch_end``; with a run directory that writes a line in ``metrics.jsonl`` and an
atomic checkpoint (:mod:`nd_plugin.run`), so ``--resume`` continues with the next epoch.
:func:`~nd_plugin.commands.decoupling.decouple` (``nd decouple``) runs the whole thing on a run
directory.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from nd_plugin.decoupled import DecoupledModel
from nd_plugin.errors import ConfigError, TrainingError
from nd_plugin.losses import DecouplingLoss, LossTerms, distillation_loss
from nd_plugin.paths import PathStats
from nd_plugin.training.bn import recalibrate_bn
from nd_plugin.training.config import TrainConfig, density_target, lr_factor, resolve_device
from nd_plugin.training.distributed import PhaseDDP, init_distributed, reduce_path_stats
from nd_plugin.training.optim import param_groups
from nd_plugin.training.steps import _compiled, _GraphedStep, eager_step

__all__ = ["EpochResult", "Trainer", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seeds torch, NumPy and ``random``, as :func:`decouple` does before it builds a model."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _rng_state() -> dict[str, Any]:
    """The RNG states of torch, NumPy and ``random``, as tensors and plain numbers (``weights_only`` loads them).

    NumPy's legacy state is kept whole: the key, the position in it and the cached Gaussian, so
    that :func:`_set_rng_state` continues the stream exactly where it was.

    Example:
        >>> np.random.seed(0); _ = np.random.rand(3), np.random.randn()
        >>> state, expected = _rng_state(), np.random.rand(4)
        >>> _ = np.random.rand(100); _set_rng_state(state)
        >>> bool((np.random.rand(4) == expected).all())
        True
    """
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_gauss": [int(has_gauss), float(gauss)],
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": gauss_next,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`_rng_state` returned (checkpoints without NumPy's position: at a fresh key)."""
    torch.set_rng_state(state["torch"].cpu())
    has_gauss, gauss = state.get("numpy_gauss", (0, 0.0))
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(state.get("numpy_pos", 624)), int(has_gauss), float(gauss)))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), state.get("python_gauss")))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class EpochResult:
    """What one epoch leaves in ``metrics.jsonl``."""

    epoch: int
    phase: str
    lr: float
    train: dict[str, float]
    val_top1: float
    val_density: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochResult:
        train = {k[len("train_") :]: v for k, v in d.items() if k.startswith("train_")}
        known = {"epoch", "phase", "lr", "val_top1", "val_density", "seconds"}
        extra = {k: v for k, v in d.items() if k not in known and not k.startswith("train_")}
        return cls(d["epoch"], d["phase"], d["lr"], train, d["val_top1"], d["val_density"], d["seconds"], extra)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "phase": self.phase,
            "lr": self.lr,
            **{f"train_{k}": v for k, v in self.train.items()},
            "val_top1": self.val_top1,
            "val_density": self.val_density,
            "seconds": self.seconds,
            **self.extra,
        }


class Trainer:
    """Trains a :class:`DecoupledModel` with the decoupling losses.

    Args:
        dm: the wrapped model.
        data: a :class:`nd_plugin.data.DataBundle`.
        config: the options; ``None`` fields get their defaults (:meth:`TrainConfig.resolved`).
        out: a run directory to keep resumable: after each epoch the checkpoint and
            ``metrics.jsonl`` are written there (rank 0 only), by
            :func:`nd_plugin.run.epoch_writer`; ``None``: nothing is written.
        progress: show progress bars (rank 0 only).
        on_epoch_end: called as ``on_epoch_end(trainer, epoch)`` on rank 0 after each epoch
            (``trainer.state_dict(epoch)`` and ``trainer.history`` are up to date); replaces the
            writer that ``out`` sets.
        before_step: called as ``before_step(trainer)`` after each backward pass, before the
            optimiser step: the gradients are there to change, e.g. torch-pruning's
            ``pruner.regularize(model)`` for sparse learning.
        teacher: the network to distil from in every epoch (``config.distill_weight`` must be > 0),
            e.g. the dense original of a pruned network; it is moved to the device, put in eval
            mode and its parameters frozen, in place (it must not share parameters with ``dm``). Without it, a ``distill_weight`` > 0 distils from a copy of ``dm``
            taken as the decoupling phase begins (gates open), kept in the checkpoint.

    Example:
        >>> from nd_plugin.adapters import create_model
        >>> from nd_plugin.data import load_data
        >>> data = load_data("synthetic:64")
        >>> cfg = TrainConfig(model="cifar:resnet20", data="synthetic:64", epochs=1, warmup_epochs=0, batch_size=32).resolved()
        >>> dm = nd_plugin.wrap(create_model(cfg.model, num_classes=data.num_classes), torch.zeros(1, *data.input_size))
        >>> stats = Trainer(dm, data, cfg, out=tmp, progress=False).fit()
        >>> stats.n, sorted(p.name for p in tmp.iterdir())[:2]
        (10, ['checkpoint.pt', 'metrics.jsonl'])
    """

    def __init__(
        self,
        dm: DecoupledModel,
        data: Any,
        config: TrainConfig,
        out: str | os.PathLike | None = None,
        *,
        progress: bool = True,
        on_epoch_end: Callable[[Trainer, int], None] | None = None,
        before_step: Callable[[Trainer], None] | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        config = config.resolved()
        if teacher is not None and config.distill_weight == 0:
            raise ConfigError(
                "a teacher was given but distill_weight is 0: set distill_weight > 0 to distil from it.",
                params=("teacher", "distill_weight"),
            )
        if teacher is not None and {id(p) for p in teacher.parameters()} & {id(p) for p in dm.parameters()}:
            raise ConfigError(
                "the teacher shares parameters with the trained model: the Trainer freezes the teacher's, so pass a "
                "separate copy (e.g. copy.deepcopy or dm.unwrapped()).",
                params=("teacher",),
            )
        if teacher is None and config.distill_weight > 0 and config.epochs == 0:
            raise ConfigError(
                "distill_weight > 0 without a teacher distils from the network as the decoupling phase begins, "
                "and this run has no decoupling epoch: pass the teacher (e.g. the dense original).",
                params=("teacher", "distill_weight", "epochs"),
            )
        self.before_step = before_step
        self.cfg = config
        self.data = data
        if on_epoch_end is None and out is not None:
            from nd_plugin.run import epoch_writer

            on_epoch_end = epoch_writer(out, config.model)
        self.on_epoch_end = on_epoch_end
        self.device = resolve_device(config.device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.progress = progress and self.dist.main
        self.dm = dm.to(self.device)
        if self.device.type == "cuda":
            self.dm = self.dm.to(memory_format=torch.channels_last)
        self.loss_fn = DecouplingLoss(
            config.lambda_m,
            config.lambda_k,
            config.lambda_s,
            config.ratio,
            channels=[s.channels for s in dm.gate_sites],
            num_classes=data.num_classes,
            mi_init=config.mi_init,
            mi_scope=config.mi_scope,
            sparsity_scope=config.sparsity_scope,
            sparsity_cap=config.sparsity_cap,
            lambda_c=config.lambda_c,
        ).to(self.device)
        groups = param_groups(
            self.dm,
            self.loss_fn,
            lr=config.lr,
            acm_lr=config.acm_lr,
            weight_decay=config.weight_decay,
            gate_weight_decay=config.gate_weight_decay,
        )
        self.optimizer = torch.optim.SGD([{**g, "base_lr": g["lr"]} for g in groups], lr=config.lr, momentum=config.momentum)
        self._ddp = PhaseDDP(self.dm, self.loss_fn, self.dist, self.device, config.lambda_m)
        self.net: nn.Module = self.dm  # the phase's DDP wrapper under torchrun (set per epoch)
        self.start_epoch = 0
        self.history: list[EpochResult] = []
        self._graphed: _GraphedStep | None = None
        self._compute: Any = _compiled(self._forward_loss) if config.compile else self._forward_loss
        self._own_teacher = teacher is None  # a copy of dm made here (checkpointed) or the caller's
        self.teacher = self._frozen(teacher) if teacher is not None else None

    def _frozen(self, teacher: nn.Module) -> nn.Module:
        teacher = teacher.to(self.device).eval().requires_grad_(False)
        return teacher.to(memory_format=torch.channels_last) if self.device.type == "cuda" else teacher

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self, epoch: int) -> dict[str, Any]:
        """Everything needed to resume after ``epoch`` (0-based, completed)."""
        return {
            "model": self.dm.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"unit": "step"},  # the schedule is a function of the epoch (set_lr)
            "epoch": epoch,
            "rng": _rng_state(),
            "history": [r.to_dict() for r in self.history],
            **({"teacher": self.teacher.state_dict()} if self._own_teacher and self.teacher is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a checkpoint written by :meth:`state_dict`; training continues after its epoch."""
        self.dm.load_state_dict(state["model"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"]) + 1
        self.history = [EpochResult.from_dict(d) for d in state.get("history", [])]
        if self._own_teacher and "teacher" in state:
            self.teacher = self._frozen(self.dm.unwrapped())
            self.teacher.load_state_dict(state["teacher"])

    # ----------------------------------------------------------------------------------- loops
    def _loader(self, split: str, epoch: int, *, shuffle: bool) -> DataLoader:
        dataset = self.data.train if split == "train" else self.data.val
        if self.dist.enabled:
            dataset = Subset(dataset, range(self.dist.rank, len(dataset), self.dist.world))
        generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            generator=generator if shuffle else None,
            num_workers=self.cfg.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=shuffle and len(dataset) > self.cfg.batch_size,
            persistent_workers=False,
        )

    def _autocast(self):
        if self.cfg.amp and self.device.type == "cuda":
            # no cast cache: CUDA-graph capture needs it off, and a CNN casts each weight once anyway
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        return nullcontext()

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def _phase_progress(self, epoch: float) -> float:
        """Share of the decoupling phase done at a (fractional) global epoch (negative in warm-up)."""
        return (epoch - self.cfg.warmup_epochs) / max(self.cfg.epochs, 1)

    def set_lr(self, epoch: float) -> float:
        """Sets every group's learning rate for a (fractional) global epoch; returns the network's.

        The gates' group gets 0 once ``freeze_gates_after`` of the decoupling phase is done.
        """
        factor = lr_factor(epoch, self.cfg)
        frozen = self.cfg.freeze_gates_after < 1.0 and self._phase_progress(epoch) >= self.cfg.freeze_gates_after
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0 if frozen and group.get("name") == "gates" else group["base_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]

    def set_class_routing(self, epoch: float) -> float:
        """Sets ``L_c``'s weight for a (fractional) global epoch of the decoupling phase; returns it.

        ``lambda_c`` until ``lambda_c_until`` of the phase is done, 0 after; the loss's weight is
        updated in place (:meth:`DecouplingLoss.set_lambda_c <nd_plugin.DecouplingLoss.set_lambda_c>`),
        so a captured CUDA graph sees it.
        """
        weight = self.cfg.lambda_c if self._phase_progress(epoch) < self.cfg.lambda_c_until else 0.0
        if weight != self.loss_fn.lambda_c:
            self.loss_fn.set_lambda_c(weight)
        return weight

    def set_density_target(self, epoch: float) -> float:
        """Sets ``L_s``'s target density for a (fractional) global epoch of the decoupling phase.

        Follows ``density_schedule`` (:func:`nd_plugin.training.config.density_target`) over the decoupling
        epochs; returns the target.
        """
        cfg = self.cfg
        target = density_target(self._phase_progress(epoch), cfg.ratio, cfg.density_schedule, cfg.density_ramp)
        if target != self.loss_fn.ratio:
            self.loss_fn.set_ratio(target)
        return target

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor, warmup: bool) -> tuple[LossTerms, torch.Tensor, torch.Tensor]:
        """Forward pass and loss of one batch: ``(terms, logits, gate density)``."""
        with self._autocast():
            if warmup:
                logits = self.net(x)
                return self._distilled(self.loss_fn(logits, y, [], None), logits, x), logits, torch.ones((), device=x.device)
            want_pre = self.cfg.lambda_k > 0
            outputs = self.net(
                x,
                return_path=True,
                return_pre_gate=want_pre,
                return_gate_logits=True,
                pre_gate_activation=self.cfg.kl_target == "activation",
            )
            logits, gates, z = outputs[0], outputs[1], outputs[-1]
            pre = outputs[2] if want_pre else None
            terms = self.loss_fn(logits, y, gates, pre, gate_logits=z if self.cfg.sparsity_gates == "eval" else None)
            terms = self._distilled(terms, logits, x)
            density = torch.cat([g.detach() for g in gates.values()], 1).gt(0.5).float().mean()
        return terms, logits, density

    def _distilled(self, terms: LossTerms, logits: torch.Tensor, x: torch.Tensor) -> LossTerms:
        """``terms`` with the distillation term added (``distill_weight``·``d``) where there is a teacher."""
        if self.teacher is None:
            return terms
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        d = distillation_loss(logits, teacher_logits, self.cfg.distill_temperature)
        return dataclasses.replace(terms, total=terms.total + self.cfg.distill_weight * d, d=d)

    def _uses_cuda_graphs(self) -> bool:
        return self.cfg.cuda_graphs and self.device.type == "cuda" and not self.dist.enabled

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data; returns mean loss terms, accuracy and gate density."""
        warmup = epoch < self.cfg.warmup_epochs
        self.net = self._ddp.module(warmup)
        self.net.train()
        if not warmup and self.teacher is None and self.cfg.distill_weight > 0:
            self.teacher = self._frozen(self.dm.unwrapped())  # the network as the decoupling phase begins
        sums = torch.zeros(10, device=self.device)  # loss, ce, mi, kl, s, correct, n, density*n, c, d
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite step
        loader = self._loader("train", epoch, shuffle=True)
        context = self.dm.gates_open() if warmup else nullcontext()
        step_fn: Any = functools.partial(eager_step, functools.partial(self._compute, warmup=warmup), self.optimizer)
        if not warmup and self._uses_cuda_graphs():
            if self._graphed is None:
                self._graphed = _GraphedStep(functools.partial(self._compute, warmup=False), self.optimizer)
            step_fn = self._graphed
        # a sync per step stalls the GPU queue: there, finiteness is checked every few steps
        check_every = 1 if self.device.type == "cpu" else 25
        from nd_plugin._progress import make_progress

        progress = make_progress(transient=True) if self.progress else None
        task = None
        with context, progress or nullcontext():
            if progress is not None:
                phase = "warm-up" if warmup else "decouple"
                first = "compiling the step (torch.compile)…" if self.cfg.compile else ""
                task = progress.add_task(f"epoch {epoch + 1}/{self.total_epochs} {phase}", total=len(loader), info=first)
            for step, (x, y) in enumerate(loader):
                x, y = self._to_device(x, y)
                if not warmup:
                    self.set_density_target(epoch + step / len(loader))
                    self.set_class_routing(epoch + step / len(loader))
                terms, logits, density = step_fn(x, y)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(terms.total.detach()), step, first_bad)
                if step % check_every == 0 or step == len(loader) - 1:
                    self._raise_if_nonfinite(first_bad, epoch)
                self.set_lr(epoch + step / len(loader))
                if self.before_step is not None:
                    self.before_step(self)
                self.optimizer.step()
                n = y.shape[0]
                with torch.no_grad():
                    sums += torch.stack(
                        [
                            terms.total.detach() * n,
                            terms.ce.detach() * n,
                            terms.mi.detach() * n,
                            terms.kl.detach() * n,
                            terms.s.detach() * n,
                            (logits.argmax(1) == y).sum().float(),
                            sums.new_full((), float(n)),
                            density * n,
                            terms.c.detach() * n,
                            (terms.d.detach() if terms.d is not None else terms.c.new_zeros(())) * n,
                        ]
                    ).float()
                if progress is not None and (step % 10 == 0 or step == len(loader) - 1):
                    s = sums.tolist()
                    info = f"loss {s[0] / s[6]:.3f} acc {s[5] / s[6]:.3f} density {s[7] / s[6]:.2f}"
                    progress.update(task, completed=step + 1, info=info)
        self.dist.all_reduce(sums)
        s = sums.tolist()
        n = max(s[6], 1.0)
        return {
            "loss": s[0] / n,
            "ce": s[1] / n,
            "l_mi": s[2] / n,
            "l_kl": s[3] / n,
            "l_s": s[4] / n,
            "l_c": s[8] / n,
            **({"l_d": s[9] / n} if self.cfg.distill_weight > 0 else {}),
            "top1": s[5] / n,
            "density": s[7] / n,
            **({} if warmup else {"target_density": self.loss_fn.ratio}),
        }

    @staticmethod
    def _raise_if_nonfinite(first_bad: torch.Tensor, epoch: int) -> None:
        step = int(first_bad)
        if step >= 0:
            raise TrainingError(
                f"non-finite loss at epoch {epoch + 1}, step {step + 1}; training stopped and the last good "
                "checkpoint is kept. Lower lr or the λs and rerun with resume=True.",
                params=("lr", "resume"),
            )

    def recalibrate_bn(self, epoch: int) -> None:
        """BatchNorm statistics re-estimated with eval-time gates (:func:`nd_plugin.recalibrate_bn`), averaged over ranks.

        Uses ``bn_recalibrate`` batches, and at most a tenth of an epoch's (at least one): the
        statistics settle within a few thousand images, and on a small data set 50 batches would
        cost a third of the epoch.
        """
        if self.cfg.bn_recalibrate > 0:
            with self._autocast():
                loader = self._loader("train", 10_000 + epoch, shuffle=True)
                batches = min(self.cfg.bn_recalibrate, max(1, len(loader) // 10))
                norms = recalibrate_bn(self.dm, loader, batches=batches, device=self.device)
            self.dist.average([buf for m in norms for buf in (m.running_mean, m.running_var)])

    def evaluate(self, epoch: int = 0) -> PathStats:
        """Validation pass collecting path statistics (all-reduced across ranks).

        The raw paths are kept too (bit-packed in ``paths.npz``; under ``torchrun`` gathered from
        every rank), so that the analyses that need them (decision tree, path distribution) run
        without another pass.
        """
        stats = self.dm.paths(
            self._loader("val", epoch, shuffle=False),
            device=self.device,
            raw=True,
            classes=list(self.data.classes),
            num_classes=self.data.num_classes,
        )
        return reduce_path_stats(stats, self.dist, self.device)

    @property
    def total_epochs(self) -> int:
        return self.cfg.warmup_epochs + self.cfg.epochs

    def fit(self) -> PathStats:
        """Runs the remaining epochs, writing metrics and a checkpoint after each.

        Returns:
            The validation path statistics after the last epoch.
        """
        stats = None
        for epoch in range(self.start_epoch, self.total_epochs):
            t0 = time.perf_counter()
            phase = "warmup" if epoch < self.cfg.warmup_epochs else "decouple"
            lr = self.set_lr(epoch)
            train = self.train_epoch(epoch)
            if phase == "decouple":
                self.recalibrate_bn(epoch)
            with self.dm.gates_open() if phase == "warmup" else nullcontext():  # warm-up trains the plain model
                stats = self.evaluate(epoch)
            result = EpochResult(epoch + 1, phase, lr, train, stats.accuracy, stats.density, time.perf_counter() - t0)
            self.history.append(result)
            if self.dist.main:
                self._log(result)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(self, epoch)
        if stats is None:  # nothing left to train (a finished run resumed): evaluate once
            stats = self.evaluate(self.total_epochs)
        return stats

    def _log(self, r: EpochResult) -> None:
        if not self.progress:
            return
        from rich.console import Console

        Console(stderr=True).print(
            f"epoch {r.epoch}/{self.total_epochs} [{r.phase}] lr {r.lr:.4g} "
            f"loss {r.train['loss']:.3f} (ce {r.train['ce']:.3f} mi {r.train['l_mi']:.3f} "
            f"kl {r.train['l_kl']:.4f} s {r.train['l_s']:.2f}) train-acc {r.train['top1']:.3f} | "
            f"val top-1 {r.val_top1:.4f} density {r.val_density:.3f} | {r.seconds:.0f}s"
        )
