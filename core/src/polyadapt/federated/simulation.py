"""Sites and the transport between them and the server: the in-process simulation (one machine, the default).

A :class:`SiteClient` is one site: its own data, already read and prepared, and one method, :meth:`SiteClient.fit`,
which takes the server's message (bytes), trains the adapter locally through the shared loop
(:func:`polyadapt.training.train_loop`) and returns its update as bytes, clipped and noised first when
``federate.dp`` asks for it. The messages are safetensors-serialised tensors: exactly what a network transport would
carry, so the bytes recorded per round are the bytes a deployment sends.

A transport only moves messages: :class:`InProcessTransport` calls every site's ``fit`` in turn in this process;
:class:`polyadapt.federated.flower.FlowerTransport` runs the same ``fit`` in Flower ClientApps and the same
aggregation in a Flower strategy. Nothing in the sites or the aggregators changes.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import PolyadaptError
from .aggregate import GlobalAdapter, site_update
from .model import BaseOffset, fresh_layers, read_layers, train_a, write_layers

if TYPE_CHECKING:
    import torch

    from ..config import DPConfig
    from ..lora import LoraLayer
    from ..modality import ModalityRun, PreparedSplit


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    """A message: the tensors in safetensors format (no pickle)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def decode(message: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(message) if message else {}


def round_seed(seed: int, number: int) -> int:
    """The seed of round ``number``'s fresh adapter (``stack``), the same at every site and at the server."""
    return seed * 1_000_003 + number


def round_start(
    method: str, state: GlobalAdapter, number: int, initial: dict[str, LoraLayer], seed: int
) -> dict[str, LoraLayer]:
    """The adapter every site starts round ``number`` from: the global adapter (``ffa``, ``fedavg``), or a fresh one
    from the round's shared seed (``stack``, whose earlier rounds are merged into the base)."""
    if method == "stack":
        return fresh_layers(initial, round_seed(seed, number))
    return state.layers


@dataclass
class Reply:
    """A site's answer to one round: its update (bytes), or the error that kept it from training."""

    site: str
    samples: int
    message: bytes = b""
    error: str | None = None
    #: local training facts: steps, first and last loss, seconds; with DP, the update's norm before clipping
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class LocalTraining:
    """What every site's local training shares in the simulation: the one model (a site overwrites its adapter with
    the round's start before training), the accelerator and the aggregation settings."""

    run: ModalityRun
    accelerator: Any
    modules: dict[str, Any]
    #: the adapter every site initialises from the shared seed (``A`` frozen at it for ``ffa``)
    initial: dict[str, LoraLayer]
    method: str
    seed: int
    dp: DPConfig | None = None
    offset: BaseOffset | None = None

    def __post_init__(self) -> None:
        if self.offset is None:
            self.offset = BaseOffset(self.modules)


class SiteClient:
    """One site: a name, its sample count (its weight) and its prepared training split."""

    def __init__(self, name: str, index: int, samples: int, split: PreparedSplit, local: LocalTraining) -> None:
        self.name = name
        self.index = index
        self.samples = samples
        self.split = split
        self.local = local

    def start_from(self, number: int, message: bytes) -> dict[str, LoraLayer]:
        """The round's start, rebuilt from the server's message and the shared seed; the model is set to it."""
        from ..lora import LoraLayer

        local, received = self.local, decode(message)
        if local.method == "stack":
            merged = {
                key: LoraLayer(received[f"{key}.A"].float(), received[f"{key}.B"].float(), 1.0)
                for key in local.initial
                if f"{key}.A" in received
            }
            local.offset.set(merged)
            start = fresh_layers(local.initial, round_seed(local.seed, number))
        else:
            start = {}
            for key, layer in local.initial.items():
                A = received[f"{key}.A"].float() if local.method == "fedavg" else layer.A
                start[key] = LoraLayer(A, received[f"{key}.B"].float(), layer.scale)
        write_layers(local.modules, start)
        train_a(local.modules, local.method != "ffa")
        return start

    def fit(self, number: int, message: bytes) -> Reply:
        """Train locally for one round from the server's ``message``; the reply carries the update (or the error: a
        site that fails is reported by name, and the server decides whether the run goes on without it)."""
        from accelerate.utils import set_seed

        from ..training import train_loop

        local, ctx = self.local, self.local.run.ctx
        # the loop's data order is a function of train.seed: a new seed per round and site, so that rounds shorter
        # than an epoch do not see the same first batches every time
        seed = local.seed + 7919 * number + self.index
        config = ctx.config.model_copy(update={"train": ctx.config.train.model_copy(update={"seed": seed})})
        local.run.ctx = replace(ctx, config=config)
        try:
            start = self.start_from(number, message)
            set_seed(seed)
            started = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix=f"polyadapt-site-{self.index}-") as scratch:
                result = train_loop(
                    accelerator=local.accelerator, run=local.run, train_split=self.split, eval_split=None,
                    run_dir=Path(scratch), show_progress=False,
                )  # fmt: skip
            trained = read_layers(local.modules)
        except PolyadaptError as exc:
            return Reply(site=self.name, samples=self.samples, error=f"{type(exc).__name__}: {exc}")
        finally:
            local.accelerator.free_memory()
            local.run.ctx = ctx
        losses = [r["loss"] for r in result.history if "loss" in r]
        update = site_update(start, trained, trains_a=local.method != "ffa")
        summary: dict[str, Any] = {
            "steps": result.state.step, "samples_seen": result.state.samples_seen,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "seconds": round(time.perf_counter() - started, 3),
        }  # fmt: skip
        if local.dp is not None:
            import torch

            from .privacy import privatize

            generator = torch.Generator().manual_seed(local.seed * 1_000_003 + number * 1009 + self.index)
            done = privatize(update, local.dp.clip, local.dp.noise_multiplier, generator)
            summary.update(update_norm=done.norm, clipped=done.scale < 1.0)
        return Reply(site=self.name, samples=self.samples, message=encode(update), summary=summary)


class RoundServer(Protocol):
    """The server side of the rounds (the federate recipe): the message for the next round, and the replies in."""

    def message(self) -> bytes: ...

    def finish_round(self, number: int, message: bytes, sent: int, replies: list[Reply]) -> None: ...

    def site_spec(self, sites: Sequence[SiteClient]) -> dict[str, Any]:
        """What a site in another process needs to rebuild itself: the resolved config, each site's name, data
        directory and index, and the working directory the config's relative paths start from."""
        ...


class Transport(Protocol):
    """Moves the rounds' messages: the server's to every site, every site's reply back."""

    name: str

    def run(self, server: RoundServer, sites: Sequence[SiteClient], rounds: int) -> None: ...


class InProcessTransport:
    """Every site in this process, one after another (the simulation; the default)."""

    name = "simulation"

    def run(self, server: RoundServer, sites: Sequence[SiteClient], rounds: int) -> None:
        for number in range(1, rounds + 1):
            message = server.message()
            server.finish_round(number, message, len(sites), [site.fit(number, message) for site in sites])


def kib(size: int) -> str:
    """A byte count for people: ``12.3 KiB``, ``4.5 MiB``."""
    if size < 1024:
        return f"{size} B"
    units = ("KiB", "MiB", "GiB", "TiB")
    power = min(len(units), int(math.log(size, 1024)))
    return f"{size / 1024**power:.1f} {units[power - 1]}"
