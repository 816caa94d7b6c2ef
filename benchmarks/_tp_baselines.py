"""torch-pruning's side of ``compare_pruners.py``: the tp families, FLOPs matching, sparse learning.

Every baseline row starts from the same plain model and is fine-tuned by the same
:class:`~nd_plugin.training.trainer.Trainer` as the decoupling rows (:func:`finetune`). Not a script itself.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

import nd_plugin
from _suite import Suite
from nd_plugin.flops import count_flops
from nd_plugin.tracing import find_sites
from nd_plugin.training.trainer import Trainer, seed_everything

PRUNERS: dict[str, tuple[str, Callable[[], tp.importance.Importance]]] = {
    "l1": ("tp L1", lambda: tp.importance.MagnitudeImportance(p=1)),
    "bn_scale": ("tp BN scale", lambda: tp.importance.BNScaleImportance()),
    "group_norm": ("tp group norm", lambda: tp.importance.GroupMagnitudeImportance(p=2)),
    # first-order Taylor (Molchanov et al. 2019) on the gradients of --taylor-batches training batches
    "taylor": ("tp Taylor", lambda: tp.importance.GroupTaylorImportance()),
    # sparse learning, tp's strongest CIFAR recipe (reproduce/main.py --method group_sl): the
    # importance normalised by its maximum, as tp does on CIFAR
    "group_sl": ("tp group SL", lambda: tp.importance.GroupMagnitudeImportance(p=2, normalizer="max")),
}
#: families whose importance needs gradients of the loss on the pruned model's weights
NEEDS_GRADIENTS = frozenset({"taylor"})
#: families that train with ``GroupNormPruner.regularize`` before pruning
SPARSE_LEARNING = frozenset({"group_sl"})


def tp_settings(key: str, args: argparse.Namespace) -> dict[str, Any]:
    """The torch-pruning classes and settings a row of family ``key`` used (recorded with the row)."""
    importance = {
        "l1": "MagnitudeImportance(p=1)",
        "bn_scale": "BNScaleImportance()",
        "group_norm": "GroupMagnitudeImportance(p=2)",
        "taylor": "GroupTaylorImportance()",
        "group_sl": "GroupMagnitudeImportance(p=2, normalizer='max')",
    }[key]
    out: dict[str, Any] = {"pruner": "BasePruner", "importance": importance, "global_pruning": True, "one_shot": True}
    if key in NEEDS_GRADIENTS:
        out["gradient_batches"] = args.taylor_batches
    if key in SPARSE_LEARNING:
        out |= {
            "regularizer": "GroupNormPruner(reg, alpha=4).regularize after every backward",
            "reg": args.sl_reg,
            "sl_epochs": sl_epochs(args),
            "sl_weight_decay": 0.0,
            "finetune_epochs": args.epochs - sl_epochs(args),
        }
    return out


def sl_epochs(args: argparse.Namespace) -> int:
    """Sparse-learning epochs of the ``group_sl`` rows: ``--sl-epochs``, default half the budget."""
    return args.epochs // 2 if args.sl_epochs is None else args.sl_epochs


def prunable_scope(model: nn.Module, example: torch.Tensor, scope: str) -> set[str] | None:
    """Names of the convs whose filters the baselines may prune (None: every layer but the last linear).

    Args:
        model: the plain model.
        example: one input batch for tracing.
        scope: ``internal`` (the internal gate sites) or ``all``.
    """
    if scope == "all":
        return None
    return {s.name for s in find_sites(model, example) if s.internal}


def ignored_layers(model: nn.Module, scope: set[str] | None) -> list[nn.Module]:
    """The layers torch-pruning must leave whole: outside ``scope``, or only the last linear layer."""
    if scope is None:
        return [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    return [m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in scope]


def tp_prune(
    model: nn.Module,
    importance: tp.importance.Importance,
    ratio: float,
    example: torch.Tensor,
    scope: set[str] | None,
    round_to: int | None = None,
) -> nn.Module:
    """A pruned copy of ``model``: tp's standard pruner, global pruning, one shot.

    Args:
        model: the plain model (not modified).
        importance: the channel importance.
        ratio: tp's global ``pruning_ratio``.
        example: one input batch for tracing.
        scope: names of the convs that may lose filters (None: all but the last linear layer).
        round_to: tp's channel rounding (None: none).

    Returns:
        The pruned copy (eval mode, same device as ``model``).

    Raises:
        RuntimeError: the pruned model no longer runs (tp could not follow the graph).
    """
    pruned = copy.deepcopy(model).eval()
    for copied, original in zip(pruned.parameters(), model.parameters()):  # deepcopy drops .grad (Taylor needs it)
        if original.grad is not None:
            copied.grad = original.grad.clone()
    ignored = ignored_layers(pruned, scope)
    if ratio > 0:
        pruner = tp.pruner.BasePruner(
            pruned,
            example,
            importance=importance,
            global_pruning=True,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            round_to=round_to,
        )
        pruner.step()
    try:
        with torch.no_grad():
            pruned(example)
    except RuntimeError as exc:
        raise RuntimeError(
            f"the model pruned by torch-pruning (ratio {ratio:.3f}) no longer runs: {exc}. "
            "Use --baseline-scope internal for models tp cannot prune across residual stages."
        ) from exc
    return pruned


def match_flops(
    model: nn.Module,
    importance: tp.importance.Importance,
    target: float,
    input_size: tuple[int, int, int],
    *,
    scope: set[str] | None,
    tol: float = 0.02,
    max_ratio: float = 0.95,
    max_iter: int = 25,
    round_to: int | None = None,
) -> tuple[nn.Module, float, int]:
    """Bisects tp's global pruning ratio until the pruned model's static FLOPs are within ``tol`` of ``target``.

    FLOPs fall as the ratio grows (more channels removed), so the bisection keeps the interval
    ``[lo, hi]`` with ``flops(lo) > target >= flops(hi)``.

    Args:
        model: the plain model (not modified).
        importance: the channel importance.
        target: FLOPs per input to reach.
        input_size: ``(C, H, W)``.
        scope: names of the convs that may lose filters (see :func:`prunable_scope`).
        tol: relative tolerance.
        max_ratio: largest pruning ratio tried.
        max_iter: bisection steps at most.
        round_to: tp's channel rounding (None: none).

    Returns:
        ``(pruned model, pruning ratio, its FLOPs)``: the closest to ``target`` found (check the
        tolerance yourself when the target may be out of reach).
    """
    example = torch.zeros(1, *input_size, device=next(model.parameters()).device)
    best: tuple[float, nn.Module, float, int] | None = None

    def attempt(ratio: float) -> int:
        nonlocal best
        pruned = tp_prune(model, importance, ratio, example, scope, round_to)
        flops = count_flops(pruned, input_size)
        err = abs(flops / target - 1.0)
        if best is None or err < best[0]:
            best = (err, pruned, ratio, flops)
        return flops

    lo, hi = 0.0, max_ratio
    if attempt(lo) <= target:  # nothing to prune
        return best[1], best[2], best[3]
    # FLOPs are not monotone near ratio 1 for every importance (tp skips a layer that would lose all
    # its channels): step the upper end down until it prunes enough
    while attempt(hi) > target:
        if hi < 0.1:
            return best[1], best[2], best[3]  # out of reach
        hi *= 0.8
    for _ in range(max_iter):
        if best[0] <= tol:
            break
        mid = 0.5 * (lo + hi)
        if attempt(mid) > target:
            lo = mid
        else:
            hi = mid
    return best[1], best[2], best[3]


def finetune(
    model: nn.Module,
    suite: Suite,
    progress: bool,
    epochs: int | None = None,
    *,
    before_step: Callable[[Trainer], None] | None = None,
    **overrides: Any,
) -> tuple[float, nd_plugin.DecoupledModel]:
    """Fine-tunes a plain (possibly pruned) model exactly like the suite's gates-open baseline.

    The model is wrapped and trained by :class:`~nd_plugin.training.trainer.Trainer` with the suite's resolved
    config for ``warmup + epochs`` warm-up epochs (or ``epochs``) and no decoupling epoch: every
    gate is forced open, so the plain model is trained with the same optimiser, LR schedule,
    augmentation and data order as the decoupling runs.

    Args:
        model: the plain model; it is wrapped in place (its modules are the trained ones).
        suite: the suite (data, common options).
        progress: show the trainer's progress.
        epochs: plain epochs (default: the suite's whole budget).
        before_step: the trainer's ``before_step`` hook (sparse learning regularises there).
        **overrides: other :class:`TrainConfig` fields (e.g. ``weight_decay``). With a
            ``distill_weight`` > 0 (``--set distill_weight:W``) the teacher is the suite's dense
            network, as for the decoupling rows.

    Returns:
        ``(validation top-1, the trained wrapped model)``.
    """
    settings = suite.finetune_overrides() | overrides
    if epochs is not None:
        settings["warmup_epochs"] = epochs
    cfg = suite.config(**settings)
    seed_everything(cfg.seed)
    dm = nd_plugin.wrap(model, torch.zeros(1, *suite.data.input_size))
    # a pruned network learns from the same dense teacher as the decoupling rows (their network at step 0)
    teacher = suite.dense_model() if cfg.distill_weight > 0 else None
    stats = Trainer(dm, suite.data, cfg, out=None, progress=progress, before_step=before_step, teacher=teacher).fit()
    return float(stats.accuracy), dm


def taylor_gradients(model: nn.Module, suite: Suite, batches: int) -> nn.Module:
    """A copy of ``model`` holding the cross-entropy gradients of ``batches`` training batches (summed).

    ``GroupTaylorImportance`` scores a channel by ``|weight * grad|``; the batches are the first of
    a seeded shuffle of the training split, the model in eval mode (BatchNorm statistics untouched).
    """
    scored = copy.deepcopy(model).eval()
    scored.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(suite.args.seed)
    loader = torch.utils.data.DataLoader(suite.data.train, batch_size=suite.args.batch_size, shuffle=True, generator=generator)
    for step, (x, y) in enumerate(loader):
        if step == batches:
            break
        torch.nn.functional.cross_entropy(scored(x), y).backward()
    return scored


def sparse_learning(
    model: nn.Module, suite: Suite, epochs: int, scope: set[str] | None, reg: float, progress: bool
) -> tuple[nn.Module, float]:
    """tp's sparse learning: ``epochs`` of training with ``GroupNormPruner.regularize`` after every backward.

    As in torch-pruning's ``reproduce/main.py`` (``--method group_sl``): a ``GroupNormPruner`` over
    the prunable groups (``scope``), its group-lasso-like gradient term with ``reg`` (alpha 4), no
    weight decay during this phase; every other setting is the suite's fine-tuning.

    Returns:
        ``(the regularised plain model, its validation top-1)``.
    """
    sparse = copy.deepcopy(model)
    example = torch.zeros(1, *suite.data.input_size)
    pruner = tp.pruner.GroupNormPruner(
        sparse,
        example,
        importance=PRUNERS["group_sl"][1](),
        reg=reg,
        global_pruning=True,
        ignored_layers=ignored_layers(sparse, scope),
    )
    # the wrapped model trains these very modules, so the pruner's groups see its gradients
    top1, dm = finetune(
        sparse, suite, progress, epochs=epochs, before_step=lambda _: pruner.regularize(sparse), weight_decay=0.0
    )
    return dm.unwrapped().eval(), top1
