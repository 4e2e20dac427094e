"""report.json and report.html: metrics before/after as a table, the loss curve, and the modality's own sections."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .evaluation import compare
from .manifest import write_json_atomic

if TYPE_CHECKING:
    from .evaluation import Metric
    from .modality import EvalResult, Modality

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


def write_reports(
    run_dir: Path,
    modality: Modality,
    manifest: dict[str, Any],
    before: EvalResult | None,
    after: EvalResult,
    *,
    plugin_metrics: list[Metric] = (),
    sections: list[tuple[str, str]] = (),
    general: tuple[dict | None, dict | None] | None = None,
    evaluated_on: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write report.json and report.html into ``run_dir``; return the report.json content.

    ``manifest`` is the manifest's JSON content; ``plugin_metrics`` give the directions of metrics plugins add;
    ``sections`` are the modality's own ``(title, html)`` report sections.
    """
    directions = {m.name: m.higher_is_better for m in plugin_metrics}

    def higher(name: str) -> bool:
        return directions[name] if name in directions else modality.higher_is_better(name)

    rows = compare(before.metrics if before else None, after.metrics, higher)
    general_rows = compare(general[0], general[1], higher) if general and general[1] else []
    history = _read_history(run_dir / "metrics.jsonl")
    warning = None
    if manifest.get("improved") is False:
        from .defaults import not_improved_warning
        from .manifest import parse_manifest

        warning = not_improved_warning(modality, parse_manifest(manifest, "manifest"))
    report = {
        "modality": modality.name,
        "primary_metric": (manifest.get("metrics") or {}).get("headline") or modality.primary_metric,
        "improved": manifest.get("improved"),
        "warning": warning,
        "base": manifest.get("base", {}).get("reference"),
        "metrics": rows,
        "general_metrics": general_rows,
        "training": manifest.get("training"),
        "evaluated_on": evaluated_on,
        "examples": {"before": (before.examples if before else [])[:20], "after": after.examples[:20]},
    }
    write_json_atomic(run_dir / REPORT_JSON, report)
    (run_dir / REPORT_HTML).write_text(_render_html(report, manifest, history, list(sections)), encoding="utf-8")
    return report


