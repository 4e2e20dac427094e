"""Names and references of the registry (``NAME``, ``NAME@vN``, ``NAME@alias``): light, no database imports."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import RegistryError

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
VERSION = re.compile(r"^v([1-9][0-9]*)$")
#: what a stored file may be called: a plain file name, never a path
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.(safetensors|json)$")
LATEST = "latest"


# -- references ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ref:
    """``NAME@vN``, ``NAME@alias`` or ``NAME`` (the latest version)."""

    name: str
    ref: str = LATEST

    @property
    def version(self) -> int | None:
        match = VERSION.match(self.ref)
        return int(match.group(1)) if match else None

    def __str__(self) -> str:
        return f"{self.name}@{self.ref}"


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise RegistryError(
            f"{what} {name!r} is not allowed: use lower-case letters, digits, '.', '_' and '-', starting with a "
            "letter or digit (at most 128 characters)"
        )
    return name


def check_alias(alias: str) -> str:
    check_name(alias, "alias")
    if VERSION.match(alias) or alias == LATEST:
        raise RegistryError(f"alias {alias!r} is reserved (vN names a version, 'latest' the newest one)")
    return alias


def parse_ref(text: str) -> Ref:
    """Parse ``NAME@REF``; a bad name or reference is a :class:`RegistryError` saying what is allowed."""
    name, _, ref = str(text).partition("@")
    check_name(name)
    if not ref:
        return Ref(name)
    if not (VERSION.match(ref) or ref == LATEST):
        check_alias(ref)
    return Ref(name, ref)


def looks_like_ref(text: str | Path) -> bool:
    """Whether ``text`` is meant as a registry reference: ``NAME@REF`` that is not an existing path."""
    value = str(text)
    return "@" in value and "/" not in value and not Path(value).exists()
