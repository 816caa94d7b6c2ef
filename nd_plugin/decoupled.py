"""``wrap()`` and :class:`DecoupledModel`: a CNN with one gate in front of each gated conv."""

from __future__ import annotations

import collections
import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from nd_plugin.errors import ConfigError, InputShapeError, NothingToGateError
from nd_plugin.gates import ACM_INITS, GatedSite
from nd_plugin.paths import GateRecorder, PathStats
from nd_plugin.tracing import SiteInfo, build_graph, find_sites
from nd_plugin.training.config import TrainConfig
from nd_plugin.utilities import eval_mode

__all__ = ["DecoupledModel", "ForwardOutput", "wrap"]

SiteSelector = str | Sequence[str] | Callable[[SiteInfo], bool]


class ForwardOutput:
    """What :class:`DecoupledModel` returns when a ``return_*`` flag is set: a NamedTuple.

    It holds ``logits``, ``path`` and, when asked for, ``pre_gate`` and ``gate_logits``, in that
    order: the positions of the plain tuple of earlier versions, so ``logits, path = dm(x,
    return_path=True)``, ``out[0]`` and ``out[-1]`` work as before. A field that was not asked for
    is not in the tuple and reads as None. ``isinstance(out, ForwardOutput)`` holds for every
    combination of flags; ``out._fields`` names the fields present.

    Example:
        >>> out = _OUTPUT_TYPES[(False, True)](torch.zeros(1, 2), {}, {})
        >>> out.logits.shape, out.pre_gate, out._fields, len(out)
        (torch.Size([1, 2]), None, ('logits', 'path', 'gate_logits'), 3)
    """

    __slots__ = ()
    logits: torch.Tensor
    path: dict[str, torch.Tensor]
    pre_gate: dict[str, torch.Tensor] | None = None
    gate_logits: dict[str, torch.Tensor] | None = None

    def __reduce__(self) -> tuple:  # the concrete types are not module attributes: pickle by fields
        return _make_output, (self._fields, tuple(self))  # type: ignore[attr-defined]


def _output_type(fields: tuple[str, ...]) -> type:
    base = collections.namedtuple("ForwardOutput", fields)  # type: ignore[misc]
    return type("ForwardOutput", (base, ForwardOutput), {"__slots__": (), "__module__": __name__})


# (pre_gate asked, gate_logits asked) -> the NamedTuple type holding the fields asked for
_OUTPUT_TYPES: dict[tuple[bool, bool], type] = {
    (pre, z): _output_type(("logits", "path") + (("pre_gate",) if pre else ()) + (("gate_logits",) if z else ()))
    for pre in (False, True)
    for z in (False, True)
}


def _make_output(fields: tuple[str, ...], values: tuple) -> ForwardOutput:
    return _OUTPUT_TYPES[("pre_gate" in fields, "gate_logits" in fields)](*values)


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _example_inputs(model: nn.Module, example_inputs: torch.Tensor | None) -> torch.Tensor:
    first = _first_conv(model)
    if first is None:
        raise NothingToGateError(f"{type(model).__name__} has no nn.Conv2d layer: network decoupling gates convolutions.")
    if example_inputs is None:
        from nd_plugin.adapters.registry import default_input_size

        c, h, w = default_input_size(model)
        device = next(model.parameters()).device
        return torch.randn(1, c, h, w, device=device)
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.ndim != 4:
        shape = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else type(example_inputs)
        raise InputShapeError(f"example_inputs must be one (N, C, H, W) tensor, got {shape}.")
    if example_inputs.shape[1] != first.in_channels:
        raise InputShapeError(
            f"example_inputs have {example_inputs.shape[1]} channels but the model's first conv "
            f"expects {first.in_channels}; pass a tensor of shape (1, {first.in_channels}, H, W)."
        )
    return example_inputs


