"""Routes: a `model` name that splits traffic between adapters (and bases) by weight, canary and A/B style.

With ``sticky: user`` the choice is a pure function of the route and the request's ``user``, so one user always gets
the same target while the weights stay the same; otherwise (or without ``user``) it is drawn at random. Every decision
is logged (logger ``polyadapt.serve.routes``) and counted (``polyadapt_route_decisions_total``).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("polyadapt.serve.routes")


@dataclass(frozen=True)
class Decision:
    route: str
    target: str
    user: str | None
    sticky: bool


class Route:
    """One route: targets with normalised weights, in the order given."""

    def __init__(self, name: str, split: dict[str, float], sticky: str | None = None) -> None:
        total = sum(split.values())
        if not split or total <= 0:
            raise ValueError(f"route {name}: give targets with positive weights")
        self.name = name
        self.targets = list(split)
        self.weights = [w / total for w in split.values()]
        self.sticky = sticky

    def pick(self, point: float) -> str:
        """The target whose cumulative weight interval holds ``point`` (in [0, 1))."""
        edge = 0.0
        for target, weight in zip(self.targets, self.weights, strict=True):
            edge += weight
            if point < edge:
                return target
        return self.targets[-1]


class Router:
    """Decides the target of a request to a route.

    :param rng: the source of non-sticky draws (``random.random`` by default; tests pass a seeded one).
    :param on_decision: called with every :class:`Decision` (metrics).
    """

    def __init__(
        self,
        routes: dict[str, Route],
        rng: Callable[[], float] | None = None,
        on_decision: Callable[[Decision], None] | None = None,
    ) -> None:
        self.routes = routes
        self.rng = rng or random.random
        self.on_decision = on_decision

    def __contains__(self, name: str) -> bool:
        return name in self.routes

    def decide(self, name: str, user: str | None = None) -> Decision:
        route = self.routes[name]
        sticky = route.sticky == "user" and bool(user)
        point = sticky_point(name, user) if sticky else self.rng()
        decision = Decision(route=name, target=route.pick(point), user=user, sticky=sticky)
        log.info("route %s -> %s (user %s, %s)", name, decision.target, user or "-", "sticky" if sticky else "drawn")
        if self.on_decision is not None:
            self.on_decision(decision)
        return decision


def sticky_point(route: str, user: str | None) -> float:
    """A point in [0, 1) that depends only on the route and the user (sha256 of both)."""
    digest = hashlib.sha256(f"{route}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
