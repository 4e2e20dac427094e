"""Plugin discovery, isolation of a broken plugin, restrict/disable by environment variable, hook validation."""

from __future__ import annotations

import json

import pluggy
import pytest

from polyadapt import hookimpl
from polyadapt.errors import PluginError
from polyadapt.plugins import build_plugin_manager

from .conftest import run_cli


def test_toy_plugin_is_discovered_through_its_entry_point(toy_plugins):
    pm = build_plugin_manager()
    assert pm.infos["toy"].status == "loaded"
    assert pm.infos["toy"].distribution == "polyadapt-toy"
    assert "toy" in pm.modalities
    assert pm.infos["toy"].modalities == ["toy"]
    assert {"register_modalities", "register_export_formats", "training_callbacks"} <= set(pm.infos["toy"].hooks)


def test_a_plugin_that_fails_to_import_is_isolated(toy_plugins):
    pm = build_plugin_manager()
    broken = pm.infos["broken"]
    assert broken.status == "failed"
    assert "polyadapt_dependency_that_does_not_exist" in broken.error
    assert "pip install" in broken.hint
    assert pm.get_modality("toy").name == "toy"  # the others still work


def test_plugins_command_shows_the_failed_plugin_with_error_and_hint(toy_plugins):
    result = run_cli("plugins", "--json", check=True)
    infos = {i["name"]: i for i in json.loads(result.stdout)}
    assert infos["toy"]["status"] == "loaded" and infos["toy"]["modalities"] == ["toy"]
    assert infos["broken"]["status"] == "failed"
    text = run_cli("plugins", check=True).stdout
    assert "broken 0.1.0 [failed]" in text and "hint: missing module" in text


def test_restrict_loading_with_polyadapt_plugins(toy_plugins, monkeypatch):
    monkeypatch.setenv("POLYADAPT_PLUGINS", "toy")
    pm = build_plugin_manager()
    assert pm.infos["toy"].status == "loaded"
    assert pm.infos["broken"].status == "skipped"
    assert all(i.status == "skipped" for n, i in pm.infos.items() if n != "toy")
    assert list(pm.modalities) == ["toy"]


def test_disable_autoload(toy_plugins, monkeypatch):
    monkeypatch.setenv("POLYADAPT_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = build_plugin_manager()
    assert pm.modalities == {}
    assert {i.status for i in pm.infos.values()} == {"skipped"}


def test_missing_modality_error_names_installed_ones_and_the_package(toy_plugins):
    pm = build_plugin_manager()
    with pytest.raises(PluginError) as err:
        pm.get_modality("video")
    assert "toy" in str(err.value) and "pip install polyadapt-video" in str(err.value)
    with pytest.raises(PluginError, match="failed to load"):
        pm.get_modality("broken")


class MisspelledPlugin:
    @hookimpl
    def register_modality(self, register):  # the hook is register_modalities
        pass


class WrongParameterPlugin:
    @hookimpl
    def register_modalities(self, registry):
        pass


@pytest.mark.parametrize("plugin", [MisspelledPlugin(), WrongParameterPlugin()])
def test_check_pending_catches_misspelled_hook_implementations(plugin):
    pm = build_plugin_manager(load_entry_points=False)
    with pytest.raises(pluggy.PluginValidationError):
        pm.register(plugin)
        pm.check_pending()


def test_misspelled_entry_point_plugin_is_reported_failed(toy_plugins, tmp_path, monkeypatch):
    (tmp_path / "polyadapt_typo.py").write_text(
        "from polyadapt import hookimpl\n\n@hookimpl\ndef register_modality(register):\n    pass\n"
    )
    info = tmp_path / "polyadapt_typo-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: polyadapt-typo\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[polyadapt]\ntypo = polyadapt_typo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = build_plugin_manager()
    assert pm.infos["typo"].status == "failed"
    assert "register_modality" in pm.infos["typo"].error
    assert pm.infos["toy"].status == "loaded"


def test_plugin_commands_are_added_to_the_cli(toy_plugins):
    assert run_cli("toy-hello", check=True).stdout.strip() == "hello from toy"
