"""Authentication as FastAPI dependencies: ``Authorization: Bearer KEY`` -> the tenant (or the admin).

Keys are compared in constant time (:func:`hmac.compare_digest`) against every tenant's key, all of them each time,
so neither a key's content nor which tenant it belongs to can be timed.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import invalid_key


class Keyring:
    def __init__(self, tenants: dict[str, str], admin: str | None) -> None:
        self._tenants = [(name, key.encode()) for name, key in tenants.items()]
        self._admin = admin.encode() if admin else None

    def tenant(self, presented: str | None) -> str | None:
        """The tenant whose key ``presented`` is, or None."""
        if not presented:
            return None
        given = presented.encode()
        found = None
        for name, key in self._tenants:
            if hmac.compare_digest(given, key):
                found = name
        return found

    def is_admin(self, presented: str | None) -> bool:
        if not presented or self._admin is None:
            return False
        return hmac.compare_digest(presented.encode(), self._admin)


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def tenant(request: Request) -> str:
    """Dependency: the calling tenant; 401 without a valid key."""
    found = request.app.state.keyring.tenant(bearer(request))
    if found is None:
        raise invalid_key()
    return found


def admin(request: Request) -> None:
    """Dependency: the admin key; 401 otherwise (also when the server has no admin key)."""
    if not request.app.state.keyring.is_admin(bearer(request)):
        raise invalid_key()