def _select(candidates: list[SiteInfo], sites: SiteSelector) -> list[SiteInfo]:
    if isinstance(sites, str) and sites in ("internal", "all"):
        return [s for s in candidates if s.internal or sites == "all"]
    if isinstance(sites, str):
        raise ValueError(f"sites must be 'internal', 'all', a list of layer names or a callable, got {sites!r}")
    if callable(sites):
        return [s for s in candidates if sites(s)]
    by_name = {s.name: s for s in candidates}
    unknown = [n for n in sites if n not in by_name]
    if unknown:
        raise NothingToGateError(
            f"layer {unknown[0]!r} is not a gate site of this model; candidates are "
            f"{', '.join(list(by_name)[:8])}{', ...' if len(by_name) > 8 else ''}."
        )
    wanted = set(sites)
    return [s for s in candidates if s.name in wanted]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class DecoupledModel(nn.Module):
    """A model whose gated convs decide, per input, which filters run.

    Build one with :func:`wrap`. Calling it returns logits, or a :class:`ForwardOutput`
    ``(logits, path)`` with ``return_path=True``, where ``path`` maps each gated layer to its
    ``(N, C)`` gate vector.

    Attributes:
        model: the wrapped network (its gated convs replaced by :class:`~nd_plugin.gates.GatedSite`).
        gate_sites: one :class:`SiteInfo` per gate (layer name, channels, coupled group), in path order.
        input_size: ``(C, H, W)`` of the inputs the model was traced with.
    """

    def __init__(self, model: nn.Module, gate_sites: Sequence[SiteInfo], input_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.model = model
        self.gate_sites: tuple[SiteInfo, ...] = tuple(gate_sites)
        self.input_size = tuple(input_size)

    def sites(self) -> list[GatedSite]:
        """The gated-site modules, in path order."""
        return [self.model.get_submodule(s.name) for s in self.gate_sites]

    @property
    def site_names(self) -> list[str]:
        """Names of the gated layers, in path order."""
        return [s.name for s in self.gate_sites]

    @property
    def num_filters(self) -> int:
        """Total number of gated filters (the length of a path)."""
        return sum(s.channels for s in self.gate_sites)

    def forward(
        self,
        x: torch.Tensor,
        return_path: bool = False,
        return_pre_gate: bool = False,
        return_gate_logits: bool = False,
        pre_gate_activation: bool = False,
    ) -> torch.Tensor | ForwardOutput:
        """Runs the model.

        Args:
            x: a batch of inputs.
            return_path: also return ``{layer: gates (N, C)}``.
            return_pre_gate: also return ``{layer: GAP of the layer's output before its gate}``.
            return_gate_logits: also return ``{layer: ACM logits z (N, C)}``, where the eval-time
                gate is ``1[z > 0]`` (what the sparsity loss counts).
            pre_gate_activation: with ``return_pre_gate``, pool the output after the ReLU at the
                sites that feed one (the release's ``L_kl`` target), not before it.

        Returns:
            ``logits`` without flags; otherwise a :class:`ForwardOutput`, the NamedTuple
            ``(logits, path[, pre_gate][, gate_logits])`` (the fields asked for; the others read
            as None). ``return_pre_gate`` or ``return_gate_logits`` alone include ``path`` too.

        Example:
            >>> from nd_plugin.adapters import create_model
            >>> dm = wrap(create_model("cifar:resnet20", num_classes=10), torch.zeros(1, 3, 32, 32))
            >>> out = dm(torch.randn(2, 3, 32, 32), return_path=True, return_gate_logits=True)
            >>> logits, path, z = out
            >>> out.logits is logits, out.gate_logits is z, out.pre_gate, len(out.path)
            (True, True, None, 9)
        """
        if not (return_path or return_pre_gate or return_gate_logits):
            return self.model(x)
        with GateRecorder(self.sites(), pre_gate=return_pre_gate, after_activation=pre_gate_activation) as rec:
            logits = self.model(x)
        names = self.site_names
        out: tuple = (logits, dict(zip(names, rec.path(x.shape[0], x.device))))
        if return_pre_gate:
            out += (dict(zip(names, rec.pre_gate)),)
        if return_gate_logits:
            out += (dict(zip(names, rec.logits)),)
        return _OUTPUT_TYPES[(return_pre_gate, return_gate_logits)](*out)

    def unwrapped(self) -> nn.Module:
        """A copy of the network without gates: each gated site's conv and norm back in place.

        The copy has the original architecture and the weights trained here, so torch-pruning (or
        anything else that expects the plain model) can work on it; it computes what
        :meth:`gates_open` computes.

        Example:
            >>> from nd_plugin.adapters import create_model
            >>> dm = wrap(create_model("cifar:resnet20", num_classes=10), torch.zeros(1, 3, 32, 32))
            >>> plain = dm.unwrapped().eval()
            >>> x = torch.randn(2, 3, 32, 32)
            >>> with dm.eval().gates_open():
            ...     torch.allclose(plain(x), dm(x), atol=1e-5)
            True
        """
        plain = copy.deepcopy(self.model)
        for info in self.gate_sites:
            site = plain.get_submodule(info.name)
            _set_submodule(plain, info.name, site.conv)
            if info.norm:
                _set_submodule(plain, info.norm, site.norm)
        return plain

    @contextlib.contextmanager
    def gates_open(self) -> Iterator[DecoupledModel]:
        """Context in which every gate is 1: the model computes exactly what the original did."""
        sites = self.sites()
        previous = [s.force_open for s in sites]
        try:
            for s in sites:
                s.force_open = True
            yield self
        finally:
            for s, p in zip(sites, previous):
                s.force_open = p

    def dependency_graph(self, example_inputs: torch.Tensor | None = None):
        """torch-pruning's DependencyGraph of the wrapped model (gates and convs in one group)."""
        if example_inputs is None:
            device = next(self.parameters()).device
            example_inputs = torch.randn(1, *self.input_size, device=device)
        return build_graph(self.model, example_inputs)

    @torch.no_grad()
    def paths(
        self,
        loader: Iterable,
        *,
        device: torch.device | str | None = None,
        raw: bool = False,
        classes: list[str] | None = None,
        num_classes: int | None = None,
        progress: bool = False,
        max_batches: int | None = None,
    ) -> PathStats:
        """Accumulates calculation-path statistics over a data set, in eval mode.

        Args:
            loader: yields ``(inputs, labels)`` batches.
            device: where to run; defaults to the model's device.
            raw: also keep every input's binary path (``N × F`` bits).
            classes: class names to store with the statistics.
            num_classes: number of classes (defaults to ``len(classes)`` or the logits' width).
            progress: show a progress bar.
            max_batches: stop after this many batches.

        Returns:
            The :class:`~nd_plugin.paths.PathStats` of the pass.

        Example:
            >>> stats = dm.paths(val_loader)
            >>> stats.n, len(stats.site_names)
            (32, 9)
            >>> stats.save(tmp / "paths.npz")
        """
        from nd_plugin._progress import track

        device = torch.device(device) if device is not None else next(self.parameters()).device
        sites = self.sites()
        counts = class_counts = None
        class_n = None
        correct = torch.zeros((), dtype=torch.long, device=device)
        raw_paths, raw_labels, raw_preds = [], [], []
        n = 0
        with eval_mode(self), GateRecorder(sites) as rec:
            for b, (x, y) in enumerate(track(loader, "collecting paths", enabled=progress)):
                if max_batches is not None and b >= max_batches:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = self.model(x)
                per_site = rec.path(x.shape[0], device)
                path = torch.cat(per_site, dim=1) if per_site else logits.new_zeros(x.shape[0], 0)
                if counts is None:
                    k = num_classes or (len(classes) if classes else logits.shape[1])
                    counts = torch.zeros(path.shape[1], dtype=torch.long, device=device)
                    class_counts = torch.zeros(k, path.shape[1], dtype=torch.long, device=device)
                    class_n = torch.zeros(k, dtype=torch.long, device=device)
                on = path > 0.5
                counts += on.sum(0)
                class_counts.index_add_(0, y, on.long())
                class_n += torch.bincount(y, minlength=class_n.shape[0])
                pred = logits.argmax(1)
                correct += (pred == y).sum()
                n += x.shape[0]
                if raw:
                    raw_paths.append(on)
                    raw_labels.append(y)
                    raw_preds.append(pred)
        if counts is None:
            raise ValueError("the loader yielded no batches")

        def to_np(parts: list[torch.Tensor]) -> np.ndarray | None:
            return torch.cat(parts).cpu().numpy() if raw else None

        return PathStats(
            site_names=self.site_names,
            site_channels=[s.channels for s in self.gate_sites],
            n=n,
            counts=counts.cpu().numpy(),
            class_counts=class_counts.cpu().numpy(),
            class_n=class_n.cpu().numpy(),
            correct=int(correct),
            classes=classes,
            paths=to_np(raw_paths),
            labels=to_np(raw_labels),
            preds=to_np(raw_preds),
        )


def wrap(
    model: nn.Module,
    example_inputs: torch.Tensor | None = None,
    *,
    sites: SiteSelector = TrainConfig.sites,
    reduction: int = TrainConfig.reduction,
    noise_std: float = TrainConfig.noise_std,
    init_bias: float = TrainConfig.gate_bias,
    hard_share: float = TrainConfig.hard_share,
    acm_init: str = TrainConfig.acm_init,
) -> DecoupledModel:
    """Puts a decoupling gate in front of each gate site of ``model``.

    Every default is the Trainer's (:class:`~nd_plugin.training.config.TrainConfig`'s), so a model
    wrapped here and trained in a loop of one's own starts from the measured recipe.

    Gate sites are found by tracing with torch-pruning's DependencyGraph (see
    :mod:`nd_plugin.tracing`); the first conv is never gated. Each site's conv (and the
    batch norm right after it) is replaced in place by a :class:`~nd_plugin.gates.GatedSite`; the
    model is modified and owned by the returned :class:`DecoupledModel`.

    Args:
        model: any CNN torch-pruning can trace (timm, torchvision, the CIFAR zoo, your own).
        example_inputs: one batch for tracing. When omitted it is a random ``(1, C, H, W)``
            tensor whose size is inferred: timm's ``pretrained_cfg["input_size"]``, 32×32 for the
            CIFAR zoo, 224×224 otherwise (channels from the first conv).
        sites: ``"internal"`` (default: convs whose channels are not coupled through residual
            additions, so they can be both skipped and removed), ``"all"`` (every candidate, as
            the paper places gates), a list of layer names, or a callable taking a
            :class:`SiteInfo` and returning whether to gate it.
        reduction: ACM hidden-width reduction (4 in the paper).
        noise_std: gate noise in training (1 in the paper).
        init_bias: initial gate logit ``b2`` (see :class:`~nd_plugin.gates.ACM`); ``TrainConfig.gate_bias``.
        hard_share: share of samples whose gates are hard in training (see
            :func:`~nd_plugin.gates.binarize`).
        acm_init: ``"kaiming"`` (the authors' release, the Trainer's default) or ``"open"`` (every
            gate starts open, input-independent); see :class:`~nd_plugin.gates.ACM`.

    Returns:
        The :class:`DecoupledModel`, in the training mode ``model`` had.

    Raises:
        NothingToGateError: no conv, or no site matches ``sites``.
        UntraceableModelError: tracing failed (the message names the layer or op).
        InputShapeError: ``example_inputs`` do not fit the model.

    Example:
        >>> import torchvision, nd_plugin
        >>> dm = nd_plugin.wrap(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
        >>> logits, path = dm(torch.randn(2, 3, 64, 64), return_path=True)
        >>> len(path), logits.shape
        (8, torch.Size([2, 1000]))
    """
    if not 0.0 <= hard_share <= 1.0:
        raise ConfigError(f"hard_share must be in [0, 1], got {hard_share}.", params=("hard_share",))
    if acm_init not in ACM_INITS:
        raise ConfigError(f"acm_init must be one of {', '.join(ACM_INITS)}, got {acm_init!r}.", params=("acm_init",))
    example_inputs = _example_inputs(model, example_inputs)
    was_training = model.training
    with eval_mode(model):
        try:
            with torch.no_grad():
                model(example_inputs)
        except (RuntimeError, ValueError) as exc:  # what torch raises for shapes that do not fit
            # any other error is a bug in the model's forward and propagates as it is
            raise InputShapeError(f"the model cannot run on example_inputs of shape {tuple(example_inputs.shape)}: {exc}") from exc
        candidates = find_sites(model, example_inputs)
    chosen = _select(candidates, sites)
    if not chosen:
        raise NothingToGateError(
            f"{type(model).__name__} has no gate site for sites={sites!r} "
            f"({len(candidates)} candidate convs in all); try sites='all'."
        )
    for info in chosen:
        conv = model.get_submodule(info.name)
        norm = model.get_submodule(info.norm) if info.norm else None
        site = GatedSite(
            conv,
            norm,
            reduction=reduction,
            noise_std=noise_std,
            init_bias=init_bias,
            hard_share=hard_share,
            acm_init=acm_init,
            activation=info.activation,
        )
        site.to(device=conv.weight.device)
        _set_submodule(model, info.name, site)
        if info.norm:
            _set_submodule(model, info.norm, nn.Identity())
    dm = DecoupledModel(model, chosen, tuple(example_inputs.shape[1:]))
    dm.train(was_training)
    return dm
