"""``polyadapt serve CONFIG [--host 127.0.0.1] [--port 8000] [--ray]``: only click is imported until the command runs."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))  # fmt: skip
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Run as a Ray Serve application: replicas of every base, adapters multiplexed across them.",
)
@click.option("--replicas", default=2, show_default=True, type=click.IntRange(min=1), help="Ray Serve replicas.")
@click.option(
    "--cpus-per-replica",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="CPUs Ray reserves for each replica.",
)
@click.option("--ray-address", help="Ray cluster to join (default: a local Ray instance started for the server).")
def serve(
    config: Path, host: str, port: int, log_level: str, use_ray: bool, replicas: int, cpus_per_replica: float,
    ray_address: str | None,
) -> None:  # fmt: skip
    """Serve the bases and adapters of CONFIG behind OpenAI-compatible endpoints (see README: Serving)."""
    import importlib.util
    import logging

    from ..errors import PluginError
    from .config import load_serve_config, read_keys

    missing = [
        m for m in ("fastapi", "uvicorn", "multipart", "prometheus_client") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise PluginError(f"polyadapt serve needs {', '.join(missing)}: pip install 'polyadapt[serve]'")

    cfg = load_serve_config(config)
    keys = read_keys(cfg, source=str(config))  # before any model loads: a missing key is exit 2 at once
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if use_ray:
        from .ray_serve import require_ray_serve, run_ray_server

        require_ray_serve()
        run_ray_server(cfg, host=host, port=port, replicas=replicas, cpus_per_replica=cpus_per_replica,
                       address=ray_address)  # fmt: skip
        return
    from .server import run_server

    run_server(cfg, keys, host=host, port=port, log_level=log_level)
