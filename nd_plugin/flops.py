"""FLOPs: fvcore static counts and expected per-input counts from path statistics.

Conventions (fvcore's): one multiply-add is one FLOP; a conv costs
``N · C_out · H_out · W_out · C_in / groups · k_h · k_w``; element-wise ops are not counted.

*Static* FLOPs are what one forward pass of a module costs with every channel computed (fvcore
traces one input). *Expected* FLOPs per input are what the dynamic runtime computes on average:
each conv (and linear) is counted with its active output channels (its own gates) and its active
input channels (the gates of the narrow layer that feeds it; see :mod:`nd_plugin.pruning.plan`), so

    E[cost(conv)] = static(conv) · E[a_in · a_out] / (C_in · C_out)

with ``a_in``, ``a_out`` the numbers of active channels for one input. ``E[a_in · a_out]`` needs the
joint distribution of two layers' gates: with raw paths (``dm.paths(loader, raw=True)``) it is
averaged over the recorded inputs exactly; without them the two layers are *assumed independent*
(``E[a_in]·E[a_out]``) and the result says so (``independence_assumed``).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from nd_plugin.utilities import eval_mode

__all__ = [
    "ExpectedFlops",
    "count_flops",
    "expected_flops",
    "flops_by_module",
    "flops_summary",
    "format_si",
    "fvcore_nn",
    "uncounted_ops",
]


# element-wise, pooling and shape ops: fvcore counts none of them, by the convention that a model's
# FLOPs are its multiply-adds; anything else it cannot count is reported
_NEGLIGIBLE = re.compile(
    r"aten::(add|sub|mul|div|neg|relu|relu6|gelu|silu|sigmoid|tanh|hardtanh|hardswish|hardsigmoid|clamp|"
    r"mean|sum|max|min|amax|pad|constant_pad_nd|max_pool\dd|avg_pool\dd|adaptive_avg_pool\dd|"
    r"adaptive_max_pool\dd|softmax|log_softmax|dropout|feature_dropout|gt|lt|ge|le|eq|where|real|"
    r"contiguous|view|reshape|flatten|cat|stack|expand|expand_as|repeat|slice|select|index_select|"
    r"rsub|exp|sqrt|rsqrt|pow|abs|floor_divide|fill_|zeros_like|ones_like|to|type_as)_?$"
)
_logger = logging.getLogger(__name__)


def fvcore_nn() -> ModuleType:
    """``fvcore.nn``, imported without the ``torch.jit.script`` FutureWarning its import raises.

    ``import fvcore.nn`` compiles fvcore's focal loss with ``torch.jit.script``, which torch
    deprecates with a FutureWarning that says nothing to our users; that warning, and only during
    that import, is silenced. Every module of ours that needs ``fvcore.nn`` imports it through here.

    Example:
        >>> fvcore_nn().FlopCountAnalysis.__name__
        'FlopCountAnalysis'
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        import fvcore.nn

    return fvcore.nn


def uncounted_ops(analysis: Any) -> dict[str, int]:
    """The ops fvcore met but could not count, less those that cost no multiply-adds.

    Example:
        >>> from fvcore.nn import FlopCountAnalysis
        >>> class Spectral(nn.Module):
        ...     def forward(self, x):
        ...         return torch.fft.fft(x).real + x.mean()
        >>> a = FlopCountAnalysis(Spectral(), (torch.randn(1, 8),))
        >>> a.unsupported_ops_warnings(False)  # doctest: +ELLIPSIS
        <...>
        >>> _ = a.total()
        >>> uncounted_ops(a)
        {'aten::fft_fft': 1}
    """
    return {op: n for op, n in analysis.unsupported_ops().items() if not _NEGLIGIBLE.match(op)}


def _analysis(model: nn.Module, inputs: torch.Tensor):
    analysis = fvcore_nn().FlopCountAnalysis(model, (inputs,))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


