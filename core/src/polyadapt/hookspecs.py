"""Every extension point of polyadapt.

This module is the plugin author's manual. A plugin is a Python module (usually ``<package>.plugin``) exposed through
an entry point in the group ``polyadapt``::

    [project.entry-points.polyadapt]
    text = "polyadapt_text.plugin"

and implements any of the hooks below with ``@polyadapt.hookimpl``. Implementations may accept a subset of a hook's
parameters (pluggy passes them by name). Hook implementation modules must stay cheap to import: import torch,
transformers and friends inside functions, not at module level, so ``polyadapt --help`` stays fast.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("polyadapt")
hookimpl = pluggy.HookimplMarker("polyadapt")


@hookspec
def register_modalities(register):
    """Register the modality implementations this plugin provides.

    A modality is a stateless factory (:class:`polyadapt.modality.Modality`): it declares its config section, metrics,
    PEFT methods and optional capabilities, reads and validates data without a model, and opens one
    :class:`polyadapt.modality.ModalityRun` per run (``open(ctx)``), which loads the base, prepares and collates
    batches, computes the loss, evaluates and saves/loads adapters, with every piece of per-run state as its own
    attributes. ``polyadapt.testing`` is the conformance suite a modality should pass.

    :param register: a callable taking one :class:`polyadapt.modality.Modality` subclass (or instance). Its ``name``
        (for example ``"text"``) is what a config's ``modality:`` key selects and the name of the config section whose
        schema the modality contributes (``settings_model``). Registering two modalities with one name is an error, and
        so is declaring a capability whose protocol the ``run_class`` does not implement.
    :return: nothing; the return value is ignored.
    """


@hookspec
def register_metrics(register):
    """Contribute extra evaluation metrics, computed before and after adaptation on the held-out examples.

    :param register: a callable taking one :class:`polyadapt.evaluation.Metric`: a name, the modality it applies to
        (``None`` for all), whether higher is better, and ``compute(examples) -> float`` where ``examples`` is the list
        of per-sample records the modality's ``evaluate`` produced (for text and speech each record has at least
        ``"prediction"`` and ``"reference"`` strings).
    :return: nothing; the return value is ignored.
    """


@hookspec
def training_callbacks(config):
    """Return callbacks that observe the shared training loop (experiment trackers, alerts, custom logging).

    :param config: the validated, frozen :class:`polyadapt.config.AdaptConfig` of the run.
    :return: a list of callback objects, or ``None``. A callback implements any subset of these methods, each called on
        the main process only: ``on_train_begin(state)``, ``on_log(state, logs)`` (after each logged optimizer step),
        ``on_evaluate(state, metrics)``, ``on_save(state, checkpoint_dir)``, ``on_train_end(state)``. ``state`` is a
        :class:`polyadapt.training.TrainState` (step, epoch, best metric...); ``logs`` and ``metrics`` are dicts of
        floats. A callback must not change the state.
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``polyadapt`` command line.

    :param cli: the root :class:`click.Group`. Add commands with ``@cli.command()`` or ``cli.add_command(...)``.
        Raise :class:`polyadapt.errors.PolyadaptError` subclasses for user errors: the CLI turns them into one line
        and exit code 2.
    :return: nothing; the return value is ignored.
    """


@hookspec
def register_export_formats(register):
    """Contribute export formats for ``polyadapt export RUN_DIR --format NAME --output DIR``.

    :param register: a callable taking one :class:`polyadapt.export.ExportFormat`: ``name`` (``"merged"``, ``"ct2"``,
        ``"kohya"``...), the ``modality`` it applies to, one line of ``help``, and
        ``export(run, output_dir) -> dict``, where ``run`` is a :class:`polyadapt.lifecycle.LoadedRun` (config,
        typed manifest, modality, and ``run.run``: the modality's run object with the adapter attached) and ``output_dir`` a new, empty directory. The returned dict (for example
        a measured parity gap) is written to ``export.json`` beside the exported files. Raise
        :class:`polyadapt.errors.ExportError` to refuse an export; the output directory is then removed.
    :return: nothing; the return value is ignored.
    """


@hookspec(firstresult=True)
def resolve_base(reference):
    """Turn the config's ``base`` reference into something the modality's loader understands.

    polyadapt itself resolves ``pkg://<package>/<path>`` (a file or directory shipped inside an installed Python
    package, located without importing the package) and local paths. A plugin can add schemes, for example an internal
    model registry.

    :param reference: the ``base`` string from the config.
    :return: a :class:`polyadapt.config.ResolvedBase` (a local path, or a hub id to pass through), or ``None`` if this
        implementation does not handle the reference. Stops at first non-None result.
    """


@hookspec
def register_serving_backends(register):
    """Contribute what ``polyadapt serve`` needs to serve a modality: the backend that batches its requests.

    :param register: a callable taking one :class:`polyadapt.serve.backend.BackendSpec`: the ``modality`` it serves,
        the OpenAI ``endpoints`` it answers (``"completions"``, ``"chat"``, ``"transcriptions"``, ``"images"``) and
        ``factory(context) -> ServingBackend``, called once per configured base with a
        :class:`polyadapt.serve.backend.BackendContext` (the base's loaded run, its config and the server limits).
        The factory imports the modality's libraries when it is called, not when the plugin loads. A backend owns the
        loaded base on one worker thread: it attaches and detaches adapters by slot name and runs the scheduler's
        batches (``admit(jobs)`` then ``step()``), in which rows may use different adapters.
    :return: nothing; the return value is ignored.
    """
