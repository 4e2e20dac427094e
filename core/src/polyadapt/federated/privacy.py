"""Client-side differential privacy of site updates: clipping, Gaussian noise, and the (epsilon, delta) budget.

Each site clips its whole update (every tensor it sends, as one vector) to L2 norm ``clip`` and adds independent
Gaussian noise ``N(0, (noise_multiplier * clip)^2)`` to every coordinate before it leaves the site: the Gaussian
mechanism with sensitivity ``clip``. The budget is accounted with Renyi differential privacy (Mironov 2017): one
release costs ``rdp(alpha) = alpha / (2 sigma^2)`` at every order ``alpha > 1``; ``T`` rounds compose to
``T * alpha / (2 sigma^2)``; and the standard conversion gives
``epsilon = min over alpha of rdp(alpha) + log(1/delta) / (alpha - 1)``.

What this guarantees, and what it does not: the unit protected is one **site's whole contribution** (site-level DP,
the server sees a noised update per site per round), not one record inside a site. Every site takes part in every
round, so there is no amplification by subsampling; the epsilon reported is the composition over the rounds run so
far. The same noise multiplier on more rounds always costs more epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: the Renyi orders the conversion to (epsilon, delta) is minimised over (fine near 1, where small budgets sit)
ORDERS: tuple[float, ...] = (
    *(1 + x / 100 for x in range(1, 100)),
    *(2 + x / 10 for x in range(0, 100)),
    *range(12, 64),
    128.0, 256.0, 512.0, 1024.0,
)  # fmt: skip


def gaussian_rdp(noise_multiplier: float, orders: Sequence[float] = ORDERS, rounds: int = 1) -> list[float]:
    """Renyi DP of ``rounds`` releases of the Gaussian mechanism (noise std = ``noise_multiplier`` x sensitivity) at
    each order: ``rounds * alpha / (2 sigma^2)``; infinite without noise."""
    if noise_multiplier <= 0:
        return [math.inf for _ in orders]
    return [rounds * alpha / (2 * noise_multiplier**2) for alpha in orders]


def rdp_to_epsilon(rdp: Sequence[float], delta: float, orders: Sequence[float] = ORDERS) -> tuple[float, float]:
    """The smallest ``epsilon = rdp(alpha) + log(1/delta) / (alpha - 1)`` over ``orders``, and the order that gives
    it."""
    best, best_order = math.inf, math.nan
    for value, alpha in zip(rdp, orders, strict=True):
        if alpha <= 1:
            continue
        epsilon = value + math.log(1 / delta) / (alpha - 1)
        if epsilon < best:
            best, best_order = epsilon, float(alpha)
    return best, best_order


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """(epsilon, ``delta``)-DP of ``rounds`` Gaussian releases at ``noise_multiplier`` (per site, no subsampling)."""
    return rdp_to_epsilon(gaussian_rdp(noise_multiplier, rounds=rounds), delta)[0]


@dataclass(frozen=True)
class Privatized:
    """What :func:`privatize` did to one update: its L2 norm before clipping and the factor it was scaled by."""

    norm: float
    scale: float


def privatize(
    tensors: dict[str, torch.Tensor], clip: float, noise_multiplier: float, generator: torch.Generator
) -> Privatized:
    """Clip ``tensors`` (one vector: every tensor together) to L2 norm ``clip`` and add ``N(0, (noise_multiplier *
    clip)^2)`` to every coordinate, in place; ``generator`` draws the noise (seeded per site and round)."""
    import torch

    norm = math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip
    for key, tensor in tensors.items():
        noised = tensor.double() * scale
        if std > 0:
            noised = noised + std * torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        tensors[key] = noised.to(tensor.dtype)
    return Privatized(norm=norm, scale=scale)
