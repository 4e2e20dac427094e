"""The speech sections of report.html: reference, base and adapted transcripts of a few held-out clips."""

from __future__ import annotations

import html
from pathlib import Path

from polyadapt.modality import EvalResult

from .metrics import marked_diff

#: clips shown in report.html with reference / base / adapted transcripts
REPORT_CLIPS = 5


def transcript_sections(before: EvalResult | None, after: EvalResult) -> list[tuple[str, str]]:
    """One "Transcripts" section: the first held-out clips, the words that differ from the reference marked."""
    base = {e["file"]: e["prediction"] for e in before.examples} if before else {}
    rows = []
    for example in after.examples[:REPORT_CLIPS]:
        name = html.escape(Path(example["file"]).name)
        reference = html.escape(example["reference"])
        was = marked_diff(example["reference"], base[example["file"]]) if example["file"] in base else "&mdash;"
        now = marked_diff(example["reference"], example["prediction"])
        rows.append(f"<tr><td>{name}</td><td>{reference}</td><td>{was}</td><td>{now}</td></tr>")
    table = (
        "<p>Transcripts are normalised as scored. <mark>marked</mark>: words that differ from the reference; "
        "<del>struck</del>: reference words that are missing.</p>"
        "<table><tr><th>clip</th><th>reference</th><th>base</th><th>adapted</th></tr>" + "".join(rows) + "</table>"
    )
    return [("Transcripts", table)]
