"""Synthetic gates with a known silent / energetic / dynamic split, for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nd_plugin._hooks import ForwardHooks
from nd_plugin.decoupled import DecoupledModel

__all__ = ["synthetic_gates"]


@torch.no_grad()
def synthetic_gates(
    dm: DecoupledModel, x: torch.Tensor, *, seed: int = 0, fractions: Sequence[float] | None = None
) -> None:
    """Sets every ACM so that its filters are silent, energetic or dynamic, layer by layer.

    Silent filters get a logit of −1e4, energetic ones +1e4; dynamic ones a random linear function
    of the input, centred halfway between the two middle logits over ``x`` so that each is on for
    about half of the inputs (and no logit is exactly 0).

    Args:
        dm: the decoupled model (modified in place).
        x: inputs that set the dynamic filters' thresholds (layer by layer, in path order).
        seed: seed of the draw.
        fractions: relative shares of (silent, energetic, dynamic); ``None`` gives exact thirds
            (a random permutation of ``0, 1, 2, 0, 1, 2, ...``).
    """
    gen = torch.Generator().manual_seed(seed)
    for site in dm.sites():
        c = site.out_channels
        if fractions is None:
            kind = torch.randperm(c, generator=gen) % 3
        else:
            kind = torch.multinomial(torch.tensor(fractions, dtype=torch.float), c, replacement=True, generator=gen)
        acm = site.acm
        acm.fc1.weight.normal_(0, 1.0, generator=gen)
        acm.fc1.bias.zero_()
        acm.fc2.weight.normal_(0, 1.0, generator=gen)
        acm.fc2.weight[kind != 2] = 0
        acm.fc2.bias.copy_(torch.where(kind == 0, -1e4, torch.where(kind == 1, 1e4, 0.0)))
        logits: list[torch.Tensor] = []
        with ForwardHooks([acm], lambda _m, _i, out: logits.append(out)):  # noqa: B023
            dm(x)
        ordered = logits[0].sort(dim=0).values
        half = len(ordered) // 2
        centre = (ordered[half - 1] + ordered[half]) / 2
        acm.fc2.bias[kind == 2] -= centre[kind == 2]