def write_model_card(
    run_dir: Path, modality: Modality, manifest: dict[str, Any], usage: str, title: str | None = None
) -> Path:
    """``README.md`` of the run directory: a model card written from the manifest (what the adapter is, what it was
    trained on, what it measured before and after, how to load it without polyadapt). ``usage`` is the modality's
    loading snippet (markdown)."""
    base = manifest.get("base", {})
    data = manifest.get("data", {})
    config = manifest.get("config", {})
    peft = config.get("peft", {})
    metrics = manifest.get("metrics", {})
    training = manifest.get("training") or {}
    adapter = manifest.get("adapter") or {}
    digests = base.get("weights_sha256") or {}
    rows = compare(metrics.get("before"), metrics.get("after") or {}, modality.higher_is_better)
    lines = [
        "---",
        "library_name: peft" if (run_dir / "adapter_config.json").exists() else "library_name: diffusers",
        f"base_model: {base.get('hub_id') or base.get('reference')}",
        "tags: [polyadapt, " + f"{modality.name}, {peft.get('method', 'lora')}]",
        "---",
        "",
        f"# {title or run_dir.name}",
        "",
        f"A {peft.get('method', 'lora')} adapter ({modality.name}) made by polyadapt {manifest.get('polyadapt_version')}.",
        "",
        "## Base",
        "",
        f"- reference: `{base.get('reference')}`",
        *[f"- weights sha256 `{name}`: `{digest}`" for name, digest in digests.items()],
        "",
        "## Data",
        "",
        f"- path: `{data.get('path')}`",
        f"- fingerprint (sha256 over every file): `{(data.get('fingerprint') or {}).get('sha256')}`",
        f"- samples: {data.get('counts', {}).get('train')} train, {data.get('counts', {}).get('validation')} held out "
        f"(held-out split: {(data.get('heldout') or {}).get('source', '?')})",
        *([f"- personal data: {pii_words(data['details']['pii'])}"] if (data.get("details") or {}).get("pii") else []),
        "",
        "## Adapter",
        "",
        f"- method: {peft.get('method')}, rank {peft.get('r')}, alpha {peft.get('alpha')}, "
        f"targets {peft.get('target_modules')}",
        f"- trainable parameters: {adapter.get('parameters', {}).get('trainable')} "
        f"of {adapter.get('parameters', {}).get('total')}",
        f"- training: {training.get('steps')} steps, {training.get('seconds')} s, seed {manifest.get('seed')}",
        "",
        "## Held-out metrics",
        "",
        "| metric | before | after |",
        "| --- | --- | --- |",
        *[f"| {r['metric']} | {_plain(r['before'])} | {_plain(r['after'])} |" for r in rows],
        "",
        "## Loading it",
        "",
        usage.strip(),
        "",
        "The full lineage is in `polyadapt.json`; `report.html` has the curves and sample outputs.",
        "",
    ]
    path = run_dir / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def pii_words(record: dict[str, Any]) -> str:
    """One line on the manifest's ``data.details.pii`` (:mod:`polyadapt.pii`): the policy, counts per type, what
    was done."""
    policy = record.get("policy")
    if not record.get("scanned"):
        return f"not scanned ({record.get('reason')}); data.pii: {policy}"
    counts = ", ".join(f"{t} {n}" for t, n in (record.get("counts") or {}).items() if n) or "none found"
    if record.get("redacted"):
        done = "redacted to typed placeholders before training (the files are unchanged)"
    else:
        done = "trained on as written" if record.get("total") else "nothing to redact"
    unseen = ", ".join(record.get("not_detected") or {})
    return f"{counts} in {record.get('records')} records (data.pii: {policy}): {done}" + (
        f"; not detected: {unseen}" if unseen else ""
    )


