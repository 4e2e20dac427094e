"""Packaging promises: importing polyadapt is light, and core + one plugin work without the other plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

HEAVY = ("transformers", "diffusers", "librosa", "torchaudio")


def run_python(code: str, *, isolated_site: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("PYTHONPATH", None)
    if isolated_site is None:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    prelude = f"import site; site.addsitedir({str(isolated_site)!r}); "
    return subprocess.run(
        [sys.executable, "-s", "-S", "-c", prelude + code], capture_output=True, text=True, env=env, timeout=300
    )


def test_importing_polyadapt_and_loading_every_plugin_imports_no_modality_library():
    code = (
        "import sys, json, polyadapt, polyadapt.cli\n"
        "from polyadapt.plugins import get_plugin_manager\n"
        "pm = get_plugin_manager(); pm.modalities\n"
        f"print(json.dumps([m for m in {HEAVY!r} + ('torch',) if m in sys.modules]))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_cli_help_is_fast_to_start():
    # Not a timing assertion: a proxy that cannot be noisy, the modules `--help` pulls in.
    code = (
        "import sys\nfrom polyadapt.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'diffusers', 'numpy') if m in sys.modules))"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_core_plus_text_alone_lists_one_plugin_and_imports_no_other_modality_library(tmp_path):
    """A site directory holding everything installed except the speech and image plugins."""
    site = tmp_path / "site"
    site.mkdir()
    purelib = Path(sysconfig.get_paths()["purelib"])
    for entry in purelib.iterdir():
        if "polyadapt_speech" in entry.name or "polyadapt_image" in entry.name:
            continue
        (site / entry.name).symlink_to(entry)
    listing = run_python("from polyadapt.cli import main; main(['plugins', '--json'])", isolated_site=site)
    assert listing.returncode == 0, listing.stderr
    plugins = {p["name"]: p for p in json.loads(listing.stdout)}
    assert set(plugins) == {"text"} and plugins["text"]["status"] == "loaded"
    assert plugins["text"]["modalities"] == ["text"]
    code = (
        "import sys, json, importlib, pkgutil\n"
        "import polyadapt_text\n"
        "for m in pkgutil.iter_modules(polyadapt_text.__path__): importlib.import_module('polyadapt_text.' + m.name)\n"
        "from polyadapt.plugins import get_plugin_manager\n"
        "get_plugin_manager().get_modality('text')\n"
        "print(json.dumps([m for m in ('diffusers', 'librosa', 'torchaudio', 'polyadapt_speech', 'polyadapt_image') if m in sys.modules]))\n"
    )
    result = run_python(code, isolated_site=site)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