def _example(model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.randn(1, *input_size, device=device)


@torch.no_grad()
def flops_by_module(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """fvcore FLOPs of one input per module name (``""`` is the whole model).

    Args:
        model: any module fvcore can trace (eval mode is used for the count).
        input_size: ``(C, H, W)``.

    Returns:
        ``{module name: FLOPs}``, including every parent module's total.
    """
    with eval_mode(model):
        logger = logging.getLogger("fvcore")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            analysis = _analysis(model, _example(model, input_size))
            counts = dict(analysis.by_module())
            missed = uncounted_ops(analysis)
        finally:
            logger.setLevel(level)
        if missed:
            _logger.warning(
                "FLOPs of %s are a lower bound: fvcore cannot count %s",
                type(model).__name__,
                ", ".join(f"{op} (x{n})" for op, n in sorted(missed.items())),
            )
        return counts


def format_si(value: float) -> str:
    """A count (FLOPs, parameters) with a G / M / k suffix and two decimals.

    Example:
        >>> format_si(26_700_000), format_si(2_500), format_si(12)
        ('26.70M', '2.50k', '12')
    """
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def count_flops(model: nn.Module, input_size: Sequence[int]) -> int:
    """Static fvcore FLOPs of one input of size ``(C, H, W)``.

    Example:
        >>> count_flops(nn.Conv2d(3, 8, 3, padding=1, bias=False), (3, 4, 4))
        3456
    """
    return int(flops_by_module(model, input_size)[""])


@dataclass
class ExpectedFlops:
    """Expected FLOPs per input of a compact model with dynamic gates.

    Attributes:
        total: expected FLOPs per input.
        static: fvcore FLOPs of one pass with every channel computed.
        by_module: expected FLOPs of each module whose cost depends on gates.
        independence_assumed: no raw paths were available, so ``E[a_in·a_out]`` was taken as
            ``E[a_in]·E[a_out]`` for layers with both gated inputs and gated outputs.
    """

    total: float
    static: int
    by_module: dict[str, float] = field(default_factory=dict)
    independence_assumed: bool = False


def _active_counts(stats, name: str) -> tuple[np.ndarray | None, float]:
    """Per-input active-channel counts of a layer (raw paths), and their mean."""
    sl = stats.layer_slice(name)
    mean = float(stats.counts[sl].sum() / max(stats.n, 1))
    if stats.paths is None:
        return None, mean
    return stats.paths[:, sl].sum(axis=1).astype(np.float64), mean


def expected_flops(compact, stats, *, by_module: dict[str, int] | None = None, plan=None) -> ExpectedFlops:
    """Expected FLOPs per input of a compact model, from path statistics.

    Args:
        compact: a :class:`~nd_plugin.pruning.CompactModel`.
        stats: path statistics of the decoupled model it was pruned from (or already restricted
            with ``compact.compact_stats``).
        by_module: fvcore counts of ``compact`` (computed when omitted).
        plan: its :class:`~nd_plugin.pruning.plan.DynamicPlan`, or that of the decoupled model it
            was pruned from (traced when omitted).

    Returns:
        The :class:`ExpectedFlops`.

    Example:
        >>> e = expected_flops(compact, stats)
        >>> e.total < e.static  # dynamic gating saves on top of removing silent filters
        True
    """
    from nd_plugin.pruning.plan import analyse

    dynamic = [s.name for s in compact.gate_sites]
    if list(stats.site_names) != dynamic:
        stats = compact.compact_stats(stats)
    counts = by_module if by_module is not None else flops_by_module(compact, compact.input_size)
    counts = {k.removeprefix("model."): v for k, v in counts.items()}  # names relative to compact.model
    plan = plan.restricted(dynamic) if plan is not None else analyse(compact.model, dynamic, compact.input_size)
    channels = {s.name: s.channels for s in compact.gate_sites}
    # module -> (source layer of its inputs, layer of its outputs)
    scaled: dict[str, list[str | None]] = {}
    for name in dynamic:
        for suffix in ("conv", "norm"):
            scaled.setdefault(f"{name}.{suffix}", [None, None])[1] = name
        site_plan = plan.sites[name]
        if site_plan.narrow:
            for consumer in site_plan.consumers:
                scaled.setdefault(consumer.name, [None, None])[0] = name
                if consumer.name.endswith(".conv") and consumer.name[: -len(".conv")] in channels:
                    scaled.setdefault(f"{consumer.name[: -len('.conv')]}.acm.fc1", [None, None])[0] = name
    independence = False
    expected: dict[str, float] = {}
    for module, (src, dst) in scaled.items():
        static = counts.get(module, 0)
        if not static:
            continue
        fin = fout = None
        mean_in = mean_out = 1.0
        if src is not None:
            fin, mean_in = _active_counts(stats, src)
            fin = None if fin is None else fin / channels[src]
            mean_in /= channels[src]
        if dst is not None:
            fout, mean_out = _active_counts(stats, dst)
            fout = None if fout is None else fout / channels[dst]
            mean_out /= channels[dst]
        if src is not None and dst is not None:
            if fin is not None and fout is not None:
                frac = float(np.mean(fin * fout))
            else:
                frac = mean_in * mean_out
                independence = True
        else:
            frac = mean_in * mean_out
        expected[module] = static * frac
    total = counts[""] - sum(counts.get(m, 0) for m in expected) + sum(expected.values())
    return ExpectedFlops(total=float(total), static=int(counts[""]), by_module=expected, independence_assumed=independence)


def flops_summary(dm, compact, stats) -> dict[str, float | int | bool]:
    """Static FLOPs of the original, decoupled and compact models and the compact model's expected FLOPs.

    Args:
        dm: the decoupled model (``original`` is counted with its gates open, i.e. without ACMs).
        compact: the compact model pruned from it.
        stats: the path statistics.

    Returns:
        ``{"original", "decoupled", "compact_static", "compact_expected", "independence_assumed",
        "static_reduction", "expected_reduction"}`` (reductions: original / compact).
    """
    with dm.gates_open():
        original = count_flops(dm, dm.input_size)
    decoupled = count_flops(dm, dm.input_size)
    exp = expected_flops(compact, stats)
    return {
        "original": original,
        "decoupled": decoupled,
        "compact_static": exp.static,
        "compact_expected": exp.total,
        "independence_assumed": exp.independence_assumed,
        "static_reduction": original / max(exp.static, 1),
        "expected_reduction": original / max(exp.total, 1e-9),
    }
