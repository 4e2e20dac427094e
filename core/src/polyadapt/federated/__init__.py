"""Federated LoRA: sites train the same adapter on their own data, only adapter updates travel, and the server's
aggregate is the next round's start (``polyadapt federate``).

- :mod:`.aggregate`: the three aggregators (``ffa`` and ``stack`` exact, ``fedavg`` inexact) and the measured distance
  of an aggregate from the exact weighted mean of the sites' updates;
- :mod:`.privacy`: client-side clipping and Gaussian noise, and the (epsilon, delta) budget by RDP accounting;
- :mod:`.model`: the adapter on a PEFT model as plain factors;
- :mod:`.simulation`: sites (:class:`~.simulation.SiteClient`) and the in-process transport;
- :mod:`.recipe`: the command as phases (:class:`~.recipe.FederatedRecipe`, :func:`~.recipe.federate`);
- :mod:`.cli`: the ``federate`` command.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FederatedRecipe", "federate"]


def __getattr__(name: str) -> Any:
    # the recipe imports the modality machinery; `import polyadapt.federated` stays light
    if name in __all__:
        from . import recipe

        return getattr(recipe, name)
    raise AttributeError(name)
