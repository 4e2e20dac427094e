"""Aggregating LoRA updates from sites: what each site sends, what the server makes of it, and how far that is from
the exact weighted mean of the sites' updates.

A LoRA layer changes its base weight by ``delta = s * B @ A``. A site starts a round from the global adapter
``(A0, B0)``, trains, and ends at ``(A_i, B_i)``; its update is ``delta_i = s * (B_i @ A_i - B0 @ A0)``. The exact
aggregate is the sample-weighted mean ``sum_i w_i * delta_i`` (``w_i = n_i / sum n``). The three aggregators:

- ``ffa`` (FFA-LoRA, Sun et al., ICLR 2024): ``A`` is frozen at the shared seed (every site initialises it identically
  and never trains it), so ``delta_i = s * (B_i - B0) @ A0`` is linear in ``B`` and averaging ``B`` **is** the exact
  mean. Only ``B`` travels.
- ``stack`` (FLoRA, Wang et al., 2024, arXiv 2409.05976): each round every site trains a fresh adapter ``(A_i, B_i)``
  from ``B = 0`` on top of the base with the earlier rounds merged in; the server concatenates the factors,
  ``A = [A_1; ...; A_n]`` and ``B = [w_1 s B_1, ..., w_n s B_n]``, whose product is exactly ``sum_i w_i delta_i``.
  The rank grows by the sum of the sites' ranks every round; the final adapter is reduced to ``peft.r`` by an SVD of
  the stacked factors (:func:`polyadapt.compose.compose_layers`, method ``svd``), and the discarded energy is reported.
- ``fedavg`` (FedAvg over the PEFT state dict, as FlowerTune does): ``A`` and ``B`` averaged separately. The product
  of means is not the mean of products, so the result is **inexact**; :func:`relative_error` measures by how much.

Updates are dictionaries of tensors keyed ``"<layer>.A"`` / ``"<layer>.B"`` (differences from the round's start),
which is what a transport serialises; nothing else about a site leaves it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..lora import LoraLayer

if TYPE_CHECKING:
    import torch

AGGREGATORS = ("ffa", "stack", "fedavg")
#: whether each aggregator's result equals the exact weighted mean of the sites' updates
EXACT = {"ffa": True, "stack": True, "fedavg": False}


@dataclass
class GlobalAdapter:
    """The server's state between rounds.

    ``layers`` is the adapter the sites start from (``ffa``, ``fedavg``); ``merged`` (``stack``) holds the exact sum of
    every earlier round's updates as stacked factors of scale 1, merged into the base weights before a site trains.
    """

    layers: dict[str, LoraLayer]
    merged: dict[str, LoraLayer] = field(default_factory=dict)

    @property
    def merged_rank(self) -> int:
        return max((layer.rank for layer in self.merged.values()), default=0)


def weights_of(samples: Sequence[int]) -> list[float]:
    """Sample-count weights ``n_i / sum n``."""
    total = sum(samples)
    if total <= 0:
        raise ValueError("sites hold no training samples")
    return [n / total for n in samples]


# -- the site side ---------------------------------------------------------------------------------------------------
def site_update(start: dict[str, LoraLayer], trained: dict[str, LoraLayer], trains_a: bool) -> dict[str, torch.Tensor]:
    """What a site sends: ``B_i - B0`` for every layer, and ``A_i - A0`` when ``A`` was trained."""
    update = {}
    for key, layer in trained.items():
        update[f"{key}.B"] = (layer.B.float() - start[key].B.float()).contiguous()
        if trains_a:
            update[f"{key}.A"] = (layer.A.float() - start[key].A.float()).contiguous()
    return update


def apply_update(start: dict[str, LoraLayer], update: dict[str, torch.Tensor]) -> dict[str, LoraLayer]:
    """The site's trained adapter, rebuilt from the round's start and its update."""
    layers = {}
    for key, layer in start.items():
        A = layer.A.float() + update[f"{key}.A"] if f"{key}.A" in update else layer.A.float()
        layers[key] = LoraLayer(A, layer.B.float() + update[f"{key}.B"], layer.scale)
    return layers


# -- the server side -------------------------------------------------------------------------------------------------
def aggregate(
    method: str, state: GlobalAdapter, start: dict[str, LoraLayer], updates: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float],
) -> GlobalAdapter:  # fmt: skip
    """The next global state from the sites' ``updates`` (each relative to ``start``) with ``weights``."""
    import torch

    if method not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {method!r}")
    if method == "stack":
        merged = dict(state.merged)
        for key, layer in start.items():
            As, Bs = [], []
            for update, weight in zip(updates, weights, strict=True):
                trained = apply_update({key: layer}, update)[key]
                As.append(trained.A)
                Bs.append(weight * layer.scale * trained.B)
            if key in merged:
                As.insert(0, merged[key].A)
                Bs.insert(0, merged[key].B)
            merged[key] = LoraLayer(torch.cat(As, dim=0), torch.cat(Bs, dim=1), 1.0)
        return GlobalAdapter(layers=state.layers, merged=merged)
    layers = {}
    for key, layer in start.items():
        A, B = layer.A.float().clone(), layer.B.float().clone()
        for update, weight in zip(updates, weights, strict=True):
            B += weight * update[f"{key}.B"]
            if f"{key}.A" in update:
                A += weight * update[f"{key}.A"]
        layers[key] = LoraLayer(A, B, layer.scale)
    return GlobalAdapter(layers=layers, merged=state.merged)


