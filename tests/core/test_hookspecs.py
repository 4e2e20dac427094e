"""The hook specifications are the plugin author's manual: every hook fully documented, here and in the README."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from polyadapt import hookspecs

README = Path(__file__).parents[2] / "README.md"
HOOKS = [(name, fn) for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "polyadapt_spec")]


def test_there_are_hooks_for_every_extension_point():
    names = {name for name, _ in HOOKS}
    assert {
        "register_modalities", "register_metrics", "training_callbacks", "register_commands",
        "register_export_formats", "resolve_base",
    } <= names  # fmt: skip


@pytest.mark.parametrize("name,fn", HOOKS, ids=[n for n, _ in HOOKS])
def test_every_hookspec_documents_purpose_parameters_and_return(name, fn):
    doc = inspect.getdoc(fn) or ""
    assert len(doc.splitlines()[0]) > 20, f"{name}: the first line should say what the hook is for"
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc, f"{name}: parameter {param!r} is not documented"
    assert ":return:" in doc, f"{name}: the return value is not documented"
    if fn.polyadapt_spec.get("firstresult"):
        assert "Stops at first non-None result" in doc, f"{name}: firstresult hooks must say so"


@pytest.mark.parametrize("name", [n for n, _ in HOOKS])
def test_every_hook_is_documented_in_the_readme(name):
    assert f"`{name}(" in README.read_text(), f"README.md does not document the hook {name}"
