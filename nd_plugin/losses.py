"""The three decoupling losses (METHOD.md §2) and our class-routing term.

``L = CE + λ_m·L_mi + λ_k·L_kl + λ_s·L_s (+ λ_c·L_c, ours)``, each of the terms summed over the gated layers:

- ``L_mi``: a bias-free linear classifier per layer reads the gates; cross-entropy with the label
  (a variational bound on the mutual information between path and class; with soft targets, as
  timm's ``Mixup`` or label smoothing make them, the soft cross-entropy). As in the authors'
  release, ``λ_m`` scales the whole term, the classifiers' gradient included (``mi_scope="all"``);
  ``mi_scope="gates"`` fits the classifiers at full strength on detached gates and lets ``λ_m``
  scale only what reaches the gates.
- ``L_kl``: ``KL(softmax(GAP(O)) ‖ softmax(α))``, aligning each gate with what its layer outputs;
  per layer the pointwise divergence summed and divided by ``N·C_l`` (the authors' release uses
  ``F.kl_div``'s ``"mean"`` reduction), so a layer's weight does not grow with its width.
- ``L_s``: ``| mean over the batch of ‖α‖₁ − R·C |``, pulling the number of open gates of a
  layer towards the target fraction ``R`` of its ``C`` filters. Given the ACM logits, it counts the
  eval-time gates ``1[z > 0]`` (the trainer does this).
- ``L_c`` (ours, not the paper's; ``λ_c`` = 0 turns it off): minus each layer's mean, over its
  filters, of the mutual information between a filter's gate and the class, estimated on the batch
  (``I_f = h(p_f) − Σ_c π_c h(p_fc)``, ``h`` the binary entropy, ``p_fc`` the filter's mean gate
  over the class's inputs). A filter earns it only by being on for some classes and off for
  others; one that is on (or off) for every input neither earns nor pays.

:class:`DecouplingLoss` is the whole loss (``loss_fn(logits, targets, path, ...)``) or, through
:meth:`DecouplingLoss.regularizer`, only ``λ_m·L_mi + λ_k·L_kl + λ_s·L_s + λ_c·L_c`` to add to any criterion
(timm's ``SoftTargetCrossEntropy``, a detection loss, ...). Targets are class indices ``(N,)`` or
class probabilities ``(N, K)`` in both.

:func:`distillation_loss` is Hinton et al.'s knowledge-distillation term, which the Trainer adds
(weight ``distill_weight``) to any run, decoupled or plain, that learns from a dense teacher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nd_plugin.errors import ConfigError, InputShapeError
from nd_plugin.gates import binarize

__all__ = ["MI_INITS", "MI_SCOPES", "SPARSITY_SCOPES", "DecouplingLoss", "LossTerms", "distillation_loss"]

#: Initialisation of the ``L_mi`` classifiers: ``kaiming`` (Kaiming-normal, the authors' release) or
#: ``torch`` (``nn.Linear``'s default, about 2.45x smaller weights).
MI_INITS = ("kaiming", "torch")
#: What ``λ_m`` scales: ``all`` (the classifiers' gradient too, as in the release) or ``gates``
#: (only what reaches the gates; the classifiers are fitted at full strength).
MI_SCOPES = ("all", "gates")
#: What ``L_s`` pulls towards ``R`` (ours, not the paper's, except ``layer``):
#:
#: - ``layer``: each layer's number of open gates, averaged over the batch (the paper);
#: - ``input``: each input's number of open gates in each layer (a per-input budget, as FBS's
#:   per-input top-k): ``mean_i |‖α_i‖₁ − R·C|``;
#: - ``filter``: each filter's on-rate over the batch (load balancing, as in mixture-of-experts
#:   routing): ``Σ_f |mean_i α_if − R|``; a filter that is always on or always off pays, so the
#:   network must route.
#:
#: Any scope can add a cap on each filter's on-rate (``sparsity_cap`` < 1, ours):
#: ``Σ_f max(0, mean_i α_if − cap)``. Below the cap a filter is free (it may be silent), above it
#: it pays, so no filter can be on for every input: the layer keeps its budget only by routing.
SPARSITY_SCOPES = ("layer", "input", "filter")


@dataclass
class LossTerms:
    """The total loss and its terms (unweighted ``mi``, ``kl``, ``s``, ``c``, ``d``), for logging.

    ``d`` is the distillation term (:func:`distillation_loss`) where the Trainer added one, else None.
    """

    total: torch.Tensor
    ce: torch.Tensor
    mi: torch.Tensor
    kl: torch.Tensor
    s: torch.Tensor
    c: torch.Tensor
    d: torch.Tensor | None = None

    def as_floats(self) -> dict[str, float]:
        """The terms as Python floats (one device sync); ``l_d`` only where there is a distillation term."""
        names = ("loss", "ce", "l_mi", "l_kl", "l_s", "l_c") + (("l_d",) if self.d is not None else ())
        terms = [self.total, self.ce, self.mi, self.kl, self.s, self.c] + ([self.d] if self.d is not None else [])
        return dict(zip(names, torch.stack(terms).detach().float().cpu().tolist()))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Knowledge distillation (Hinton et al., 2015): ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch mean.

    The ``T²`` keeps the gradient's scale independent of the temperature, so one weight serves any
    ``T``. The teacher's logits carry no gradient.

    Args:
        student: the trained network's logits, ``(N, K)``.
        teacher: the teacher's logits for the same inputs, ``(N, K)``.
        temperature: ``T > 0``; higher spreads the teacher's probabilities over more classes.

    Returns:
        A scalar, 0 where the two agree.

    Raises:
        ConfigError: ``temperature`` is not > 0.
        InputShapeError: the logits' shapes differ.

    Example:
        >>> s = torch.tensor([[2.0, 0.0]])
        >>> float(distillation_loss(s, s))
        0.0
        >>> t = torch.tensor([[0.0, 0.0]])  # T = 2: 4 · Σ_i ½ ln(½ / q_i), q = (σ(1), σ(−1))
        >>> round(float(distillation_loss(s, t, temperature=2.0)), 4)
        0.4805
    """
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}.", params=("temperature",))
    if student.shape != teacher.shape:
        raise InputShapeError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ in shape.")
    log_s = F.log_softmax(student.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher.detach().float() / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def _check(name: str, value: float, low: float, high: float | None, closed_high: bool = True) -> None:
    ok = value >= low and (high is None or (value <= high if closed_high else value < high))
    if not ok:
        bound = "" if high is None else (f", {high}]" if closed_high else f", {high})")
        raise ConfigError(f"{name} must be in [{low}{bound or ', inf)'}, got {value}.", params=(name,))


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """``h(p) = −p ln p − (1 − p) ln(1 − p)`` in nats, ``p`` clamped to ``[1e-6, 1 − 1e-6]``.

    The clamp keeps the gradient finite where a batch's hard gates give an on-rate of exactly 0 or 1
    (``h′(p) = ln((1 − p) / p)``); there the term neither earns nor pays.
    """
    p = p.clamp(1e-6, 1.0 - 1e-6)
    return torch.special.entr(p) + torch.special.entr(1.0 - p)


def _layers(values: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None) -> list[torch.Tensor] | None:
    """Per-layer tensors as a list (a ``{layer: tensor}`` mapping gives its values in order)."""
    if values is None:
        return None
    return list(values.values()) if isinstance(values, Mapping) else list(values)


class DecouplingLoss(nn.Module):
    """Cross-entropy plus the three decoupling losses, or the three alone as a regulariser.

    The module owns the per-layer ``L_mi`` classifiers, so pass its parameters to the optimiser
    (:func:`nd_plugin.param_groups` puts them in the gates' group). Calling it returns the whole
    loss, ``CE + λ_m·L_mi + λ_k·L_kl + λ_s·L_s + λ_c·L_c`` (``λ_c`` 0 by default); :meth:`regularizer` returns the decoupling
    terms alone, to add to another criterion. Targets are class indices ``(N,)`` or probabilities
    ``(N, K)`` (timm's ``Mixup``, label smoothing); ``L_mi`` then is each layer's soft
    cross-entropy.

    Args:
        lambda_m: weight of ``L_mi``.
        lambda_k: weight of ``L_kl``.
        lambda_s: weight of ``L_s``.
        ratio: ``R``, the target fraction of a layer's filters that are on for an average input
            (0 means plain L1 pressure towards closing gates), in ``[0, 1)``.
        channels: filters per gated layer, in path order.
        num_classes: number of classes (for the ``L_mi`` classifiers).
        mi_init: initialisation of the ``L_mi`` classifiers, one of :data:`MI_INITS`.
        mi_scope: what ``lambda_m`` scales, one of :data:`MI_SCOPES`.
        sparsity_scope: what ``L_s`` pulls towards ``ratio``, one of :data:`SPARSITY_SCOPES`.
        sparsity_cap: the highest on-rate a filter may have for free, in ``[ratio, 1]``; each
            filter's on-rate over the batch above it adds to ``L_s`` (1, the default, adds nothing).
        lambda_c: weight of ``L_c``, the class-routing term (ours; 0, the default, turns it off):
            minus each layer's mean gate–class mutual information per filter, ``>= 0``.

    Example:
        >>> loss_fn = DecouplingLoss(0.01, 1.0, 0.01, 0.6, channels=[4, 8], num_classes=3)
        >>> logits, y = torch.randn(2, 3), torch.tensor([0, 2])
        >>> gates = [torch.ones(2, 4), torch.zeros(2, 8)]
        >>> terms = loss_fn(logits, y, gates, [torch.randn(2, 4), torch.randn(2, 8)])
        >>> round(terms.s.item(), 2)  # |4 - 2.4| + |0 - 4.8|
        6.4
        >>> soft = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.5, 0.5]])  # e.g. from timm's Mixup
        >>> loss_fn(logits, soft, gates, [torch.randn(2, 4), torch.randn(2, 8)]).total.shape
        torch.Size([])
    """

    def __init__(
        self,
        lambda_m: float = 0.01,
        lambda_k: float = 1.0,
        lambda_s: float = 0.01,
        ratio: float = 0.6,
        *,
        channels: Sequence[int],
        num_classes: int,
        mi_init: str = "kaiming",
        mi_scope: str = "all",
        sparsity_scope: str = "layer",
        sparsity_cap: float = 1.0,
        lambda_c: float = 0.0,
    ) -> None:
        super().__init__()
        if sparsity_scope not in SPARSITY_SCOPES:
            raise ConfigError(
                f"sparsity_scope must be one of {', '.join(SPARSITY_SCOPES)} (what L_s pulls), got {sparsity_scope!r}.",
                params=("sparsity_scope",),
            )
        self.sparsity_scope = sparsity_scope
        _check("ratio", ratio, 0.0, 1.0, closed_high=False)
        if mi_init not in MI_INITS:
            raise ConfigError(
                f"mi_init must be one of {', '.join(MI_INITS)} (the L_mi classifiers' init), got {mi_init!r}.",
                params=("mi_init",),
            )
        if mi_scope not in MI_SCOPES:
            raise ConfigError(
                f"mi_scope must be one of {', '.join(MI_SCOPES)} (what lambda_m scales), got {mi_scope!r}.", params=("mi_scope",)
            )
        self.mi_init, self.mi_scope = mi_init, mi_scope
        for name, value in (("lambda_m", lambda_m), ("lambda_k", lambda_k), ("lambda_s", lambda_s), ("lambda_c", lambda_c)):
            _check(name, value, 0.0, None)
        self.lambda_m, self.lambda_k, self.lambda_s, self.ratio = lambda_m, lambda_k, lambda_s, ratio
        self.lambda_c = lambda_c
        # L_c's weight, a tensor updated in place like _ratio (a schedule turns it off; graphs and
        # compile see it); the term is computed, and logged, whenever it has had a weight > 0
        self.register_buffer("_lambda_c", torch.tensor(float(lambda_c)), persistent=False)
        self._routes = lambda_c > 0
        _check("sparsity_cap", sparsity_cap, 0.0, 1.0)
        if sparsity_cap < ratio:
            raise ConfigError(
                f"sparsity_cap must be in [ratio, 1] (no layer can reach R with every filter below the cap), "
                f"got sparsity_cap {sparsity_cap} < ratio {ratio}.",
                params=("sparsity_cap", "ratio"),
            )
        self.sparsity_cap = sparsity_cap
        self.channels = list(channels)
        self.num_classes = num_classes
        self.classifiers = nn.ModuleList(nn.Linear(c, num_classes, bias=False) for c in self.channels)
        if mi_init == "kaiming":
            for q in self.classifiers:
                nn.init.kaiming_normal_(q.weight)
        # The layers are concatenated into one (N, sum C) path so that every term is a few kernels
        # whatever the depth (per-layer loops cost ~20 small kernels per layer on a GPU).
        # layer_of[j]: the layer of path column j; pad_index[j]: its slot in an (L, max C) layout.
        layers, width = len(self.channels), max(self.channels, default=0)
        layer_of = torch.repeat_interleave(torch.arange(layers), torch.tensor(self.channels, dtype=torch.long))
        within = torch.cat([torch.arange(c) for c in self.channels]) if layers else torch.zeros(0, dtype=torch.long)
        one_hot = F.one_hot(layer_of, layers).float() if layers else torch.zeros(0, 0)
        self.register_buffer("_one_hot", one_hot, persistent=False)
        self.register_buffer("_pad_index", layer_of * width + within, persistent=False)
        self.register_buffer("_widths", torch.tensor(self.channels, dtype=torch.float), persistent=False)
        # L_s's target, a tensor updated in place (a density schedule moves it; graphs and compile see it)
        self.register_buffer("_ratio", torch.tensor(float(ratio)), persistent=False)
        # the cap in force: never below the current target (a density schedule starts R at 1)
        self.register_buffer("_cap", torch.tensor(float(sparsity_cap)), persistent=False)
        widths = torch.tensor(self.channels, dtype=torch.float)[layer_of] if layers else torch.zeros(0)
        self.register_buffer("_inv_width", 1.0 / widths, persistent=False)
        self._width = width

    def set_ratio(self, ratio: float) -> None:
        """Moves ``L_s``'s target to ``ratio`` in place (a density schedule calls this every step).

        The target buffer is updated in place, so a captured CUDA graph or a compiled step sees the
        new value.

        Example:
            >>> loss_fn = DecouplingLoss(0.0, 0.0, 1.0, 0.5, channels=[4], num_classes=2)
            >>> loss_fn.set_ratio(0.75)
            >>> loss_fn(torch.zeros(1, 2), torch.tensor([0]), [torch.ones(1, 4)]).s.item()  # |4 - 3|
            1.0
        """
        _check("ratio", ratio, 0.0, 1.0)
        self.ratio = ratio
        self._ratio.fill_(ratio)
        self._cap.fill_(max(self.sparsity_cap, ratio))  # a target above the cap lifts it while it lasts

    def set_lambda_c(self, lambda_c: float) -> None:
        """Sets ``L_c``'s weight in place (a schedule calls this; 0 turns the term off).

        As with :meth:`set_ratio`, the weight is a buffer updated in place, so a captured CUDA graph
        or a compiled step sees it. Once the term has had a weight above 0 it is still computed,
        weighted 0, and logged (``LossTerms.c``) after it is turned off: the gate–class information
        of the routes stays visible.

        Example:
            >>> loss_fn = DecouplingLoss(0.0, 0.0, 0.0, 0.5, channels=[2], num_classes=2, lambda_c=1.0)
            >>> gates, y = [torch.tensor([[1.0, 1.0], [0.0, 1.0]])], torch.tensor([0, 1])
            >>> terms = loss_fn(torch.zeros(2, 2), y, gates)
            >>> round((terms.total - terms.ce).item(), 4), round(terms.c.item(), 4)
            (-0.3466, -0.3466)
            >>> loss_fn.set_lambda_c(0.0)
            >>> terms = loss_fn(torch.zeros(2, 2), y, gates)
            >>> round((terms.total - terms.ce).item(), 4), round(terms.c.item(), 4)  # weighted 0, still logged
            (0.0, -0.3466)
        """
        _check("lambda_c", lambda_c, 0.0, None)
        self.lambda_c = lambda_c
        self._lambda_c.fill_(lambda_c)
        self._routes = self._routes or lambda_c > 0

    def _segment_log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        """``log_softmax`` within each layer's columns of an ``(N, sum C)`` path."""
        padded = x.new_full((x.shape[0], len(self.channels) * self._width), float("-inf"))
        padded = padded.index_copy(1, self._pad_index, x).view(x.shape[0], len(self.channels), self._width)
        return F.log_softmax(padded, dim=2).flatten(1).index_select(1, self._pad_index)

    def _block_diagonal(self) -> torch.Tensor:
        """The layers' classifiers as one ``(sum C, L * K)`` block-diagonal matrix."""
        weight = torch.cat([q.weight for q in self.classifiers], 1)  # (K, sum C)
        return (self._one_hot.unsqueeze(2) * weight.t().unsqueeze(1)).flatten(1)

    def check_targets(self, targets: torch.Tensor, n: int) -> torch.Tensor:
        """Validates targets for a batch of ``n``: class indices ``(n,)`` or probabilities ``(n, K)``.

        Args:
            targets: integer class indices of shape ``(n,)``, or floating class probabilities of
                shape ``(n, K)`` with ``K = num_classes`` (timm's ``Mixup`` and label smoothing).
            n: the batch size.

        Returns:
            ``targets`` unchanged.

        Raises:
            InputShapeError: any other shape or dtype; the message names the shapes expected.

        Example:
            >>> loss_fn = DecouplingLoss(channels=[4], num_classes=3)
            >>> loss_fn.check_targets(torch.zeros(2, 5), n=2)
            Traceback (most recent call last):
            ...
            nd_plugin.errors.InputShapeError: targets of shape (2, 5) (torch.float32) do not fit a batch of 2 inputs and 3 classes: pass class indices of shape (2,) (an integer tensor) or class probabilities of shape (2, 3) (a floating tensor).
        """
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else None
        ok = shape is not None and (
            (shape == (n,) and not targets.is_floating_point() and not targets.is_complex())
            or (shape == (n, self.num_classes) and targets.is_floating_point())
        )
        if not ok:
            what = f"of shape {shape} ({targets.dtype})" if shape is not None else f"of type {type(targets).__name__}"
            raise InputShapeError(
                f"targets {what} do not fit a batch of {n} inputs and {self.num_classes} classes: pass class "
                f"indices of shape ({n},) (an integer tensor) or class probabilities of shape ({n}, "
                f"{self.num_classes}) (a floating tensor)."
            )
        return targets

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        gates: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        pre_gate: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
        gate_logits: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
    ) -> LossTerms:
        """Computes the whole loss, ``CE + λ_m·L_mi + λ_k·L_kl + λ_s·L_s + λ_c·L_c``.

        Args:
            logits: ``(N, K)`` network outputs.
            targets: ``(N,)`` class indices or ``(N, K)`` class probabilities.
            gates: per layer ``(N, C)`` gate values (as returned with ``return_path=True``); empty
                gives cross-entropy alone.
            pre_gate: per layer ``(N, C)`` GAP of the layer output before the gate
                (``return_pre_gate=True``); needed when ``lambda_k > 0``.
            gate_logits: per layer ``(N, C)`` ACM logits ``z`` (``return_gate_logits=True``). When
                given, ``L_s`` counts the eval-time gates ``1[z > 0]`` (straight-through via
                ``σ(z)``) instead of the noisy, partly soft training gates, so that ``R`` is the
                density the trained model shows in eval.

        Returns:
            The :class:`LossTerms`.

        Raises:
            InputShapeError: targets of another shape (see :meth:`check_targets`).
        """
        ce = F.cross_entropy(logits, self.check_targets(targets, logits.shape[0]))
        reg = self._regularizer(targets, gates, pre_gate, gate_logits, zero=logits.new_zeros((), dtype=torch.float))
        return LossTerms(total=ce + reg.total, ce=ce, mi=reg.mi, kl=reg.kl, s=reg.s, c=reg.c)

    def regularizer(
        self,
        targets: torch.Tensor,
        gates: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        pre_gate: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
        gate_logits: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
    ) -> LossTerms:
        """The decoupling terms alone, ``λ_m·L_mi + λ_k·L_kl + λ_s·L_s + λ_c·L_c``, to add to any criterion.

        Arguments as in :meth:`forward`, without the logits. ``terms.total`` is the weighted sum
        and ``terms.ce`` is zero: add ``terms.total`` to your own classification loss.

        Example:
            >>> from timm.loss import SoftTargetCrossEntropy
            >>> loss_fn = DecouplingLoss(1.0, 0.0, 0.1, 0.5, channels=[4], num_classes=3)
            >>> logits, soft = torch.randn(2, 3), torch.tensor([[0.8, 0.2, 0.0], [0.0, 0.0, 1.0]])
            >>> reg = loss_fn.regularizer(soft, [torch.ones(2, 4)])
            >>> loss = SoftTargetCrossEntropy()(logits, soft) + reg.total
            >>> torch.allclose(reg.total, 1.0 * reg.mi + 0.1 * reg.s), reg.s.item(), reg.ce.item()
            (True, 2.0, 0.0)
        """
        gates = _layers(gates)
        n = gates[0].shape[0] if gates else targets.shape[0]
        self.check_targets(targets, n)
        return self._regularizer(targets, gates, pre_gate, gate_logits, zero=targets.new_zeros((), dtype=torch.float))

    def _regularizer(
        self,
        targets: torch.Tensor,
        gates: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        pre_gate: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None,
        gate_logits: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None,
        *,
        zero: torch.Tensor,
    ) -> LossTerms:
        """``λ_m·L_mi + λ_k·L_kl + λ_s·L_s + λ_c·L_c`` on checked targets, every layer in one batch."""
        gates, pre_gate, gate_logits = _layers(gates), _layers(pre_gate), _layers(gate_logits)
        mi, kl, s, c = zero, zero, zero, zero
        total = zero
        if not gates:
            return LossTerms(total=total, ce=zero, mi=mi, kl=kl, s=s, c=c)
        if len(gates) != len(self.channels):
            raise ValueError(f"expected gates of {len(self.channels)} layers, got {len(gates)}")
        alpha = torch.cat(gates, 1).float()
        n, layers = alpha.shape[0], len(self.channels)
        if self.lambda_m > 0:
            block = self._block_diagonal()
            # row (i, l) holds layer l's logits for input i; soft targets repeat row-wise
            per_row = targets.repeat_interleave(layers, dim=0)
            if per_row.is_floating_point():
                per_row = per_row.float()
            # the sum over layers of each layer's mean (soft) cross-entropy
            mi = F.cross_entropy((alpha @ block).view(n * layers, -1), per_row) * layers
            total = total + self.lambda_m * mi
            if self.mi_scope == "gates":
                # q, the bound's variational distribution, is fitted at full strength on detached
                # gates; lambda_m then scales only what reaches the gates
                fit_q = F.cross_entropy((alpha.detach() @ block).view(n * layers, -1), per_row) * layers
                total = total + (1.0 - self.lambda_m) * (fit_q - fit_q.detach())
        if self.lambda_k > 0:
            if pre_gate is None or any(p is None for p in pre_gate):
                raise ValueError("lambda_k > 0 needs the pre-gate outputs (return_pre_gate=True)")
            target_log = self._segment_log_softmax(torch.cat(pre_gate, 1).float())
            pointwise = F.kl_div(self._segment_log_softmax(alpha), target_log, reduction="none", log_target=True)
            # the release's F.kl_div default ("mean"): each layer's sum divided by N * C_l, written out
            kl = (pointwise.sum(0) * self._inv_width).sum() / n
            total = total + self.lambda_k * kl
        if self.lambda_s > 0:
            counted = alpha if gate_logits is None else binarize(torch.cat(gate_logits, 1).float(), training=False)
            target_on = self._widths * self._ratio  # open gates wanted per layer, R * C_l
            if self.sparsity_scope == "layer":
                s = (counted.mean(0) @ self._one_hot - target_on).abs().sum()
            elif self.sparsity_scope == "input":
                s = (counted @ self._one_hot - target_on).abs().mean(0).sum()
            else:  # filter
                s = (counted.mean(0) - self._ratio).abs().sum()
            if self.sparsity_cap < 1.0:  # no filter on for (nearly) every input
                s = s + F.relu(counted.mean(0) - self._cap).sum()
            total = total + self.lambda_s * s
        if self._routes:
            c = -self.class_information(alpha, targets).sum()
            total = total + self._lambda_c * c
        return LossTerms(total=total, ce=zero, mi=mi, kl=kl, s=s, c=c)

    def class_information(self, path: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each layer's mean, over its filters, of the gate–class mutual information on a batch.

        For filter ``f`` with mean gate ``p_f`` over the batch and ``p_fc`` over the inputs of class
        ``c`` (a share ``π_c`` of the batch), ``I_f = h(p_f) − Σ_c π_c h(p_fc)`` in nats, ``h`` the
        binary entropy: 0 for a filter whose on-rate is the same for every class (an energetic,
        silent or class-blind one), up to ``ln 2`` for one on for exactly the classes of half the
        batch. ``L_c`` is minus the sum of these layer means. Soft targets weigh each input's
        classes by their probabilities.

        Args:
            path: ``(N, sum C)`` gates of every layer, concatenated in path order.
            targets: ``(N,)`` class indices or ``(N, K)`` class probabilities.

        Returns:
            ``(L,)``, one value per gated layer, each in ``[0, ln 2]``.

        Example:
            >>> loss_fn = DecouplingLoss(channels=[2], num_classes=2)
            >>> # filter 0 on for class 0 only (ln 2), filter 1 on for both (0): the mean is ln(2)/2
            >>> path = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
            >>> round(loss_fn.class_information(path, torch.tensor([0, 1])).item(), 4)
            0.3466
        """
        weights = targets.float() if targets.is_floating_point() else F.one_hot(targets, self.num_classes).float()
        counts = weights.sum(0)  # (K,)
        per_class = (weights.t() @ path) / counts.clamp_min(1e-12).unsqueeze(1)  # (K, sum C)
        share = counts / counts.sum()
        information = _binary_entropy(path.mean(0)) - share @ _binary_entropy(per_class)
        return (information @ self._one_hot) / self._widths
