"""The Flower transport: the rounds as a Flower ``ServerApp`` with a strategy that aggregates exactly, the sites as a
Flower ``ClientApp``, run on Flower's simulation runtime (``federate.transport: flower``).

- :class:`PolyadaptStrategy` is a Flower strategy (a :class:`flwr.serverapp.strategy.FedAvg` for node sampling and
  the round loop) whose ``aggregate_train`` is the federate recipe's own aggregation (``ffa``, ``stack`` or
  ``fedavg``, with its exactness check, bytes and privacy budget), not Flower's parameter averaging.
- :func:`client_app` makes the ``ClientApp``: each node is one site (its ``partition-id``). In its own process it
  loads the base, reads only its site's data and trains through the same :class:`~.simulation.SiteClient` as the
  in-process simulation, from the same shared seed, so a Flower run and an in-process run give the same adapter.
- Messages are Flower ArrayRecords of the same tensors the in-process transport encodes as safetensors; the
  bytes recorded per round are those safetensors sizes.

``flwr`` is not a dependency of polyadapt: its releases pin protobuf, fastapi, starlette, uvicorn and Ray versions that
conflict with the server's stack, so it lives in an environment of its own that sees polyadapt's packages
(``make flower-env``: ``.venv-flower``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .simulation import Reply, SiteClient, decode, encode

if TYPE_CHECKING:
    import torch

    from .simulation import LocalTraining, RoundServer

#: the environment ``make flower-env`` builds beside ``.venv``
FLOWER_ENV = ".venv-flower"
MISSING = (
    "federate.transport: flower needs the flwr package, which cannot share an environment with polyadapt's server "
    "stack; run `make flower-env` and `.venv-flower/bin/python -m polyadapt federate ...` (or choose transport: simulation)"
)
#: the reply's config record: which site answered, and how its round went
SITE_RECORD = "polyadapt"


def require_flower() -> None:
    """Fail with the way out when flwr (with its simulation runtime, Ray) is not importable."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import importlib.util

    if importlib.util.find_spec("flwr") is None or importlib.util.find_spec("ray") is None:
        raise ConfigError(MISSING)


def to_arrays(tensors: dict[str, torch.Tensor]) -> Any:
    """Tensors as a Flower ArrayRecord (numpy has no bfloat16: such tensors travel as float32)."""
    import torch
    from flwr.app import ArrayRecord

    return ArrayRecord(
        {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().contiguous() for k, v in tensors.items()}
    )


def from_arrays(record: Any) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict()) if len(record) else {}


# -- the sites: a ClientApp -------------------------------------------------------------------------------------------
#: per process: the one model every site of this process trains on, and each site's client (by partition)
_PROCESS: dict[str, Any] = {}


