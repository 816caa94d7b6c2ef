"""The architecture controlling module (ACM) and the gated site that wraps a conv layer.

A gated site replaces one convolution (and the normalisation that follows it, when the conv is its
only input) with a module that

1. reads the conv's *input* ``x`` and computes a gate logit ``z = W2 · ReLU(W1 · GAP(x) + b1) + b2``;
2. binarises it (hard ``1[z > 0]`` in eval, improved semantic hashing in training);
3. runs ``f(x) = norm(conv(x))`` and multiplies each output channel by its gate.

Because the gate is known before the conv runs, inactive filters can be skipped rather than only
zeroed; ``nd_plugin.prune`` builds that runtime.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nd_plugin.errors import ConfigError

__all__ = ["ACM", "ACM_INITS", "GateLinear", "GatedSite", "binarize"]

#: How an ACM starts: ``open`` (``W1 = 0``: every gate open and input-independent) or ``kaiming``
#: (the authors' release: Kaiming-normal ``W1`` and ``W2``, gates input-dependent from step 0).
ACM_INITS = ("open", "kaiming")


def binarize(z: torch.Tensor, *, training: bool, noise_std: float = 1.0, hard_share: float = 0.5) -> torch.Tensor:
    """Turns gate logits into (near-)binary gates.

    In training this is improved semantic hashing (Kaiser & Bengio, 2018): ``z̃ = z + ε``,
    ``s = clamp(1.2·σ(z̃) − 0.1, 0, 1)``, ``h = 1[z̃ > 0]``. Each *sample* of the batch uses the
    hard ``h`` with probability ``hard_share`` (½ in the paper; the authors' release draws its
    indices along the wrong axis, so only 5–20% of its entries are hard) and the soft ``s``
    otherwise; the backward pass always takes the
    gradient of ``s`` (straight-through). In eval the gate is ``1[z > 0]``; while autograd is on
    the straight-through term is kept (it is zero in value) so that graph tracing sees the gate
    depend on the ACM.

    Args:
        z: gate logits of shape ``(N, C)``.
        training: whether to add noise and mix hard/soft gates.
        noise_std: standard deviation of the Gaussian noise added in training.
        hard_share: probability that a sample's gates are hard in training, in ``[0, 1]``.

    Returns:
        Gates of shape ``(N, C)`` with values in ``[0, 1]`` (exactly 0 or 1 in eval).

    Example:
        >>> binarize(torch.tensor([[-1.0, 2.0]]), training=False)
        tensor([[0., 1.]])
        >>> binarize(torch.tensor([[-1.0, 2.0]]), training=True, noise_std=0.0, hard_share=1.0)
        tensor([[0., 1.]])
    """
    if training:
        if noise_std > 0:
            z = z + noise_std * torch.randn_like(z)
        soft = torch.clamp(1.2 * torch.sigmoid(z) - 0.1, 0.0, 1.0)
        hard = (z > 0).to(z.dtype)
        straight_through = soft - soft.detach() + hard  # exactly ``hard`` in value
        use_hard = torch.rand(z.shape[0], 1, device=z.device) < hard_share
        return torch.where(use_hard, straight_through, soft)
    hard = (z > 0).to(z.dtype)
    if torch.is_grad_enabled() and z.requires_grad:
        soft = torch.sigmoid(z)
        return soft - soft.detach() + hard
    return hard


class GateLinear(nn.Linear):
    """A fully connected layer of an :class:`ACM`: an ``nn.Linear`` that tools can tell apart by type.

    Example:
        >>> isinstance(ACM(16, 32).fc2, GateLinear), isinstance(nn.Linear(2, 2), GateLinear)
        (True, False)
    """


class ACM(nn.Module):
    """Architecture controlling module: two FC layers on the globally pooled input.

    ``W1: C_in → max(C_in // reduction, 1)``, ``W2: → C_out``. Initialised so that every gate
    starts open: ``W1 = 0``, ``b1 = 1``, ``W2`` with PyTorch's default init (so that ``W1``
    receives a gradient from the first step on; ``z`` starts near ``b2 ± 0.6``) and
    ``b2 = init_bias`` (1, as in the paper's release). ``init_bias = 3`` saturates the soft gate at 1,
    so a wrapped network starts exactly where it was even under training noise; measured on digits
    it ends with far fewer dynamic filters (2% against 14%, docs/notes/history.md), because ``L_s``
    then pushes saturated gates into static on/off. The train/eval mismatch of ``b2 = 1`` is taken
    care of by the trainer's BatchNorm recalibration.

    Args:
        in_channels: channels of the gated conv's input.
        out_channels: filters of the gated conv (one gate each).
        reduction: width reduction of the hidden layer (4 in the paper).
        init_bias: initial ``b2``.
        init: ``"open"`` (above) or ``"kaiming"`` (the authors' release: Kaiming-normal ``W1`` and
            ``W2``, so the gates depend on the input from the first step).

    Example:
        >>> acm = ACM(16, 32)
        >>> acm(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self, in_channels: int, out_channels: int, reduction: int = 4, init_bias: float = 1.0, init: str = "open"
    ) -> None:
        super().__init__()
        if init not in ACM_INITS:
            raise ConfigError(f"unknown ACM init {init!r}; choose one of {', '.join(ACM_INITS)}.")
        self.init_bias = init_bias
        self.init = init
        hidden = max(in_channels // reduction, 1)
        self.fc1 = GateLinear(in_channels, hidden)
        self.fc2 = GateLinear(hidden, out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Puts the ACM back into its initial state (all gates open with ``init="open"``)."""
        if self.init == "kaiming":
            nn.init.kaiming_normal_(self.fc1.weight)
            nn.init.kaiming_normal_(self.fc2.weight)
        else:
            nn.init.zeros_(self.fc1.weight)
            self.fc2.reset_parameters()
        nn.init.ones_(self.fc1.bias)
        nn.init.constant_(self.fc2.bias, self.init_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns gate logits ``z`` of shape ``(N, C_out)`` for an input ``(N, C_in, ...)``."""
        pooled = x.mean(dim=tuple(range(2, x.ndim))) if x.ndim > 2 else x
        return self.fc2(F.relu(self.fc1(pooled)))


class _Binarize(nn.Module):
    """The binarisation step as a module, so that recorders can hook the gate values."""

    def __init__(self, noise_std: float, hard_share: float = 0.5) -> None:
        super().__init__()
        self.noise_std = noise_std
        self.hard_share = hard_share

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return binarize(z, training=self.training, noise_std=self.noise_std, hard_share=self.hard_share)

    def extra_repr(self) -> str:
        return f"noise_std={self.noise_std}, hard_share={self.hard_share}"


class GatedSite(nn.Module):
    """A conv (with its following norm, if any) whose output channels are gated per input.

    Args:
        conv: the convolution to gate.
        norm: the normalisation module applied to the conv's output (``None`` when the conv feeds
            something else). Its place in the parent model is taken by ``nn.Identity``.
        reduction: ACM hidden-layer reduction.
        noise_std: gate noise in training.
        init_bias: initial gate logit (see :class:`ACM`).
        hard_share: share of samples with hard gates in training (see :func:`binarize`).
        acm_init: ``"open"`` or ``"kaiming"`` (see :class:`ACM`).
        activation: ``"relu"`` when the site's output goes straight into a ReLU (found by tracing),
            else ``None``; ``L_kl`` can take its target after that activation, as the release does.

    Attributes:
        force_open: when true the gates are all 1 and the site computes exactly ``norm(conv(x))``.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        norm: nn.Module | None = None,
        *,
        reduction: int = 4,
        noise_std: float = 1.0,
        init_bias: float = 1.0,
        hard_share: float = 0.5,
        acm_init: str = "open",
        activation: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= hard_share <= 1.0:
            raise ConfigError(f"hard_share must be in [0, 1], got {hard_share}.", params=("hard_share",))
        self.conv = conv
        self.norm = norm if norm is not None else nn.Identity()
        self.acm = ACM(conv.in_channels, conv.out_channels, reduction, init_bias, acm_init)
        self.gate = _Binarize(noise_std, hard_share)
        self.activation = activation
        self.force_open = False

    @property
    def out_channels(self) -> int:
        """Number of gated filters."""
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv(x))
        if self.force_open:
            return out
        alpha = self.gate(self.acm(x)).to(out.dtype)
        return out * alpha.view(*alpha.shape, *([1] * (out.ndim - 2)))
