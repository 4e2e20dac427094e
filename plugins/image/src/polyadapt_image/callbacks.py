"""Training callbacks of the image plugin: validation image grids at every periodic evaluation."""

from __future__ import annotations

from typing import Any


class ValidationGrids:
    """At each ``train.eval_every`` evaluation, saves ``validation/step-NNNNNN.png`` (the fixed prompts and seeds)."""

    def on_evaluate(self, state: Any, metrics: dict[str, float]) -> None:
        from polyadapt.plugins import get_plugin_manager

        get_plugin_manager().get_modality("image").save_progress_grid(state.step)
