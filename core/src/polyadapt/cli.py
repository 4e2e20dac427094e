"""The ``polyadapt`` command line. Library errors become one line on stderr and exit code 2 (``--debug``: traceback)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .errors import ConfigError, PolyadaptError

OVERRIDE_HELP = "Override a config value: key.sub=value (YAML value). Repeatable."


class PolyadaptGroup(click.Group):
    """Adds the commands plugins contribute, and turns library errors into one-line messages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plugins_added = False

    def _add_plugin_commands(self) -> None:
        if not self._plugins_added:
            self._plugins_added = True
            from .plugins import get_plugin_manager

            get_plugin_manager().hook.register_commands(cli=self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None:
            self._add_plugin_commands()
            command = super().get_command(ctx, name)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PolyadaptError as exc:
            if ctx.meta.get("polyadapt.debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=PolyadaptGroup)
@click.version_option(package_name="polyadapt")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Adapt text, speech and image models to your domain: adapt -> evaluate -> version -> export -> serve."""
    ctx.meta["polyadapt.debug"] = debug


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List installed plugins, their modalities and hooks, and plugins that failed to load."""
    from .plugins import get_plugin_manager

    pm = get_plugin_manager()
    pm.modalities  # noqa: B018 - fills in which plugin registered which modality
    infos = [i.as_dict() for i in pm.infos.values()]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    if not infos:
        click.echo("No plugins installed. Install one, e.g.: pip install polyadapt-text")
    for info in infos:
        version = f" {info['version']}" if info["version"] else ""
        line = f"{info['name']}{version} [{info['status']}]"
        if info["modalities"]:
            line += f" modalities: {', '.join(info['modalities'])}"
        for name in info["modalities"]:
            modality = pm.modalities[name]
            line += f"\n    {name}: peft {', '.join(modality.peft_methods)}"
            if modality.capabilities:
                line += f"; capabilities {', '.join(sorted(modality.capabilities))}"
        click.echo(line)
        if info["error"]:
            click.echo(f"    error: {info['error']}")
        if info["hint"]:
            click.echo(f"    hint: {info['hint']}")


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
@click.option("--resume", is_flag=True, help="Continue an unfinished run from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in the output directory.")
def adapt(config: Path, overrides: tuple[str, ...], resume: bool, overwrite: bool) -> None:
    """Adapt a base model to the data in CONFIG; evaluate before and after; write the run directory."""
    from .config import load_config
    from .lifecycle import adapt as run_adapt

    cfg = load_config(config, overrides)
    run_dir = run_adapt(cfg, resume=resume, overwrite=overwrite)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    report = json.loads((run_dir / "report.json").read_text())
    _print_metrics(report)
    click.echo(f"run: {run_dir}  (report: {run_dir / 'report.html'})")


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--trials", required=True, type=click.IntRange(min=1), help="Finished trials the study should have.")
@click.option(
    "--search", default="lr,r,epochs", show_default=True, help="Comma-separated values to search: lr, r, epochs."
)
@click.option(
    "--backend", type=click.Choice(["optuna", "ray"]), default="optuna", show_default=True, help="Who runs the trials."
)
@click.option("--ray-address", help="Ray cluster to run on (default: a local Ray instance started for the search).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
def tune(
    config: Path, trials: int, search: str, backend: str, ray_address: str | None, overrides: tuple[str, ...]
) -> None:
    """Search hyperparameters for CONFIG: each trial is a full adapt run in <output>-tune/, scored on the held-out
    metric; writes trials.json and best.yaml there. Running the same command again resumes the study."""
    from .errors import TuneError
    from .tune import first_line, format_table
    from .tune import tune as run_tune

    def report(trial: Any) -> None:
        outcome = first_line(trial.error) if trial.error else f"{trial.value:.6g}"
        click.echo(f"trial {trial.number} {trial.state}: {outcome} ({trial.seconds or 0:.1f} s)", err=True)

    try:
        result = run_tune(
            config, trials, search=search, backend=backend, overrides=overrides, ray_address=ray_address,
            on_trial=report,
        )  # fmt: skip
    except TuneError as exc:
        if exc.result is not None:
            click.echo(format_table(exc.result))
        raise
    click.echo(format_table(result))


def _print_metrics(report: dict[str, Any]) -> None:
    rows = report["metrics"]
    width = max([len(r["metric"]) for r in rows] + [6])
    click.echo(f"{'metric':<{width}}  {'before':>10}  {'after':>10}")
    for row in rows:
        before = "-" if row["before"] is None else f"{row['before']:.4f}"
        click.echo(f"{row['metric']:<{width}}  {before:>10}  {row['after']:>10.4f}")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Dataset directory to evaluate on (default: the run's).")
@click.option("--max-samples", type=click.IntRange(min=1), help="Evaluate on at most N held-out samples.")
@click.option(
    "--retrieve", metavar="INDEX",
    help="Compare base, base + retrieval, adapter and adapter + retrieval with chunks of INDEX (directory or "
    "NAME@REF); --data may then also be question JSONL files.",
)  # fmt: skip
@click.option("--top-k", type=click.IntRange(1, 64), help="Chunks retrieved per question with --retrieve.")
def evaluate(
    run_dir: Path, data: Path | None, max_samples: int | None, retrieve: str | None, top_k: int | None
) -> None:
    """Evaluate base vs adapted model of RUN_DIR on held-out data; update its report."""
    from .lifecycle import evaluate as run_evaluate

    if retrieve is not None:
        from .retrieval_eval import compare, format_table

        comparison = compare(run_dir, retrieve, data=data, top_k=top_k, max_samples=max_samples)
        click.echo(format_table(comparison))
        return
    if top_k is not None:
        raise ConfigError("--top-k: only with --retrieve INDEX")

    report = run_evaluate(run_dir, data=data, max_samples=max_samples)
    _print_metrics(report)


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
def doctor(config: Path, overrides: tuple[str, ...]) -> None:
    """Validate CONFIG and every data sample without training. Exit 2 if anything is wrong."""
    from .config import load_config
    from .errors import DataError
    from .lifecycle import doctor as run_doctor

    cfg = load_config(config, overrides)
    splits, summary = run_doctor(cfg)
    for line in summary:
        click.echo(line)
    if splits.problems:
        raise DataError(f"{len(splits.problems)} bad sample(s) in {cfg.data.path}", splits.problems)
    click.echo("config and data are valid")


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def infer(ctx: click.Context, run_dir: Path | None, args: tuple[str, ...]) -> None:
    """Run the adapted model of RUN_DIR. Its modality decides the arguments: `polyadapt infer RUN_DIR --help`."""
    if run_dir is None or str(run_dir) in ("--help", "-h"):
        click.echo(ctx.get_help())
        return
    from .errors import PluginError
    from .lifecycle import open_run
    from .plugins import get_plugin_manager

    _, _, config = open_run(run_dir)
    modality = get_plugin_manager().get_modality(config.modality)
    if "inference" not in modality.capabilities:
        raise PluginError(f"the {modality.name} modality has no inference")

    def run(**options: Any) -> None:
        from .evaluation import evaluating
        from .lifecycle import load_run

        loaded = load_run(run_dir)
        with evaluating(loaded.run):
            lines = loaded.run.infer(options)
        for line in lines:
            click.echo(line)

    command = click.Command(
        "infer", params=modality.infer_params(), callback=run, help=f"Inference with a {modality.name} run."
    )
    command.main(list(args), prog_name=f"polyadapt infer {run_dir}", standalone_mode=False)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--format", "format_name", required=True, help="Export format (see the modality's formats; 'merged' for all)."
)
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Directory to create.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
def export(run_dir: Path, format_name: str, output: Path, overwrite: bool) -> None:
    """Export RUN_DIR's adapted model in another format."""
    from .export import export_run

    record = export_run(run_dir, format_name, output, overwrite=overwrite)
    click.echo(json.dumps(record, indent=2, default=str))


@cli.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Run directory to create.")
@click.option("--weights", help="Comma-separated weight per adapter (default 1 each).")
@click.option("--method", default="cat", show_default=True,
              type=click.Choice(["cat", "svd", "ties", "dare_ties", "dare_linear", "magnitude_prune"]))  # fmt: skip
@click.option("--rank", type=click.IntRange(min=1), help="Rank of the result (svd and the pruning methods).")
@click.option("--density", type=float, help="Fraction of each update kept (ties, dare_*, magnitude_prune).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's random drop.")
@click.option("--no-eval", is_flag=True, help="Skip judging the result on each parent's held-out data.")
@click.option("--max-samples", type=click.IntRange(min=1), help="Judge on at most N held-out samples per set.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run at --output.")
@click.option("--registry", "registry_url", metavar="URL", help="Registry for NAME@REF adapters.")
def compose(
    adapters: tuple[str, ...], output: Path, weights: str | None, method: str, rank: int | None,
    density: float | None, seed: int, no_eval: bool, max_samples: int | None, overwrite: bool,
    registry_url: str | None,
) -> None:  # fmt: skip
    """Compose ADAPTERS (run directories or NAME@REF of one modality and base) into a new run directory."""
    from .compose import compose as run_compose
    from .compose import format_table

    parsed = None
    if weights is not None:
        try:
            parsed = [float(w) for w in weights.split(",")]
        except ValueError:
            raise ConfigError(f"--weights {weights!r}: expected comma-separated numbers") from None
    result = run_compose(
        list(adapters), output, weights=parsed, method=method, rank=rank, density=density, seed=seed,
        evaluate=not no_eval, overwrite=overwrite, registry=registry_url, max_samples=max_samples,
    )  # fmt: skip
    click.echo(
        f"{result['output']}: {method} of {len(adapters)} adapters, rank {result['rank']}, weights {result['weights']}"
    )
    if result["max_relative_error"]:
        click.echo(f"largest relative truncation error of a layer: {result['max_relative_error']:.3g}")
    if result["table"]:
        click.echo(format_table(result["table"]))


from .registry.cli import registry  # noqa: E402 - the group imports the registry only when a command runs

cli.add_command(registry)
from .serve.cli import serve  # noqa: E402 - only click is imported until the command runs

cli.add_command(serve)
from .federated.cli import federate  # noqa: E402 - only click is imported until the command runs

cli.add_command(federate)
from .retrieval.cli import index  # noqa: E402 - only click is imported until the command runs

cli.add_command(index)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="polyadapt", standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