def _plain(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _metrics_table(rows: list[dict[str, Any]], primary: str) -> str:
    body = []
    for row in rows:
        verdict = {True: "better", False: "worse", None: "same"}[row["improved"]] if "improved" in row else ""
        arrow = "↑" if row["higher_is_better"] else "↓"
        name = html.escape(row["metric"]) + (" <span class=tag>primary</span>" if row["metric"] == primary else "")
        change = _fmt(row.get("change")) if "change" in row else "–"
        body.append(
            f"<tr class='{verdict}'><td>{name} <span class=dir title='better when {'higher' if row['higher_is_better'] else 'lower'}'>{arrow}</span></td>"
            f"<td>{_fmt(row['before'])}</td><td>{_fmt(row['after'])}</td><td>{change}</td><td>{verdict}</td></tr>"
        )
    return (
        "<table><thead><tr><th>metric</th><th>before</th><th>after</th><th>change</th><th></th></tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def loss_curve_svg(history: list[dict[str, Any]], width: int = 640, height: int = 240) -> str:
    """An inline SVG plot of training loss per step, with held-out loss points when present."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval/eval_loss"]) for r in history if "eval/eval_loss" in r]
    points = train + evals
    if not points:
        return "<p>No training steps were logged.</p>"
    pad = 40
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y: float) -> float:
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in train)
    dots = "".join(
        f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='4' class='eval'><title>step {x}: {y:.4f}</title></circle>"
        for x, y in evals
    )
    axes = (
        f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' class='axis'/>"
        f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{height - pad}' class='axis'/>"
        f"<text x='{pad}' y='{height - 12}'>step {x0}</text><text x='{width - pad}' y='{height - 12}' text-anchor='end'>step {x1}</text>"
        f"<text x='4' y='{pad}'>{y1:.3g}</text><text x='4' y='{height - pad}'>{y0:.3g}</text>"
    )
    legend = f"<text x='{width / 2 - 90}' y='20' class='legend'>— training loss   ● held-out loss</text>"
    return (
        f"<svg role='img' aria-label='loss curve' viewBox='0 0 {width} {height}' width='{width}' height='{height}'>"
        f"{axes}<polyline points='{line}' class='train'/>{dots}{legend}</svg>"
    )


STYLE = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1040px;color:#1d2733;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde3ea;padding-bottom:.3rem}
.sub{color:#5b6b7c;margin-top:0}table{border-collapse:collapse;width:100%;margin:.5rem 0}
th,td{padding:.35rem .6rem;border-bottom:1px solid #e8edf2;text-align:left;vertical-align:top}th{background:#f5f7fa}
tr.better td:last-child{color:#12805c;font-weight:600}tr.worse td:last-child{color:#b42318;font-weight:600}
.tag{font-size:.7rem;background:#e0ecff;color:#1f4fa3;border-radius:3px;padding:0 .3rem}.dir{color:#8795a5}
svg .axis{stroke:#9aa7b4}svg .train{fill:none;stroke:#1f6feb;stroke-width:2}svg .eval{fill:#e8590c}svg text{font-size:11px;fill:#5b6b7c}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}dt{color:#5b6b7c}dd{margin:0;word-break:break-all}
code{background:#f5f7fa;padding:0 .25rem;border-radius:3px}
.warning{background:#fdecea;border:2px solid #b42318;border-radius:6px;padding:.2rem 1rem;color:#7a1a12;font-weight:600}
.warning pre{white-space:pre-wrap;font:inherit}
"""


def _render_html(
    report: dict[str, Any], manifest: dict[str, Any], history: list[dict], sections: list[tuple[str, str]]
) -> str:
    training = report.get("training") or {}
    data = manifest.get("data", {})
    facts = {
        "modality": report["modality"],
        "base": report.get("base"),
        "method": (manifest.get("config", {}).get("peft") or {}).get("method"),
        "trainable parameters": (manifest.get("adapter") or {}).get("parameters", {}).get("trainable"),
        "steps": training.get("steps"),
        "training time (s)": training.get("seconds"),
        "stopped early": training.get("stopped_early"),
        "train / held-out samples": f"{data.get('counts', {}).get('train')} / {data.get('counts', {}).get('validation')}",
        "data fingerprint": (data.get("fingerprint") or {}).get("sha256"),
        "personal data": pii_words(pii) if (pii := (data.get("details") or {}).get("pii")) else None,
    }
    fact_html = "".join(f"<dt>{html.escape(k)}</dt><dd>{_fmt(v)}</dd>" for k, v in facts.items() if v is not None)
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>polyadapt report: {html.escape(report['modality'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>polyadapt report</h1><p class=sub>{html.escape(str(report.get('base')))} → adapted ({html.escape(report['modality'])})</p>",
        *(
            [f"<div class=warning role=alert><pre>{html.escape(report['warning'].strip('!').strip())}</pre></div>"]
            if report.get("warning")
            else []
        ),
        "<h2>Held-out metrics, before vs after</h2>",
        _metrics_table(report["metrics"], report["primary_metric"]),
    ]
    if report.get("evaluated_on"):
        ev = report["evaluated_on"]
        parts.append(
            f"<p class=sub>Evaluated on <code>{html.escape(ev['data'])}</code> ({ev['samples']} samples) at {html.escape(ev['when'])}.</p>"
        )
    if report.get("general_metrics"):
        parts += [
            "<h2>Forgetting check (general data)</h2>",
            _metrics_table(report["general_metrics"], report["primary_metric"]),
        ]
    parts += ["<h2>Loss curve</h2>", loss_curve_svg(history), "<h2>Run</h2>", f"<dl>{fact_html}</dl>"]
    for title, body in sections:
        parts += [f"<h2>{html.escape(title)}</h2>", body]
    parts.append("</body></html>")
    return "\n".join(parts)
