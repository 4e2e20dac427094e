"""``polyadapt serve CONFIG --ray``: the same server as a Ray Serve application.

Two deployments:

- :class:`Gateway` (the HTTP ingress) reads each request's ``model`` (the JSON body's field, or the form field of an
  upload) and passes the request, untouched, to a replica through a handle whose multiplexed model id is that name.
  Ray Serve's router sends a request to a replica that already has that model id loaded, or, when none has, to the
  replica with the fewest loaded; so the requests of one adapter stay on the replicas holding it.
- :class:`Replica` holds one :class:`~polyadapt.serve.engine.Engine` (every base loaded once) and the very app that
  ``polyadapt serve`` runs, and answers the forwarded request through it in-process: authentication, limits, routes,
  batching and errors are the single-machine server's. Its ``@serve.multiplexed`` loader attaches the adapters a model
  id names (an adapter, or every adapter of a route); Ray's least-recently-used eviction detaches them again.

API keys never travel through Ray: every replica reads them from its own environment (a local Ray instance started
here inherits this process's). Admin endpoints would change one replica only, so under Ray they are refused; adapters
move between versions through registry aliases, which every replica follows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.parse
from typing import TYPE_CHECKING, Any

from ..errors import PluginError

if TYPE_CHECKING:
    from .config import ServeConfig

log = logging.getLogger("polyadapt.serve.ray")

#: the response header naming the replica that answered (its Ray Serve replica id)
REPLICA_HEADER = "x-polyadapt-replica"
APP_NAME = "polyadapt"


def require_ray_serve() -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise PluginError("polyadapt serve --ray needs Ray Serve: pip install 'polyadapt[ray]'")


def model_id_of(content_type: str, body: bytes) -> str:
    """The ``model`` a request asks for: the JSON body's field, or the multipart/urlencoded form field; '' when there
    is none (GET requests, bodies that are not JSON): such requests go to any replica."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/json" or (not kind and body[:1] == b"{"):
        try:
            value = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return ""
        return value if isinstance(value, str) else ""
    if kind == "multipart/form-data":
        return _multipart_field(content_type, body, "model")
    if kind == "application/x-www-form-urlencoded":
        values = urllib.parse.parse_qs(body.decode("latin-1")).get("model")
        return values[0] if values else ""
    return ""


def _multipart_field(content_type: str, body: bytes, name: str) -> str:
    from python_multipart.multipart import parse_options_header  # a dependency of the serve extra

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        return ""
    marker = f'name="{name}"'.encode()
    for part in body.split(b"--" + boundary):
        head, sep, value = part.partition(b"\r\n\r\n")
        if sep and marker in head and b"filename=" not in head:
            return value.rstrip(b"\r\n").decode("utf-8", "replace")
    return ""