def site_client(spec: dict[str, Any], partition: int) -> SiteClient:
    """The site of node ``partition`` in this process: the base loaded once per process (and federation), the site's
    own data read and prepared, the adapter attached from the shared seed."""
    import hashlib
    import json

    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    if _PROCESS.get("key") != key:  # a new federation in this process: nothing of the last one is reused
        _PROCESS.clear()
        _PROCESS.update(key=key, clients={})
    clients = _PROCESS["clients"]
    if partition in clients:
        return clients[partition]
    import atexit
    import shutil
    import tempfile

    from ..config import validate_config
    from ..lifecycle import make_accelerator, read_data, resolve_base
    from ..plugins import get_plugin_manager
    from .recipe import Site, attach_lora, open_model, prepare_site

    os.chdir(spec["cwd"])  # the config's relative paths are relative to where federate was started
    pm = get_plugin_manager()
    config = validate_config(spec["config"], source="federate (Flower site)", plugin_manager=pm)
    modality = pm.get_modality(config.modality)
    base = resolve_base(config.base, pm)
    if "local" not in _PROCESS:
        scratch = Path(tempfile.mkdtemp(prefix="polyadapt-flower-site-"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        accelerator = make_accelerator(config, scratch, trackers=False)
        run = open_model(modality, config, base, accelerator, scratch)
        _PROCESS["local"] = attach_lora(run, config, accelerator)
    local: LocalTraining = _PROCESS["local"]
    entry = spec["sites"][partition]
    site = Site(entry["name"], Path(entry["path"]))
    site_config = config.model_copy(update={"data": config.data.model_copy(update={"path": site.path})})
    site.splits, _ = read_data(modality, site_config, site.path, base=base)
    prepare_site(local.run, site, config)
    # the site's index among all the sites named (not its node's partition): it seeds the site's data order and noise
    clients[partition] = SiteClient(site.name, entry["index"], site.samples, site.train, local)
    return clients[partition]


def client_app(spec: dict[str, Any]) -> Any:
    """The ClientApp for ``spec`` (the resolved config, the sites, the working directory): its ``train`` handler
    runs one round of :meth:`SiteClient.fit` for the node's site."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        import json

        client = site_client(spec, int(context.node_config["partition-id"]))
        number = int(message.content["config"]["server-round"])
        reply = client.fit(number, encode(from_arrays(message.content["arrays"])))
        content = RecordDict(
            {
                "arrays": to_arrays(decode(reply.message)) if reply.message else ArrayRecord(),
                "metrics": MetricRecord({"num-examples": reply.samples}),
                SITE_RECORD: ConfigRecord(
                    {
                        "site": reply.site,
                        "index": client.index,
                        "error": reply.error or "",
                        "summary": json.dumps(reply.summary),
                    }
                ),
            }
        )
        return Message(content=content, reply_to=message)

    return app


# -- the server: a strategy and a ServerApp ---------------------------------------------------------------------------
def strategy_class() -> type:
    from flwr.serverapp.strategy import FedAvg

    class PolyadaptStrategy(FedAvg):
        """Flower's FedAvg round loop and node sampling; aggregation by the federate recipe (exact for ffa and
        stack), every site in every round."""

        def __init__(self, server: RoundServer, sites: int) -> None:
            super().__init__(
                fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=sites, min_available_nodes=sites
            )
            self.server = server
            #: the server's message behind the arrays Flower sends next (its bytes are what is recorded)
            self.message = server.message()
            self.sent = 0

        def initial_arrays(self) -> Any:
            return to_arrays(decode(self.message))

        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
            messages = list(super().configure_train(server_round, arrays, config, grid))
            self.sent = len(messages)
            return messages

        def aggregate_train(self, server_round: int, replies: Any) -> tuple[Any, None]:
            self.server.finish_round(server_round, self.message, self.sent, to_replies(replies))
            self.message = self.server.message()
            return to_arrays(decode(self.message)), None

    return PolyadaptStrategy


def to_replies(messages: Any) -> list[Reply]:
    """Flower reply messages as the recipe's replies, in site order (so that sums are taken in the same order as in
    the in-process simulation)."""
    import json

    replies: list[tuple[int, Reply]] = []
    for message in messages:
        if message.has_error():
            node = message.metadata.src_node_id
            replies.append((1 << 30, Reply(site=f"node {node}", samples=0, error=message.error.reason)))
            continue
        site = message.content[SITE_RECORD]
        reply = Reply(
            site=str(site["site"]), samples=int(message.content["metrics"]["num-examples"]),
            error=str(site["error"]) or None, summary=json.loads(str(site["summary"])),
        )  # fmt: skip
        if reply.error is None:
            reply.message = encode(from_arrays(message.content["arrays"]))
        replies.append((int(site["index"]), reply))
    return [reply for _, reply in sorted(replies, key=lambda pair: pair[0])]


class FlowerTransport:
    """The rounds on Flower's simulation runtime (Ray): a ServerApp running :class:`PolyadaptStrategy` in this
    process, one ClientApp node per site in Ray worker processes (``cpus_per_site`` CPUs each)."""

    name = "flower"

    def __init__(self, cpus_per_site: float = 1.0) -> None:
        require_flower()
        self.cpus_per_site = cpus_per_site

    def run(self, server: RoundServer, sites: Sequence[SiteClient], rounds: int) -> None:
        import logging

        from flwr.app import Context
        from flwr.serverapp import Grid, ServerApp
        from flwr.simulation import run_simulation

        spec = server.site_spec(sites)
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            strategy = strategy_class()(server, len(sites))
            strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=rounds)

        logging.getLogger("flwr").setLevel(logging.WARNING)
        run_simulation(
            server_app=app, client_app=client_app(spec), num_supernodes=len(sites),
            backend_config={
                "client_resources": {"num_cpus": self.cpus_per_site, "num_gpus": 0.0},
                "init_args": {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True},
            },
        )  # fmt: skip
