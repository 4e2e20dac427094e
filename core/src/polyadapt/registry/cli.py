"""``polyadapt registry ...``: thin commands over :class:`polyadapt.registry.Registry` (imported when a command runs,
so that ``polyadapt --help`` stays fast)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from .registry import Registry

REGISTRY_HELP = "Registry directory or URL (sqlite:///..., postgresql://...); default $POLYADAPT_REGISTRY or registry/."
FILES_HELP = (
    "Where a SQL registry keeps its files (fsspec URL: s3://..., file://...); default $POLYADAPT_REGISTRY_FILES."
)


def registry_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option("--registry-files", "files", metavar="URL", help=FILES_HELP)(command)
    return click.option("--registry", "url", metavar="URL", help=REGISTRY_HELP)(command)


@contextmanager
def opened(url: str | None, files: str | None, create: bool = False) -> Iterator[Registry]:
    from . import open as open_registry

    registry = open_registry(url, files=files, create=create)
    try:
        yield registry
    finally:
        registry.close()


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def parse_tags(values: tuple[str, ...]) -> dict[str, str]:
    from ..errors import RegistryError

    found = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise RegistryError(f"--tag {value!r}: expected KEY=VALUE")
        found[key] = text
    return found


@click.group()
def registry() -> None:
    """Versions, aliases, gated promotion, rollback and verification of adapters."""


@registry.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="The adapter's name (lower-case letters, digits, . _ -).")
@click.option("--tag", "tag_values", multiple=True, metavar="KEY=VALUE", help="A tag on the version. Repeatable.")
@click.option("--description", default="", help="What this version is.")
@registry_options
def push(run_dir: Path, name: str, tag_values: tuple[str, ...], description: str, url: str | None, files: str | None):
    """Store the complete run RUN_DIR as the next version of NAME; print NAME@vN."""
    with opened(url, files, create=True) as reg:
        result = reg.push(run_dir, name, tags=parse_tags(tag_values), description=description)
    if result.created:
        click.echo(result.version.label)
    else:
        what = "index" if result.version.modality == "index" else "adapter"
        click.echo(f"{result.version.label} (already stored: {result.version.label} holds the same {what} files)")


@registry.command("list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@registry_options
def list_command(name: str | None, as_json: bool, url: str | None, files: str | None) -> None:
    """List adapter names, or the versions of NAME."""
    with opened(url, files) as reg:
        if name is None:
            rows = reg.names()
            if as_json:
                echo_json(rows)
                return
            if not rows:
                click.echo(f"{reg.location}: no adapters yet (polyadapt registry push RUN_DIR --name NAME)")
            for row in rows:
                held = " ".join(f"@{a}=v{v}" for a, v in row["aliases"].items())
                latest = f"latest v{row['latest']}" if row["latest"] else "no versions"
                click.echo(f"{row['name']}  {row['versions']} version(s), {latest}  {held}".rstrip())
            return
        found = reg.versions(name)
        if as_json:
            echo_json([v.as_dict() for v in found])
            return
        for version in found:
            headline = version.headline
            after = ((version.summary.get("metrics") or {}).get("after") or {}).get(headline) if headline else None
            metric = f"{headline}={after:.4g}" if after is not None else "-"
            marks = " ".join(f"@{a}" for a in sorted(version.aliases))
            click.echo(f"{version.label}  {version.created}  {version.modality}  {metric}  {marks}".rstrip())


@registry.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@registry_options
def show(ref: str, as_json: bool, url: str | None, files: str | None) -> None:
    """Everything about NAME@REF (REF: vN, an alias, or latest): lineage, config, metrics, files, aliases."""
    with opened(url, files) as reg:
        info = reg.get(ref).as_dict()
    if as_json:
        echo_json(info)
        return
    metrics = info["metrics"]
    click.echo(f"{info['label']}  ({info['modality']}; pushed {info['created']} by {info['created_by']})")
    if info["description"]:
        click.echo(f"  {info['description']}")
    click.echo(f"base:      {info['base']['reference']}  sha256 {info['base']['sha256']}")
    click.echo(
        f"data:      {info['data'].get('path')}  fingerprint {info['data']['fingerprint']}  counts {info['data'].get('counts')}"
    )
    click.echo(f"code:      polyadapt {info['code'].get('polyadapt')}  {info['code'].get('plugins')}")
    click.echo(f"headline:  {metrics['headline']}")
    for section in ("before", "after", "general_before", "general_after"):
        values = metrics.get(section)
        if values:
            click.echo(f"{section + ':':<16}" + ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
    if info["parents"]:
        click.echo("parents:   " + ", ".join(str(p.get("reference", p)) for p in info["parents"]))
    click.echo("aliases:   " + (" ".join(f"@{a}" for a in info["aliases"]) or "none"))
    click.echo("tags:      " + (", ".join(f"{k}={v}" for k, v in info["tags"].items()) or "none"))
    click.echo("files:")
    for path, entry in info["files"].items():
        click.echo(f"  {path}  {entry['sha256']}  {entry['size']} bytes")


@registry.command()
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@registry_options
def diff(a: str, b: str, as_json: bool, url: str | None, files: str | None) -> None:
    """What differs between NAME@A and NAME@B: config, data fingerprint, base and metrics."""
    with opened(url, files) as reg:
        found = reg.diff(a, b)
    if as_json:
        echo_json(found)
        return
    click.echo(f"{found['a']} vs {found['b']}")
    any_difference = False
    for section in ("modality", "base", "data", "config", "metrics"):
        for key, values in found[section].items():
            any_difference = True
            click.echo(f"{section}.{key}: {values['a']!r} -> {values['b']!r}")
    if not any_difference:
        click.echo("no differences")


@registry.command()
@click.argument("ref")
@click.argument("alias")
@click.option("--reason", default="", help="Why (recorded in the history).")
@registry_options
def alias(ref: str, alias: str, reason: str, url: str | None, files: str | None) -> None:
    """Point ALIAS at NAME@vN without the promotion gate."""
    with opened(url, files) as reg:
        event = reg.alias(ref, alias, reason=reason)
    click.echo(_moved(event))


@registry.command()
@click.argument("ref")
@click.argument("alias")
@click.option("--min-gain", type=float, help="Headline metric gain over the base, in its units (default: setting).")
@click.option("--max-forgetting", type=float, help="Largest relative general-data regression (default: setting).")
@click.option("--force", is_flag=True, help="Move the alias even if the gate fails (needs --reason).")
@click.option("--reason", default="", help="Why (recorded in the history).")
@registry_options
def promote(
    ref: str, alias: str, min_gain: float | None, max_forgetting: float | None, force: bool, reason: str,
    url: str | None, files: str | None,
) -> None:  # fmt: skip
    """Move ALIAS to NAME@vN if it beats the base, stays within the forgetting budget and is no worse than the version
    ALIAS holds now. A refusal lists every failed condition and exits 2."""
    with opened(url, files) as reg:
        promotion = reg.promote(
            ref, alias, min_gain=min_gain, max_forgetting=max_forgetting, force=force, reason=reason
        )
    for condition in promotion.conditions:
        click.echo(f"  [{'pass' if condition.passed else 'FAIL'}] {condition.name}: {condition.detail}")
    click.echo(_moved(promotion.event))


@registry.command()
@click.argument("name")
@click.argument("alias")
@click.option("--reason", default="", help="Why (recorded in the history).")
@registry_options
def rollback(name: str, alias: str, reason: str, url: str | None, files: str | None) -> None:
    """Move ALIAS of NAME back to the version it held before."""
    with opened(url, files) as reg:
        event = reg.rollback(name, alias, reason=reason)
    click.echo(_moved(event))


@registry.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@registry_options
def history(name: str, as_json: bool, url: str | None, files: str | None) -> None:
    """Every alias move of NAME: when, from, to, by whom, why, gated or forced."""
    with opened(url, files) as reg:
        found = reg.history(name)
    if as_json:
        echo_json([e.as_dict() for e in found])
        return
    if not found:
        click.echo(f"{name}: no alias has moved yet")
    for event in found:
        old = f"v{event.from_version}" if event.from_version else "-"
        why = f"  ({event.reason})" if event.reason else ""
        click.echo(f"{event.at}  @{event.alias}  {old} -> v{event.to_version}  {event.action}  by {event.by}{why}")


@registry.command()
@click.argument("ref")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Directory to create.")
@registry_options
def pull(ref: str, output: Path, url: str | None, files: str | None) -> None:
    """Write NAME@REF as a standard adapter directory (PEFT or diffusers loads it) with its model card."""
    with opened(url, files) as reg:
        path = reg.pull(ref, output)
    click.echo(str(path))


@registry.command()
@click.argument("name", required=False)
@registry_options
def verify(name: str | None, url: str | None, files: str | None) -> None:
    """Re-hash every stored file (of NAME, or all); name each one altered or missing and exit 1 if any."""
    with opened(url, files) as reg:
        checked, problems = reg.verify(name)
    for problem in problems:
        click.echo(str(problem), err=True)
    if problems:
        click.echo(f"{len(problems)} of {checked} stored file(s) altered or missing", err=True)
        raise SystemExit(1)
    click.echo(f"{checked} stored file(s) verified")


@registry.command()
@click.argument("ref")
@registry_options
def delete(ref: str, url: str | None, files: str | None) -> None:
    """Remove NAME@vN (refused while an alias points at it); `gc` then frees its files."""
    from ..errors import RegistryError
    from .registry import parse_ref

    if parse_ref(ref).version is None:
        raise RegistryError(f"delete takes NAME@vN, not {ref!r}: name the version itself")
    with opened(url, files) as reg:
        version = reg.delete(ref)
    click.echo(f"deleted {version.label}")


@registry.command()
@click.option("--grace-seconds", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="Keep unreferenced files younger than this (a push in progress).")  # fmt: skip
@registry_options
def gc(grace_seconds: float, url: str | None, files: str | None) -> None:
    """Remove stored files that no version references."""
    with opened(url, files) as reg:
        result = reg.gc(grace_seconds=grace_seconds)
    click.echo(f"removed {result.removed} file(s), {result.bytes} bytes; {result.kept} kept")


@registry.command()
@click.option("--min-gain", type=click.FloatRange(min=0), help="Default --min-gain of promote.")
@click.option("--max-forgetting", type=click.FloatRange(min=0), help="Default --max-forgetting of promote.")
@registry_options
def settings(min_gain: float | None, max_forgetting: float | None, url: str | None, files: str | None) -> None:
    """Show or change the registry's gate defaults."""
    with opened(url, files, create=min_gain is not None or max_forgetting is not None) as reg:
        found = reg.configure(min_gain=min_gain, max_forgetting=max_forgetting)
        click.echo(f"location: {reg.location}\nfiles:    {reg.store.url}")
    for key, value in found.items():
        click.echo(f"{key}: {value:g}")


def _moved(event: Any) -> str:
    old = f"v{event.from_version}" if event.from_version else "nothing"
    return f"{event.name}@{event.alias}: {old} -> v{event.to_version} ({event.action})"
