"""Starting a server: the engine, the app, uvicorn; :class:`ServerThread` runs one in a thread (tests, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Keys, ServeConfig
    from .engine import Engine


def run_server(config: ServeConfig, keys: Keys, *, host: str, port: int, log_level: str = "info") -> None:
    """Load everything, then serve until interrupted; the workers stop with the server."""
    import uvicorn

    from .app import create_app
    from .engine import Engine

    engine = Engine.start(config, keys)
    try:
        uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    finally:
        engine.close()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerThread:
    """A real uvicorn server on ``host:port`` in a background thread, over an already started :class:`Engine`.

    ``with ServerThread(engine) as server: ...`` starts it and waits until it accepts connections; leaving the block
    stops it (and the engine, unless ``close_engine`` is False)."""

    def __init__(
        self, engine: Engine, host: str = "127.0.0.1", port: int | None = None, close_engine: bool = True,
        lifetime: float | None = None,
    ) -> None:  # fmt: skip
        import uvicorn

        from .app import create_app

        self.engine = engine
        self.host = host
        self.port = port or free_port(host)
        self.close_engine = close_engine
        config = uvicorn.Config(create_app(engine), host=host, port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="polyadapt-serve-http", daemon=True)
        #: a server with a lifetime stops by itself after that many seconds, whatever its owner does
        self.timer = threading.Timer(lifetime, self._expire) if lifetime else None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _expire(self) -> None:
        self.server.should_exit = True

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        if self.timer is not None:
            self.timer.daemon = True
            self.timer.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.server.should_exit = True
        self.thread.join(15)
        if self.close_engine:
            self.engine.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
