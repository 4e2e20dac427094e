"""The plugin manager: one cached factory, entry points loaded one by one, restrict/disable by environment variable.

Environment variables:

``POLYADAPT_PLUGINS``
    comma-separated entry point names to load (for example ``text,image``); the others are not imported.
``POLYADAPT_DISABLE_PLUGIN_AUTOLOAD``
    when set to a non-empty value other than ``0``, no entry point is loaded (plugins can still be registered in code).
"""

from __future__ import annotations

import importlib.metadata
import os
import traceback
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import PluginError

if TYPE_CHECKING:
    from .evaluation import Metric
    from .export import ExportFormat
    from .modality import Modality
    from .serve.backend import BackendSpec

ENTRY_POINT_GROUP = "polyadapt"


@dataclass
class PluginInfo:
    """What ``polyadapt plugins`` reports about one plugin."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    status: str  # "loaded" | "failed" | "skipped" | "builtin"
    error: str | None = None
    hint: str | None = None
    modalities: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class PolyadaptPluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers the plugins that failed to load or were skipped."""

    def __init__(self) -> None:
        super().__init__("polyadapt")
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._modalities: dict[str, Modality] | None = None

    # -- loading -----------------------------------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        disabled = os.environ.get("POLYADAPT_DISABLE_PLUGIN_AUTOLOAD", "").strip() not in ("", "0")
        wanted_raw = os.environ.get("POLYADAPT_PLUGINS")
        wanted = {w.strip() for w in wanted_raw.split(",") if w.strip()} if wanted_raw is not None else None
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                module=ep.value,
                distribution=dist.metadata["Name"] if dist else None,
                version=dist.version if dist else None,
                status="loaded",
            )
            self.infos[ep.name] = info
            if disabled or (wanted is not None and ep.name not in wanted):
                info.status = "skipped"
                info.hint = (
                    "POLYADAPT_DISABLE_PLUGIN_AUTOLOAD is set" if disabled else "not listed in POLYADAPT_PLUGINS"
                )
                continue
            try:
                module = ep.load()
                self.register(module, name=ep.name)
                try:
                    self.check_pending()
                except pluggy.PluginValidationError:
                    self.unregister(module)
                    raise
            except Exception as exc:  # one broken plugin must not break the others
                info.status = "failed"
                info.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                missing = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
                package = info.distribution or f"polyadapt-{ep.name}"
                info.hint = (
                    f"missing module {missing!r}: pip install --upgrade {package}"
                    if missing
                    else "a hook implementation has a misspelled name or parameter"
                    if isinstance(exc, pluggy.PluginValidationError)
                    else f"reinstall or fix the plugin: pip install --force-reinstall {package}"
                )
                continue
            info.hooks = sorted(h.name for h in self.get_hookcallers(module) or [])

    def register_builtin(self) -> None:
        from . import builtin

        self.register(builtin, name="polyadapt.builtin")

    # -- registries --------------------------------------------------------------------------------------------------
    @property
    def modalities(self) -> dict[str, Modality]:
        if self._modalities is None:
            found: dict[str, Modality] = {}
            owners: dict[str, str] = {}

            def register(modality: Any) -> None:
                instance = modality() if isinstance(modality, type) else modality
                name = getattr(instance, "name", None)
                if not name:
                    raise PluginError(f"modality {modality!r} has no name")
                if name in found:
                    raise PluginError(f"two plugins register the modality {name!r}: {owners[name]} and {current}")
                from .modality import capability_problems

                problems = capability_problems(instance)
                if problems:
                    raise PluginError("; ".join(problems))
                found[name] = instance
                owners[name] = current

            for impl in reversed(self.hook.register_modalities.get_hookimpls()):
                current = self.get_name(impl.plugin) or repr(impl.plugin)
                before = dict(found)
                try:
                    impl.function(register=register)
                except Exception as exc:  # a plugin whose modality fails to import must not hide the others
                    if current not in self.infos:
                        raise
                    for name in set(found) - set(before):
                        del found[name], owners[name]
                    info = self.infos[current]
                    info.status = "failed"
                    info.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                    info.hint = (
                        f"reinstall or fix the plugin: pip install --force-reinstall {info.distribution or current}"
                    )
                    continue
                if current in self.infos:
                    self.infos[current].modalities.extend(
                        n for n, o in owners.items() if o == current and n not in self.infos[current].modalities
                    )
            self._modalities = found
        return self._modalities

    def get_modality(self, name: str) -> Modality:
        modalities = self.modalities
        if name in modalities:
            return modalities[name]
        installed = ", ".join(sorted(modalities)) or "none"
        message = f"modality {name!r} is not installed (installed: {installed})"
        info = self.infos.get(name)
        if info and info.status == "failed":
            message += f"; the plugin {name!r} failed to load: {info.error} ({info.hint})"
        elif info and info.status == "skipped":
            message += f"; the plugin {name!r} was skipped: {info.hint}"
        else:
            message += f"; install it with: pip install polyadapt-{name}"
        raise PluginError(message)

    def metrics(self, modality: str) -> list[Metric]:
        collected: list[Metric] = []
        self.hook.register_metrics(register=collected.append)
        return [m for m in collected if m.modality in (None, modality)]

    def export_formats(self, modality: str) -> dict[str, ExportFormat]:
        collected: list[ExportFormat] = []
        self.hook.register_export_formats(register=collected.append)
        return {f.name: f for f in collected if f.modality in (None, modality)}

    def serving_backends(self) -> dict[str, BackendSpec]:
        """The serving backend of each modality that has one (``register_serving_backends``), by modality name."""
        collected: list[BackendSpec] = []
        self.hook.register_serving_backends(register=collected.append)
        found: dict[str, BackendSpec] = {}
        for spec in collected:
            if spec.modality in found:
                raise PluginError(f"two plugins register a serving backend for the modality {spec.modality!r}")
            found[spec.modality] = spec
        return found

    def callbacks(self, config: Any) -> list[Any]:
        found: list[Any] = []
        for result in self.hook.training_callbacks(config=config):
            found.extend(result or [])
        return found


def build_plugin_manager(load_entry_points: bool = True) -> PolyadaptPluginManager:
    """Build a fresh manager (tests use this; everything else uses :func:`get_plugin_manager`)."""
    pm = PolyadaptPluginManager()
    pm.register_builtin()
    if load_entry_points:
        pm.load_entry_points()
    pm.check_pending()
    return pm


@lru_cache(maxsize=1)
def get_plugin_manager() -> PolyadaptPluginManager:
    """The process-wide plugin manager, built once."""
    return build_plugin_manager()


def reset_plugin_manager() -> None:
    """Forget the cached manager, so the next :func:`get_plugin_manager` reloads (after changing env vars)."""
    get_plugin_manager.cache_clear()
