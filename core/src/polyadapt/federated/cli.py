"""The ``polyadapt federate`` command: only click is imported until it runs."""

from __future__ import annotations

from pathlib import Path

import click

OVERRIDE_HELP = "Override a config value: key.sub=value (YAML value). Repeatable."


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--sites", required=True, help="Comma-separated site dataset directories (each laid out like data.path).")
@click.option("--rounds", type=click.IntRange(min=1), help="Federated rounds (default: federate.rounds, else 3).")
@click.option(
    "--aggregate", type=click.Choice(["ffa", "stack", "fedavg"]),
    help="ffa (default): A frozen, B averaged, exact; stack: factors concatenated, exact, SVD to peft.r at the end; "
    "fedavg: A and B averaged, inexact.",
)  # fmt: skip
@click.option(
    "--transport", type=click.Choice(["simulation", "flower"]),
    help="simulation (default): every site in this process; flower: Flower ServerApp/ClientApps on Flower's "
    "simulation runtime (needs `make flower-env`).",
)  # fmt: skip
@click.option(
    "--output", type=click.Path(path_type=Path), help="Run directory to create (default: the config's output)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing run in the output directory.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
def federate(
    config: Path, sites: str, rounds: int | None, aggregate: str | None, transport: str | None, output: Path | None,
    overwrite: bool, overrides: tuple[str, ...],
) -> None:  # fmt: skip
    """Federated LoRA on CONFIG's base: every site trains the adapter locally each round, only adapter updates travel,
    the aggregate starts the next round. Writes an ordinary run directory with the federation's lineage."""
    import json

    from ..config import load_config
    from ..errors import ConfigError
    from .recipe import federate as run_federate

    paths = [s.strip() for s in sites.split(",") if s.strip()]
    if not paths:
        raise ConfigError(f"--sites {sites!r}: expected comma-separated directories")
    cfg = load_config(config, overrides)
    run_dir = run_federate(
        cfg, paths, rounds=rounds, aggregate=aggregate, output=output, overwrite=overwrite, transport=transport
    )
    manifest = json.loads((run_dir / "polyadapt.json").read_text())
    click.echo(format_summary(manifest))
    click.echo(f"run: {run_dir}  (report: {run_dir / 'report.html'})")


def format_summary(manifest: dict) -> str:
    """Per site: the headline metric before and after; then the bytes and the budget."""
    federation = manifest["federation"]
    headline = (manifest.get("metrics") or {}).get("headline")
    label = "exact" if federation["exact"] else "inexact (A and B averaged separately)"
    lines = [
        f"aggregate: {federation['aggregate']}, {label}; {federation['rounds']} round(s), {federation['transport']}"
    ]
    if headline:
        width = max([len(s["name"]) for s in federation["sites"]] + [6])
        lines.append(f"{'site':<{width}}  {'samples':>7}  {headline + ' before':>22}  {headline + ' after':>22}")
        for site in federation["sites"]:
            before = (site["metrics_before"] or {}).get(headline)
            after = (site["metrics_after"] or {}).get(headline)
            shown = ["-" if v is None else f"{v:.4f}" for v in (before, after)]
            lines.append(f"{site['name']:<{width}}  {site['train_samples']:>7}  {shown[0]:>22}  {shown[1]:>22}")
    per_round = federation["bytes"]["per_round"]
    if per_round:
        up, down = per_round[-1]["up"], per_round[-1]["down"]
        lines.append(
            f"last round: {up} bytes up, {down} bytes down; the full model is "
            f"{federation['bytes']['full_model_per_site_and_way']} bytes per site and way"
        )
    if federation.get("stack_discarded_energy"):
        lines.append(f"SVD to rank {federation['final_rank']}: largest share of a layer's energy discarded "
                     f"{federation['stack_discarded_energy']['max']:.3g}")  # fmt: skip
    if federation.get("dp"):
        dp = federation["dp"]
        lines.append(f"privacy: epsilon {dp['epsilon']:.3g} at delta {dp['delta']:g} (per site, RDP, no subsampling)")
    for skipped in federation["skipped"]:
        lines.append(f"skipped: site {skipped['site']} (round {skipped['round']}): {skipped['reason']}")
    return "\n".join(lines)