async def call_asgi(app: Any, request: dict[str, Any]):
    """Run one HTTP request through an ASGI app in-process; yields the response start message's status and headers
    first, then the body chunks as the app sends them (streamed responses stay streamed)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request["method"], "scheme": "http", "path": request["path"],
        "raw_path": request["path"].encode(), "query_string": request["query"].encode(), "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request["headers"]],
        "client": tuple(request["client"]) if request.get("client") else None, "server": None,
    }  # fmt: skip
    sent: asyncio.Queue = asyncio.Queue()
    done = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await sent.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                yield {"status": message["status"], "headers": headers}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
    finally:
        done.set()
        await task


class LoadedModel:
    """What the multiplexed loader returns for one model id: the adapters it attached, detached when Ray evicts it."""

    def __init__(self, engine: Any, adapters: list[str]) -> None:
        self.engine = engine
        self.adapters = adapters

    def __del__(self) -> None:
        for name in self.adapters:
            try:
                self.engine.unload(name)
            except Exception:  # the adapter was removed, or the engine is closing: nothing left to detach
                pass


def adapters_named_by(config: ServeConfig, model_id: str) -> list[str]:
    """The adapters a model id names: itself, or every adapter of a route (the base alone: none)."""
    if model_id in config.adapters:
        return [model_id]
    if model_id in config.routes:
        return [name for name in dict(config.routes[model_id].split) if name in config.adapters]
    return []


def build_application(
    config: ServeConfig, *, replicas: int = 2, cpus_per_replica: float = 1.0, max_models_per_replica: int | None = None,
) -> Any:  # fmt: skip
    """The Ray Serve application (bound deployments) for ``config``; run it with ``serve.run``."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse

    from .errors import APIError

    per_replica = max_models_per_replica or config.limits.max_loaded_adapters

    @serve.deployment(name="polyadapt-replica", num_replicas=replicas,
                      ray_actor_options={"num_cpus": cpus_per_replica})  # fmt: skip
    class Replica:
        def __init__(self, serve_config: ServeConfig) -> None:
            from .app import create_app
            from .config import read_keys
            from .engine import Engine

            self.config = serve_config
            self.engine = Engine.start(serve_config, read_keys(serve_config))
            self.app = create_app(self.engine)
            self.replica_id = serve.get_replica_context().replica_id.unique_id

        @serve.multiplexed(max_num_models_per_replica=per_replica)
        async def attach(self, model_id: str) -> LoadedModel:
            names = adapters_named_by(self.config, model_id)
            for name in names:
                await asyncio.get_running_loop().run_in_executor(None, self.engine.load, name)
            return LoadedModel(self.engine, names)

        async def handle(self, request: dict[str, Any]):
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                try:
                    await self.attach(model_id)
                except Exception as exc:  # the app answers the request itself (404, 400) with the reason
                    log.debug("model id %r not attached: %s", model_id, exc)
            first = True
            async for item in call_asgi(self.app, request):
                if first:
                    item["headers"].append((REPLICA_HEADER, self.replica_id))
                    first = False
                yield item

        def __del__(self) -> None:
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.close()

    max_bytes = int(config.limits.max_request_mb * 2**20)

    @serve.deployment(name="polyadapt-gateway", num_replicas=1, ray_actor_options={"num_cpus": 0})
    class Gateway:
        def __init__(self, replica: Any) -> None:
            self.replica = replica

        async def __call__(self, request: Request) -> Any:
            if request.url.path.startswith("/admin"):
                error = APIError(400, "admin endpoints are not available under --ray (they would change one "
                                      "replica only); move a registry alias instead: every replica follows it",
                                 code="unsupported_under_ray")  # fmt: skip
                return JSONResponse(error.body(), status_code=error.status)
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                from .errors import too_large

                error = too_large(f"The request body is larger than {max_bytes // 2**20} MiB.")
                return JSONResponse(error.body(), status_code=error.status)
            body = await request.body()
            forwarded = {
                "method": request.method, "path": request.url.path, "query": request.url.query,
                "headers": list(request.headers.items()), "body": body,
                "client": [request.client.host, request.client.port] if request.client else None,
            }  # fmt: skip
            model_id = model_id_of(request.headers.get("content-type", ""), body)
            stream = self.replica.options(stream=True, multiplexed_model_id=model_id).handle.remote(forwarded)
            start = await stream.__anext__()
            headers = {k: v for k, v in start["headers"] if k.lower() not in ("content-length", "transfer-encoding")}

            async def chunks():
                async for chunk in stream:
                    yield chunk

            return StreamingResponse(chunks(), status_code=start["status"], headers=headers)

    return Gateway.bind(Replica.bind(config))


def run_ray_server(
    config: ServeConfig, *, host: str, port: int, replicas: int = 2, cpus_per_replica: float = 1.0,
    address: str | None = None, blocking: bool = True,
) -> str:  # fmt: skip
    """Start (or join, with ``address``) a Ray instance and run the application with its HTTP proxy on
    ``host:port``; returns the URL. ``blocking`` serves until interrupted, then shuts the application down."""
    require_ray_serve()
    import ray
    from ray import serve

    from ..tune import worker_pythonpath

    started = not ray.is_initialized()
    if started:
        env = {"PYTHONPATH": worker_pythonpath()}
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 num_cpus=None if address else max(os.cpu_count() or 1, int(replicas * cpus_per_replica + 0.999)),
                 runtime_env={"env_vars": env} if not address else None)  # fmt: skip
    serve.start(http_options={"host": host, "port": port})
    application = build_application(config, replicas=replicas, cpus_per_replica=cpus_per_replica)
    serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    if not blocking:
        return url
    log.info("polyadapt serve --ray: %s (%d replicas)", url, replicas)
    import signal
    import threading

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        if started:
            ray.shutdown()
    return url
