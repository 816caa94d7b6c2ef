"""Every option of a decoupling run, its defaults (seed Table A) and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from nd_plugin.errors import ConfigError
from nd_plugin.gates import ACM_INITS
from nd_plugin.losses import MI_INITS, MI_SCOPES, SPARSITY_SCOPES

__all__ = [
    "DENSITY_SCHEDULES",
    "EPOCHS",
    "KL_TARGETS",
    "LR",
    "SCHEDULES",
    "SPARSITY_GATES",
    "TrainConfig",
    "WARMUP_EPOCHS",
    "density_target",
    "lr_factor",
    "preset",
    "resolve_device",
]

#: Learning-rate schedules: the paper's steps (x0.1 at 1/2 and 3/4 of a phase) or a cosine decay,
#: both evaluated per training step.
SCHEDULES = ("step", "cosine")
#: ``L_kl``'s target: the site's output before the gate (``output``), or after the ReLU at sites
#: that feed one (``activation``, the authors' release).
KL_TARGETS = ("output", "activation")
#: Which gates ``L_s`` counts: eval-time ``1[z > 0]`` (``eval``) or the noisy training gates (``train``,
#: the release).
SPARSITY_GATES = ("eval", "train")
#: How ``L_s``'s target density moves during the decoupling phase: ``constant`` (``R`` from the first
#: step, the paper), or from 1 (every gate on) down to ``R`` over the first ``density_ramp`` share of
#: the phase, ``linear`` or ``cubic`` (Zhu & Gupta 2017: fast first, gentle near ``R``), then held.
DENSITY_SCHEDULES = ("constant", "linear", "cubic")

# Seed Table A (λ_m, λ_k, λ_s, R) for the networks it names; CIFAR entries keep the paper's λs.
_TABLE_A: dict[str, dict[str, float]] = {
    "cifar:resnet": {"lambda_m": 0.01, "lambda_k": 1.0, "lambda_s": 1.5e-4},
    "cifar:vgg": {"lambda_m": 0.04, "lambda_k": 1.0, "lambda_s": 2e-4},
    "resnet18": {"lambda_m": 0.005, "lambda_k": 1.0, "lambda_s": 0.01, "ratio": 0.6},
    "vgg16": {"lambda_m": 0.01, "lambda_k": 1.0, "lambda_s": 0.01, "ratio": 0.5},
}
_GENERIC = {"lambda_m": 0.005, "lambda_k": 1.0, "lambda_s": 0.01, "ratio": 0.6}

#: What :meth:`TrainConfig.resolved` gives ``warmup_epochs`` and ``lr`` left ``None``: a run from
#: scratch trains the plain model first; one from trained weights (``weights``/``pretrained``) not.
WARMUP_EPOCHS = {"scratch": 3, "trained": 0}
LR = {"scratch": 0.05, "trained": 0.01}
#: What it gives ``epochs`` left ``None``: more on the small embedded ``digits`` set than elsewhere.
EPOCHS = {"digits": 4, "other": 2}


def preset(model: str) -> dict[str, float]:
    """Default λs (and R) for a model name: seed Table A where it names the network.

    Example:
        >>> preset("cifar:resnet56")["lambda_s"]
        0.00015
    """
    name = model.split(":")[-1].lower()
    if model.startswith("cifar:") or name.startswith(("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")):
        return dict(_TABLE_A["cifar:vgg" if name.startswith("vgg") else "cifar:resnet"])
    for key in ("resnet18", "vgg16"):
        if name.startswith(key):
            return dict(_TABLE_A[key])
    return dict(_GENERIC)


@dataclass
class TrainConfig:
    """Every option of a decoupling run (``None`` means: choose the default for the model/data).

    The one owner of every default: ``nd decouple``'s options, the benchmarks',
    :func:`~nd_plugin.wrap`'s and :func:`~nd_plugin.training.optim.param_groups`' read theirs from
    these fields, and :meth:`resolved` fills the ``None`` ones (:func:`preset`, :data:`EPOCHS`,
    :data:`WARMUP_EPOCHS`, :data:`LR`).

    Attributes:
        ratio: ``R``, the target fraction of a layer's filters that are ON for an average input
            (default: :func:`preset`).
        epochs: decoupling epochs (gates and losses on); default :data:`EPOCHS`.
        warmup_epochs: plain-model epochs first; default :data:`WARMUP_EPOCHS` (none from trained
            weights, ``weights``/``pretrained``).
        lr: learning rate of the network; default :data:`LR` (lower when fine-tuning trained weights).
        acm_lr: learning rate of the gates and L_mi classifiers (own group, no weight decay);
            default 0.1: at the network's rate the gates barely move in a short run, at 0.5 they
            overshoot into static on/off (measured on digits, docs/notes/history.md).
        gate_bias: initial gate logit ``b2`` of every ACM.
        bn_recalibrate: batches of training data used after each decoupling epoch to re-estimate
            BatchNorm statistics with eval-time (hard, noise-free) gates, and at most a tenth of
            the epoch's batches (at least one), so that it costs at most ~3% of an epoch; 0 turns
            it off.
        amp: bf16 autocast on a GPU (no effect on the CPU).
        cuda_graphs: on one GPU, capture the decoupling step (forward, losses, backward) once as a
            CUDA graph and replay it per batch: the gates and losses add many small kernels, and
            launching them one by one made a step 2.85x a plain one on an H100.
        compile: compile forward and losses with ``torch.compile`` (Inductor fuses each gate's small
            element-wise ops into a few kernels; backward is compiled with them). The first step of
            each phase compiles, a minute or two; needs a C++ compiler on the CPU, Triton on a GPU.
            Combines with ``cuda_graphs``: the compiled step is then captured and replayed.
        hard_share: share of samples whose gates are hard (``1[z̃ > 0]``) in training, in ``[0, 1]``;
            the rest use the soft gate (``nd_plugin.gates.binarize``).
        download: fetch a downloadable data set (CIFAR) into ``$ND_DATA_DIR`` (default
            ``~/.cache/nd-plugin/data``) when it is not there yet.
        acm_init: ``open`` (every gate open, input-independent at the start) or ``kaiming`` (the
            authors' release).
        mi_init: ``L_mi`` classifier init, ``kaiming`` (the release) or ``torch``.
        mi_scope: what ``λ_m`` scales: ``all`` (the release) or ``gates``.
        gate_weight_decay: weight decay of the gates and ``L_mi`` classifiers (the release: 1e-4,
            the network's).
        kl_target: :data:`KL_TARGETS`.
        sparsity_gates: :data:`SPARSITY_GATES`.
        density_schedule: how ``L_s``'s target density moves from 1 to ``ratio``,
            :data:`DENSITY_SCHEDULES` (:func:`density_target`).
        density_ramp: share of the decoupling phase over which the target density moves from 1 to
            ``ratio`` (then it holds), in ``[0, 1]``; ignored by ``constant``.
        sparsity_scope: what ``L_s`` pulls towards ``ratio``: each layer's mean density (``layer``,
            the paper), each input's (``input``) or each filter's on-rate (``filter``);
            :data:`nd_plugin.losses.SPARSITY_SCOPES`.
        sparsity_cap: the highest on-rate a filter may have before ``L_s`` charges it, in
            ``[ratio, 1]`` (ours; 1 turns it off): each filter on for more of the batch pays the
            excess, so no filter can be static-on and the layer must route to reach ``ratio``.
        lambda_c: weight of ``L_c``, the class-routing term (ours; 0 turns it off, ``>= 0``): it
            rewards each filter for the mutual information between its gate and the class, so a
            filter earns by serving some classes and not others (:class:`nd_plugin.DecouplingLoss`).
        lambda_c_until: share of the decoupling phase during which ``L_c`` is on, in ``[0, 1]``
            (ours; 1, the default, keeps it on throughout): after it ``λ_c`` is 0, so the network
            can recover accuracy from routes ``L_c`` made.
        freeze_gates_after: share of the decoupling phase after which the gates and the ``L_mi``
            classifiers stop learning (their learning rate is 0), in ``[0, 1]`` (ours; 1, the
            default, never freezes them): the network's weights then adapt to fixed gate functions
            (which still read the features, so the routes move as the weights do). Measured with
            ``lambda_c_until`` in docs/notes/dynamic.md (approach 12).
        distill_weight: weight of a knowledge-distillation term from a dense teacher, ``>= 0`` (0,
            the default, turns it off; :func:`nd_plugin.losses.distillation_loss`). The teacher is the
            one given to the Trainer (then it teaches every epoch, e.g. a pruned network fine-tuned from
            its dense original) or else the network as the decoupling phase begins, gates open: the
            trained network when ``weights`` are given. Apply it to every row of a comparison alike.
        distill_temperature: the distillation temperature ``T > 0``.
    """

    model: str = "resnet18"
    data: str = "digits"
    ratio: float | None = None
    epochs: int | None = None
    warmup_epochs: int | None = None
    batch_size: int = 64
    lr: float | None = None
    acm_lr: float = 0.1
    lambda_m: float | None = None
    lambda_k: float | None = None
    lambda_s: float | None = None
    sites: str = "internal"
    weights: str | None = None
    pretrained: bool = False
    device: str = "auto"
    seed: int = 0
    schedule: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    noise_std: float = 1.0
    gate_bias: float = 1.0
    reduction: int = 4
    workers: int = 0
    download: bool = False
    bn_recalibrate: int = 50
    amp: bool = True
    cuda_graphs: bool = True
    compile: bool = False
    hard_share: float = 0.5
    acm_init: str = "kaiming"
    mi_init: str = "kaiming"
    mi_scope: str = "all"
    gate_weight_decay: float = 0.0
    kl_target: str = "output"
    sparsity_gates: str = "eval"
    density_schedule: str = "constant"
    density_ramp: float = 0.5
    sparsity_scope: str = "layer"
    sparsity_cap: float = 1.0
    lambda_c: float = 0.0
    lambda_c_until: float = 1.0
    freeze_gates_after: float = 1.0
    distill_weight: float = 0.0
    distill_temperature: float = 4.0

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` replaced by its default, validated."""
        cfg = TrainConfig(**asdict(self))
        p = preset(cfg.model)
        for key in ("lambda_m", "lambda_k", "lambda_s", "ratio"):
            if getattr(cfg, key) is None:
                setattr(cfg, key, p.get(key, _GENERIC[key]))
        start = "trained" if cfg.weights or cfg.pretrained else "scratch"
        if cfg.warmup_epochs is None:
            cfg.warmup_epochs = WARMUP_EPOCHS[start]
        if cfg.epochs is None:
            cfg.epochs = EPOCHS["digits" if cfg.data == "digits" else "other"]
        if cfg.lr is None:
            cfg.lr = LR[start]
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raises :class:`ConfigError` for any option out of range."""
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ConfigError(
                f"ratio must be in [0, 1) (the target fraction of filters that are on), got {self.ratio}.", params=("ratio",)
            )
        for key in ("lambda_m", "lambda_k", "lambda_s", "lambda_c"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}.", params=(key,))
        if self.epochs is not None and self.epochs < 0 or self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise ConfigError("epochs and warmup_epochs must be >= 0.", params=("epochs", "warmup_epochs"))
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}.", params=("batch_size",))
        choices = {
            "schedule": SCHEDULES,
            "acm_init": ACM_INITS,
            "mi_init": MI_INITS,
            "mi_scope": MI_SCOPES,
            "kl_target": KL_TARGETS,
            "sparsity_gates": SPARSITY_GATES,
            "density_schedule": DENSITY_SCHEDULES,
            "sparsity_scope": SPARSITY_SCOPES,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}.", params=(key,))
        if not 0.0 <= self.hard_share <= 1.0:
            raise ConfigError(
                f"hard_share must be in [0, 1] (the share of hard training gates), got {self.hard_share}.", params=("hard_share",)
            )
        if not 0.0 <= self.density_ramp <= 1.0:
            raise ConfigError(
                f"density_ramp must be in [0, 1] (the share of the decoupling epochs over which the target "
                f"density moves from 1 to ratio), got {self.density_ramp}.",
                params=("density_ramp", "ratio"),
            )
        for key, what in (
            ("lambda_c_until", "the share of the decoupling epochs during which L_c is on"),
            ("freeze_gates_after", "the share of the decoupling epochs after which the gates stop learning"),
        ):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1] ({what}), got {getattr(self, key)}.", params=(key,))
        if not 0.0 <= self.sparsity_cap <= 1.0 or (self.ratio is not None and self.sparsity_cap < self.ratio):
            raise ConfigError(
                f"sparsity_cap must be in [ratio, 1] (the highest free on-rate of a filter), got {self.sparsity_cap}"
                + ("" if self.ratio is None else f" with ratio {self.ratio}") + ".",
                params=("sparsity_cap", "ratio"),
            )
        if not (self.distill_weight >= 0 and math.isfinite(self.distill_weight)):
            raise ConfigError(
                f"distill_weight must be >= 0 and finite (0 turns distillation off), got {self.distill_weight}.",
                params=("distill_weight",),
            )
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise ConfigError(
                f"distill_temperature must be > 0 and finite, got {self.distill_temperature}.", params=("distill_temperature",)
            )
        if self.bn_recalibrate < 0:
            raise ConfigError(
                f"bn_recalibrate must be >= 0 (batches; 0 turns it off), got {self.bn_recalibrate}.", params=("bn_recalibrate",)
            )
        if self.gate_weight_decay < 0:
            raise ConfigError(f"gate_weight_decay must be >= 0, got {self.gate_weight_decay}.", params=("gate_weight_decay",))
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}.", params=("device",))
        if self.weights and self.pretrained:
            raise ConfigError("pass either weights or pretrained=True, not both.", params=("weights", "pretrained"))


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a CUDA request without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} was requested but no CUDA GPU is available; use device 'cpu' or 'auto'.", params=("device",)
        )
    return torch.device(device)


def lr_factor(epoch: float, cfg: TrainConfig) -> float:
    """LR multiplier at a (fractional) global epoch: each phase restarts and decays on its own.

    Example:
        >>> cfg = TrainConfig(warmup_epochs=0, epochs=2, schedule="cosine")
        >>> [round(lr_factor(e, cfg), 3) for e in (0.0, 0.5, 1.0, 1.5)]
        [1.0, 0.854, 0.5, 0.146]
    """
    if epoch < cfg.warmup_epochs:
        start, length = 0, cfg.warmup_epochs
    else:
        start, length = cfg.warmup_epochs, max(cfg.epochs, 1)
    t = (epoch - start) / length
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    return 0.1 ** sum(t >= m for m in (0.5, 0.75))  # the paper's steps (100/150 of 200 epochs)


def density_target(progress: float, ratio: float, schedule: str = "constant", ramp: float = 0.5) -> float:
    """``L_s``'s target density at a point of the decoupling phase.

    ``constant`` is ``ratio`` throughout (the paper). ``linear`` and ``cubic`` start at 1, where a
    trained network's gates are, and reach ``ratio`` after the share ``ramp`` of the phase:
    ``d = R + (1 − R)·(1 − t/ramp)^k`` with ``k`` 1 or 3 (the cubic is Zhu & Gupta's gradual pruning
    schedule, written for density), then hold ``R``. A ramp of 0 is ``constant``.

    Args:
        progress: share of the decoupling phase done, in ``[0, 1]`` (fractional epochs / epochs).
        ratio: ``R``, the final target density.
        schedule: one of :data:`DENSITY_SCHEDULES`.
        ramp: share of the phase the move takes, in ``[0, 1]``.

    Returns:
        The target density, between ``ratio`` and 1.

    Raises:
        ConfigError: an unknown ``schedule``.

    Example:
        >>> [round(density_target(t, 0.5, "cubic", 0.5), 4) for t in (0.0, 0.25, 0.5, 0.9)]
        [1.0, 0.5625, 0.5, 0.5]
        >>> [density_target(t, 0.5, "linear", 0.5) for t in (0.0, 0.25, 1.0)]
        [1.0, 0.75, 0.5]
        >>> density_target(0.0, 0.5)
        0.5
    """
    if schedule not in DENSITY_SCHEDULES:
        raise ConfigError(f"density_schedule must be one of {', '.join(DENSITY_SCHEDULES)}, got {schedule!r}.")
    if schedule == "constant" or ramp <= 0 or progress >= ramp:
        return ratio
    left = 1.0 - max(progress, 0.0) / ramp
    return ratio + (1.0 - ratio) * left ** (3 if schedule == "cubic" else 1)