def exact_mean(
    start: dict[str, LoraLayer], updates: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The exact weighted mean of the sites' updates to each base weight, ``sum_i w_i * s * (B_i A_i - B0 A0)``, dense."""
    means = {}
    for key, layer in start.items():
        before = layer.delta().double()
        total = None
        for update, weight in zip(updates, weights, strict=True):
            trained = apply_update({key: layer}, update)[key]
            term = weight * (trained.delta().double() - before)
            total = term if total is None else total + term
        means[key] = total
    return means


def applied_delta(
    method: str, old: GlobalAdapter, new: GlobalAdapter, start: dict[str, LoraLayer]
) -> dict[str, torch.Tensor]:
    """The change to each base weight the aggregate makes, dense: what the server's result adds for this round."""
    deltas = {}
    for key, layer in start.items():
        if method == "stack":
            previous = old.merged[key].rank if key in old.merged else 0
            added = new.merged[key]
            deltas[key] = added.B.double()[:, previous:] @ added.A.double()[previous:]
        else:
            deltas[key] = new.layers[key].delta().double() - layer.delta().double()
    return deltas


def relative_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """``||got - expected||_F / ||expected||_F`` over every layer together (0 when both are zero)."""
    diff = sum(float((got[k] - expected[k]).square().sum()) for k in expected)
    norm = sum(float(expected[k].square().sum()) for k in expected)
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return math.sqrt(diff / norm)


# -- what travels ----------------------------------------------------------------------------------------------------
def download(method: str, state: GlobalAdapter) -> dict[str, torch.Tensor]:
    """What the server sends every site at the start of a round. ``ffa``: ``B`` only (``A`` comes from the shared
    seed); ``fedavg``: ``A`` and ``B``; ``stack``: the merged factors of the earlier rounds (a site's fresh adapter
    comes from the shared seed)."""
    tensors = {}
    if method == "stack":
        for key, layer in state.merged.items():
            tensors[f"{key}.A"], tensors[f"{key}.B"] = layer.A.contiguous(), layer.B.contiguous()
        return tensors
    for key, layer in state.layers.items():
        tensors[f"{key}.B"] = layer.B.float().contiguous()
        if method == "fedavg":
            tensors[f"{key}.A"] = layer.A.float().contiguous()
    return tensors


def final_layers(method: str, state: GlobalAdapter, rank: int) -> tuple[dict[str, LoraLayer], dict[str, float]]:
    """The adapter to save, and for ``stack`` the share of each layer's energy (sum of squared singular values) the
    reduction to ``rank`` discarded. ``ffa``/``fedavg``: the global adapter as it is."""
    if method != "stack":
        return state.layers, {}
    from ..compose import compose_layers
    from ..lora import LoraAdapter

    stacked = LoraAdapter(source="federated", layout="peft", layers=state.merged, config={})
    if state.merged_rank <= rank:  # nothing to discard: the stacked factors, zero-padded to the rank
        return {key: _padded(layer, rank) for key, layer in state.merged.items()}, {key: 0.0 for key in state.merged}
    composed = compose_layers([stacked], [1.0], "svd", rank=rank)
    return composed.layers, {key: error**2 for key, error in composed.errors.items()}


def _padded(layer: LoraLayer, rank: int) -> LoraLayer:
    import torch

    missing = rank - layer.rank
    A = torch.cat([layer.A, torch.zeros(missing, layer.A.shape[1], dtype=layer.A.dtype)])
    B = torch.cat([layer.B, torch.zeros(layer.B.shape[0], missing, dtype=layer.B.dtype)], dim=1)
    return LoraLayer(A, B, layer.scale)
