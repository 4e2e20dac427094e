"""What the text modality adds to a run's reports: the answers section of report.html (held-out questions answered by
the base and the adapted model) and the model card's loading snippet."""

from __future__ import annotations

import html
from pathlib import Path

from polyadapt.errors import ConfigError
from polyadapt.modality import EvalResult

#: how many held-out questions the report shows
SHOWN = 5


def answer_table(before: EvalResult | None, after: EvalResult) -> list[tuple[str, str]]:
    """One section: question, reference, base answer and adapted answer for the first held-out questions (none when
    answers were not generated)."""
    if not after.examples:
        return []
    previous = {e["prompt"]: e for e in (before.examples if before else [])}
    rows = []
    for example in after.examples[:SHOWN]:
        old = previous.get(example["prompt"], {})
        cells = [example["prompt"], example["reference"], old.get("prediction", "—"), example["prediction"]]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    table = (
        "<table><thead><tr><th>question</th><th>reference</th><th>base</th><th>adapted</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    return [("Sample answers: base vs adapted", table)]


def compliance_table(before: EvalResult | None, after: EvalResult) -> list[tuple[str, str]]:
    """One section for preference runs: every held-out risky prompt, its rule, and the answers before and after
    training, each marked as complying with the rule or not."""
    previous = {e["prompt"]: e for e in (before.examples if before else [])}

    def answer(example: dict | None) -> str:
        if not example:
            return "—"
        mark = "complies" if example["complies"] else "does not comply"
        return f"{html.escape(example['prediction'])}<br><em>{mark}</em>"

    rows = []
    for example in after.examples:
        rule = "; ".join(
            [*(["one of: " + ", ".join(example["require_any"])] if example["require_any"] else []),
             *(["none of: " + ", ".join(example["forbid"])] if example["forbid"] else [])]
        )  # fmt: skip
        cells = [html.escape(example["prompt"]), html.escape(rule), answer(previous.get(example["prompt"])),
                 answer(example)]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table = (
        "<table><thead><tr><th>held-out prompt</th><th>rule</th><th>before</th><th>after</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    return [("Held-out risky prompts: before vs after", table)]


def usage_snippet(run_dir: Path, base: str) -> str:
    """Markdown: loading the run's adapter with transformers and peft alone, onto the base as polyadapt loaded it
    (float32; a GGUF file dequantised)."""
    run = str(Path(run_dir).resolve())
    gguf = _gguf_file(base)
    if gguf is None:
        local = Path(base).expanduser()
        where = repr(str(local.resolve()) if local.exists() else base)
        imports = "from transformers import AutoModelForCausalLM, AutoTokenizer"
        load = (
            f'base = AutoModelForCausalLM.from_pretrained({where}, dtype="float32")\n'
            f"tokenizer = AutoTokenizer.from_pretrained({where})"
        )
        note = ""
    else:
        path, origin = gguf
        imports = "from pathlib import Path\n\nfrom transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig"
        load = (
            f"gguf = Path({path!r})\n"
            "base = AutoModelForCausalLM.from_pretrained(\n"
            '    gguf.parent, gguf_file=gguf.name, dtype="float32",\n'
            "    quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),\n"
            ")\n"
            "tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)"
        )
        note = f"The base is a GGUF file{origin}, dequantised by transformers (it needs `pip install gguf`).\n\n"
    return (
        f"{note}```python\n{imports}\nfrom peft import PeftModel\n\n{load}\n"
        f"model = PeftModel.from_pretrained(base, {run!r})\n```"
    )


def _gguf_file(base: str) -> tuple[str, str] | None:
    """The absolute path of the base's GGUF file and where it comes from in words, or None for other bases."""
    from polyadapt.builtin import PKG_SCHEME, locate_package_file

    if not base.lower().endswith(".gguf"):
        return None
    if base.startswith(PKG_SCHEME):
        package = base[len(PKG_SCHEME) :].partition("/")[0]
        try:
            return str(locate_package_file(base)), f" shipped in the {package} package"
        except ConfigError:
            return base, f" of the {package} package (not installed here)"
    return str(Path(base).expanduser().resolve()), ""
