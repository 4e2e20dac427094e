"""``polyadapt tune``: a hyperparameter search in which every trial is a normal ``adapt`` run.

Each trial is :class:`polyadapt.recipe.AdaptRecipe` on the base config with the sampled values written in, with its
own run directory and manifest, scored on the held-out metric of that manifest (``metrics.after``): the modality's
headline metric (:meth:`polyadapt.modality.Modality.headline_metric`), decided by the first trial that completes and
then used for every trial; its direction is the modality's (``higher_is_better``).

**Search space** (``--search``, default all three):

* ``lr``: ``train.lr``, log-uniform in [1e-5, 1e-2];
* ``r``: ``peft.r``, one of 4, 8, 16, 32, with ``peft.alpha = 2 r`` (the LoRA scale stays 2);
* ``epochs``: ``train.epochs``, an integer in [1, 10] (``train.max_steps`` is cleared).

**Layout.** For a config whose ``output`` is ``O``, everything goes into the sibling directory ``O-tune/``:
``study.db`` (the Optuna study, SQLite), ``trial-000/``, ``trial-001/``... (the trials' run directories),
``trials.json`` (every trial: number, params, value, state, run directory, seconds, error) and ``best.yaml`` (the
base config with the best trial's values written in and ``output`` still ``O``: ``polyadapt adapt O-tune/best.yaml``
trains the winner).

**Resuming.** ``O-tune/`` holds one study, of one base config (the YAML after ``--set``) and search space; the same
command again resumes it: finished trials are kept (a failed trial counts as finished: those values fail), trials
a killed process left running are marked failed and their values run again as a new trial, and only the missing
number of trials runs. A different config or search space for the same output is refused. One ``tune`` at a time
may use a study (``O-tune/.lock``).

**Backends.** ``optuna`` (default): the trials run one after the other in this process, values sampled by Optuna's
TPE sampler seeded from ``train.seed``. ``ray``: the same study is driven by Ray Tune (``OptunaSearch`` on the same
``study.db``), trials run in parallel on Ray workers, one CPU (and one GPU when the cluster has them) each, on a local
Ray instance started for the search or on the cluster at ``ray_address``; the outputs are the same.

Optuna stores an *objective to minimise*: the metric itself when lower is better, its negative when higher is better
(the direction is only known once the first trial has reported its metrics, and an Optuna study's direction is fixed
when it is created). ``trials.json``, ``best.yaml`` and the table hold the metric's real values.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .config import apply_overrides, read_yaml, validate_config
from .errors import PolyadaptError, TuneError
from .manifest import write_json_atomic

if TYPE_CHECKING:
    from .plugins import PolyadaptPluginManager

INSTALL_HINT = "pip install 'polyadapt[tune]'"
BACKENDS = ("optuna", "ray")
TRIALS_JSON = "trials.json"
BEST_YAML = "best.yaml"
STUDY_DB = "study.db"
#: the value reported to Optuna and Ray Tune (always minimised; see the module docstring)
OBJECTIVE = "objective"
INTERRUPTED = "interrupted: the tune process stopped during this trial; its values run again as a new trial"


# -- the search space ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchParam:
    """One searchable value: how Optuna samples it, and the config overrides a sampled value becomes."""

    name: str
    description: str
    suggest: Callable[[Any], Any]
    overrides: Callable[[Any], list[str]]


SEARCH_SPACE: dict[str, SearchParam] = {
    p.name: p
    for p in (
        SearchParam(
            "lr",
            "train.lr, log-uniform in [1e-5, 1e-2]",
            lambda trial: trial.suggest_float("lr", 1e-5, 1e-2, log=True),
            lambda value: [f"train.lr={value!r}"],
        ),
        SearchParam(
            "r",
            "peft.r in {4, 8, 16, 32}, with peft.alpha = 2 r",
            lambda trial: trial.suggest_categorical("r", [4, 8, 16, 32]),
            lambda value: [f"peft.r={value}", f"peft.alpha={2 * value}"],
        ),
        SearchParam(
            "epochs",
            "train.epochs, an integer in [1, 10] (train.max_steps cleared)",
            lambda trial: trial.suggest_int("epochs", 1, 10),
            lambda value: [f"train.epochs={value}", "train.max_steps=null"],
        ),
    )
}
DEFAULT_SEARCH = tuple(SEARCH_SPACE)


def parse_search(search: str | Sequence[str]) -> tuple[str, ...]:
    """``"lr,r"`` or ``["lr", "r"]`` as names of :data:`SEARCH_SPACE`; an unknown name is a :class:`TuneError`."""
    parts = search.split(",") if isinstance(search, str) else list(search)
    names = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    valid = ", ".join(SEARCH_SPACE)
    unknown = [n for n in names if n not in SEARCH_SPACE]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown)
        raise TuneError(f"--search: unknown name{'s' if len(unknown) > 1 else ''} {shown} (valid: {valid})")
    if not names:
        raise TuneError(f"--search: name at least one of {valid}")
    return names


def sample(trial: Any, search: Sequence[str]) -> dict[str, Any]:
    return {name: SEARCH_SPACE[name].suggest(trial) for name in search}


def param_overrides(params: dict[str, Any]) -> list[str]:
    return [o for name, value in params.items() for o in SEARCH_SPACE[name].overrides(value)]


# -- results -------------------------------------------------------------------------------------------------------


@dataclass
class TrialRecord:
    """One trial as ``trials.json`` and the table show it. ``value`` is the study metric's real value."""

    number: int
    params: dict[str, Any]
    state: str  # complete | failed | running | waiting
    run_dir: str
    value: float | None = None
    seconds: float | None = None
    error: str | None = None
    retry_of: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TuneResult:
    """What ``tune`` did: every trial of the study, the best one, and where the outputs are."""

    tune_dir: Path
    study_name: str
    backend: str
    search: tuple[str, ...]
    metric: str | None
    higher_is_better: bool | None
    trials: list[TrialRecord]
    ran: list[int] = field(default_factory=list)
    best: TrialRecord | None = None
    best_config: Path | None = None

    @property
    def trials_json(self) -> Path:
        return self.tune_dir / TRIALS_JSON


@dataclass(frozen=True)
class StudySpec:
    """Everything a trial needs, in the driver or on a Ray worker (so: plain, picklable data)."""

    raw: dict[str, Any]
    source: str
    output: str
    tune_dir: str
    search: tuple[str, ...]
    study_name: str
    storage_url: str
    cwd: str
    seed: int

    def run_dir(self, number: int) -> Path:
        return Path(self.tune_dir) / f"trial-{number:03d}"


@dataclass
class TrialOutcome:
    """One finished trial: its score, or the error it failed with."""

    run_dir: str
    seconds: float
    metric: str | None = None
    value: float | None = None
    higher_is_better: bool | None = None
    error: str | None = None

    @property
    def objective(self) -> float:
        assert self.value is not None
        return -self.value if self.higher_is_better else self.value

    def user_attrs(self) -> dict[str, Any]:
        attrs = {"run_dir": self.run_dir, "seconds": round(self.seconds, 3)}
        if self.error is not None:
            return {**attrs, "error": self.error}
        return {**attrs, "metric": self.metric, "value": self.value, "higher_is_better": self.higher_is_better}


# -- one trial -----------------------------------------------------------------------------------------------------


def run_trial(
    spec: StudySpec, number: int, params: dict[str, Any], pm: PolyadaptPluginManager, metric: str | None
) -> TrialOutcome:
    """Run trial ``number`` as a normal adapt run and score it on ``metric`` (None: the headline metric of its
    manifest). Any exception becomes the outcome's ``error``: one trial failing does not stop the study."""
    from .manifest import read_manifest
    from .recipe import AdaptRecipe

    run_dir = spec.run_dir(number)
    started = time.perf_counter()
    try:
        raw = apply_overrides(spec.raw, param_overrides(params))
        raw["output"] = str(run_dir)
        config = validate_config(raw, source=f"{spec.source} (trial {number})", plugin_manager=pm)
        # a trial number is handed out once per study, so a directory already there is left by a deleted study
        AdaptRecipe(config, plugin_manager=pm, overwrite=True).run()
        manifest = read_manifest(run_dir)
        metrics = (manifest.metrics.after if manifest else None) or {}
        modality = pm.get_modality(config.modality)
        name = metric or modality.headline_metric(metrics)
        if name is None or name not in metrics:
            reported = ", ".join(sorted(metrics)) or "none"
            raise TuneError(f"the trial reported no {name or 'headline'} metric (reported: {reported})")
        return TrialOutcome(
            run_dir=str(run_dir), seconds=time.perf_counter() - started, metric=name,
            value=float(metrics[name]), higher_is_better=modality.higher_is_better(name),
        )  # fmt: skip
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        return TrialOutcome(run_dir=str(run_dir), seconds=time.perf_counter() - started, error=error)
    finally:
        _free_memory()


def one_line(exc: BaseException) -> str:
    return first_line(f"{type(exc).__name__}: {exc}")


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].rstrip(":") if lines else ""


def _free_memory() -> None:
    """Trials run one after another in one process; the last trial's model must not hold the next one's memory."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the study -----------------------------------------------------------------------------------------------------


def _require(module: str) -> Any:
    """Import an optional dependency of ``polyadapt[tune]``; missing, it is a :class:`TuneError` saying what to
    install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TuneError(f"{module} is not installed ({exc}); {INSTALL_HINT}") from None


def _optuna() -> Any:
    optuna = _require("optuna")
    # Optuna logs every trial's objective, which is the negated metric when higher is better; the table is the output
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@contextlib.contextmanager
def _locked(tune_dir: Path) -> Iterator[None]:
    """One ``tune`` per study: resuming marks the trials left running as failed, which must not be a live one's."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(tune_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TuneError(f"{tune_dir} is in use by another polyadapt tune") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _plain(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def open_study(spec: StudySpec) -> Any:
    """Create the study, or load it and check that it is one of this config and search space."""
    from .rundir import diff_keys

    optuna = _optuna()
    storage = optuna.storages.RDBStorage(spec.storage_url)
    study = optuna.create_study(storage=storage, study_name=spec.study_name, direction="minimize", load_if_exists=True)
    attrs = study.user_attrs
    if "config" not in attrs:
        study.set_user_attr("config", _plain(spec.raw))
        study.set_user_attr("search", list(spec.search))
    else:
        changed = sorted(diff_keys(attrs["config"], _plain(spec.raw)))
        if changed:
            raise TuneError(
                f"{spec.tune_dir} holds a study of another config (it differs in {', '.join(changed)}); "
                "use the same config to resume it, or another output (or delete the directory) to start over"
            )
        if set(attrs.get("search", [])) != set(spec.search):
            raise TuneError(
                f"{spec.tune_dir} holds a study searching {','.join(attrs.get('search', []))}, not "
                f"{','.join(spec.search)}; use the same --search to resume it"
            )
    # TPE's first trials are random draws from one seeded stream; a resumed study restarting that stream would
    # repeat the values of its first trials
    sampler = optuna.samplers.TPESampler(seed=spec.seed + len(study.trials))
    return optuna.load_study(study_name=spec.study_name, storage=storage, sampler=sampler)


def recover_interrupted(study: Any, spec: StudySpec) -> None:
    """Trials left running by a killed process: marked failed (and their run directories), their values queued to
    run again as new trials."""
    from optuna.trial import TrialState

    from .rundir import RunDirectory

    storage = _optuna().storages.RDBStorage(spec.storage_url)
    study_id = storage.get_study_id_from_name(spec.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, "error", INTERRUPTED)
        storage.set_trial_user_attr(trial_id, "interrupted", True)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        rundir = RunDirectory(spec.run_dir(trial.number))
        with contextlib.suppress(PolyadaptError):
            manifest = rundir.read()
            if manifest is not None and manifest.status == "running":
                rundir.fail(manifest, TuneError(INTERRUPTED))
        if trial.params:
            study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})


def finished(study: Any) -> list[Any]:
    """Trials that count towards ``--trials``: complete, or failed with an error of their own (not killed)."""
    from optuna.trial import TrialState

    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))
    ]


def study_metric(study: Any) -> tuple[str | None, bool | None]:
    attrs = study.user_attrs
    return attrs.get("metric"), attrs.get("higher_is_better")


def fix_metric(study: Any) -> None:
    """The study's metric is the one the first completed trial was scored on."""
    from optuna.trial import TrialState

    if study.user_attrs.get("metric") is not None:
        return
    for trial in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        if trial.user_attrs.get("metric") is not None:
            study.set_user_attr("metric", trial.user_attrs["metric"])
            study.set_user_attr("higher_is_better", trial.user_attrs["higher_is_better"])
            return


# -- the command ---------------------------------------------------------------------------------------------------


def tune(
    config_path: str | Path,
    trials: int,
    search: str | Sequence[str] = DEFAULT_SEARCH,
    backend: str = "optuna",
    overrides: Sequence[str] = (),
    plugin_manager: PolyadaptPluginManager | None = None,
    ray_address: str | None = None,
    on_trial: Callable[[TrialRecord], None] | None = None,
) -> TuneResult:
    """Search ``search`` (names of :data:`SEARCH_SPACE`) for the config at ``config_path`` (with ``overrides``
    applied) until the study in ``<output>-tune/`` has ``trials`` finished trials; write ``trials.json`` and
    ``best.yaml`` there. ``on_trial`` is called with each trial this call runs. Raises :class:`TuneError` when the
    search cannot run or every trial failed (naming the first error)."""
    from .plugins import get_plugin_manager

    pm = plugin_manager or get_plugin_manager()
    names = parse_search(search)
    if backend not in BACKENDS:
        raise TuneError(f"--backend: {backend!r} is not a backend (valid: {', '.join(BACKENDS)})")
    if trials < 1:
        raise TuneError(f"--trials: {trials} is invalid: run at least one trial")
    source = str(config_path)
    raw = apply_overrides(read_yaml(config_path), list(overrides))
    base = validate_config(raw, source=source, plugin_manager=pm)
    if "r" in names and base.peft.method not in ("lora", "dora"):
        raise TuneError(f"--search r: peft.method {base.peft.method!r} has no rank; search lr or epochs")
    output = Path(base.output)
    tune_dir = output.with_name(f"{output.name}-tune")
    _optuna()  # missing, say so before anything is written
    if backend == "ray":
        _require("ray.tune")
    tune_dir.mkdir(parents=True, exist_ok=True)
    spec = StudySpec(
        raw=raw, source=source, output=str(output), tune_dir=str(tune_dir), search=names,
        study_name=f"polyadapt-tune-{output.name}", storage_url=f"sqlite:///{(tune_dir / STUDY_DB).resolve()}",
        cwd=os.getcwd(), seed=base.train.seed,
    )  # fmt: skip
    with _locked(tune_dir):
        study = open_study(spec)
        recover_interrupted(study, spec)
        missing = max(0, trials - len(finished(study)))
        errors: dict[int, str] = {}
        if missing and backend == "optuna":
            ran = run_optuna(study, spec, missing, pm, on_trial)
        elif missing:
            ran, errors = run_ray(study, spec, missing, ray_address, on_trial)
        else:
            ran = []
        study = _optuna().load_study(study_name=spec.study_name, storage=spec.storage_url)  # what the workers wrote
        fix_metric(study)
        result = collect(study, spec, backend, ran, errors)
        write_outputs(result, spec, pm)
    if result.best is None:
        failed = [t for t in result.trials if t.state == "failed" and t.error]
        first = next((t for t in failed if t.error != INTERRUPTED), failed[0] if failed else None)
        reason = f"trial {first.number}: {first_line(first.error)}" if first else "no trial completed"
        raise TuneError(f"every trial failed; the first error: {reason}", result)
    return result


def run_optuna(
    study: Any, spec: StudySpec, count: int, pm: PolyadaptPluginManager, on_trial: Callable | None
) -> list[int]:
    """``count`` trials one after the other in this process (Optuna's ask and tell)."""
    from optuna.trial import TrialState

    ran = []
    for _ in range(count):
        metric, _ = study_metric(study)
        trial = study.ask()
        params = sample(trial, spec.search)
        outcome = run_trial(spec, trial.number, params, pm, metric)
        for key, value in outcome.user_attrs().items():
            trial.set_user_attr(key, value)
        if outcome.error is None:
            study.tell(trial, outcome.objective)
            fix_metric(study)
        else:
            study.tell(trial, state=TrialState.FAIL)
        ran.append(trial.number)
        if on_trial is not None:
            on_trial(_record(study.trials[trial.number], spec, *study_metric(study)))
    return ran


# -- Ray Tune ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DefineByRun:
    """``OptunaSearch``'s space: samples the values, and passes the Optuna trial number on to name the run directory
    (a class, not a closure: Tune pickles the searcher into its experiment checkpoints)."""

    search: tuple[str, ...]

    def __call__(self, trial: Any) -> dict[str, Any]:
        sample(trial, self.search)
        return {"trial_number": trial.number}


def _ray_trial(config: dict[str, Any], spec: StudySpec, metric: str | None) -> None:
    """A Ray Tune trial: the same trial function, on a worker; its outcome goes into the study like the driver's."""
    import optuna
    from ray import tune as ray_tune

    from .plugins import get_plugin_manager

    # Tune starts each trial in a directory of its own; the config's relative paths are relative to where tune ran
    os.chdir(spec.cwd)
    number = int(config["trial_number"])
    params = {name: config[name] for name in spec.search}
    outcome = run_trial(spec, number, params, get_plugin_manager(), metric)
    storage = optuna.storages.RDBStorage(spec.storage_url)
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(spec.study_name), number)
    for key, value in outcome.user_attrs().items():
        storage.set_trial_user_attr(trial_id, key, value)
    if outcome.error is not None:
        raise TuneError(outcome.error)
    ray_tune.report({OBJECTIVE: outcome.objective, "value": outcome.value})


def worker_pythonpath() -> str:
    """The driver's import path that a worker of the same interpreter lacks (plugins found through ``sys.path``
    edits or ``PYTHONPATH``), so that the workers find the same plugins."""
    prefixes = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
    extra = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    extra += [os.path.abspath(p) for p in sys.path if p and not os.path.abspath(p).startswith(prefixes)]
    return os.pathsep.join(dict.fromkeys(p for p in extra if p))


def run_ray(
    study: Any, spec: StudySpec, count: int, address: str | None, on_trial: Callable | None
) -> tuple[list[int], dict[int, str]]:
    """``count`` trials with Ray Tune, ``OptunaSearch`` driving the same study. Returns the numbers run and the
    errors Ray saw that the trials could not record (a worker that failed before the trial started)."""
    import optuna
    import ray
    from ray import tune as ray_tune
    from ray.tune.search.optuna import OptunaSearch

    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address, num_cpus=None if address else os.cpu_count(), include_dashboard=False,
            log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath()}},
        )  # fmt: skip
    try:
        metric, _ = study_metric(study)

        searcher = OptunaSearch(
            space=DefineByRun(spec.search), metric=OBJECTIVE, mode="min", study_name=spec.study_name,
            storage=optuna.storages.RDBStorage(spec.storage_url),
            sampler=optuna.samplers.TPESampler(seed=spec.seed + len(study.trials)),
        )  # fmt: skip
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        trainable = ray_tune.with_resources(
            ray_tune.with_parameters(_ray_trial, spec=spec, metric=metric), {"cpu": 1, "gpu": gpus}
        )
        tuner = ray_tune.Tuner(
            trainable,
            tune_config=ray_tune.TuneConfig(search_alg=searcher, num_samples=count),
            run_config=ray_tune.RunConfig(
                name="ray", storage_path=str(Path(spec.tune_dir).resolve()), verbose=0,
                failure_config=ray_tune.FailureConfig(max_failures=0),
            ),
        )  # fmt: skip
        # Tune prints its own tables even when silent; the command's output is the trial table
        with contextlib.redirect_stdout(sys.stderr):
            grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    ran, errors = [], {}
    for i in range(len(grid)):
        result = grid[i]
        number = (result.config or {}).get("trial_number")
        if number is None:
            continue
        ran.append(int(number))
        if result.error is not None:
            errors[int(number)] = one_line(getattr(result.error, "cause", None) or result.error)
    ran.sort()
    if on_trial is not None:
        study = optuna.load_study(study_name=spec.study_name, storage=spec.storage_url)
        fix_metric(study)
        for trial in study.get_trials(deepcopy=False):
            if trial.number in ran:
                on_trial(_record(trial, spec, *study_metric(study), errors.get(trial.number)))
    return ran, errors


# -- outputs -------------------------------------------------------------------------------------------------------


def _record(
    trial: Any, spec: StudySpec, metric: str | None, higher: bool | None, fallback_error: str | None = None
) -> TrialRecord:
    state = trial.state.name.lower()
    attrs = trial.user_attrs
    value, error = attrs.get("value"), attrs.get("error")
    if state == "fail":
        state, error = "failed", error or fallback_error or "failed (no error recorded)"
    if state == "complete" and metric is not None and attrs.get("metric") != metric:
        state, value = "failed", None
        error = f"scored on {attrs.get('metric')}, not the study's metric {metric}"
    return TrialRecord(
        number=trial.number,
        params=dict(trial.params),
        state=state,
        run_dir=attrs.get("run_dir", str(spec.run_dir(trial.number))),
        value=value if state == "complete" else None,
        seconds=attrs.get("seconds"),
        error=error,
        retry_of=attrs.get("retry_of"),
    )


def collect(study: Any, spec: StudySpec, backend: str, ran: list[int], errors: dict[int, str]) -> TuneResult:
    metric, higher = study_metric(study)
    records = [
        _record(t, spec, metric, higher, errors.get(t.number))
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    ]
    complete = [r for r in records if r.state == "complete"]
    best = None
    if complete:
        best = (max if higher else min)(complete, key=lambda r: r.value)
    return TuneResult(
        tune_dir=Path(spec.tune_dir), study_name=spec.study_name, backend=backend, search=spec.search,
        metric=metric, higher_is_better=higher, trials=records, ran=ran, best=best,
    )  # fmt: skip


def write_outputs(result: TuneResult, spec: StudySpec, pm: PolyadaptPluginManager) -> None:
    """``trials.json`` always; ``best.yaml`` (validated first) when a trial completed."""
    best = result.best
    if best is not None:
        raw = apply_overrides(copy.deepcopy(spec.raw), param_overrides(best.params))
        path = Path(spec.tune_dir) / BEST_YAML
        validate_config(raw, source=str(path), plugin_manager=pm)
        header = (
            f"# polyadapt tune: trial {best.number} of {len(result.trials)} in {spec.tune_dir} "
            f"({result.metric} {best.value:.6g}); train it with: polyadapt adapt {path}\n"
        )
        path.write_text(header + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        result.best_config = path
    write_json_atomic(
        result.trials_json,
        {
            "study": result.study_name,
            "storage": STUDY_DB,
            "search": {name: SEARCH_SPACE[name].description for name in result.search},
            "metric": result.metric,
            "higher_is_better": result.higher_is_better,
            "best": best.number if best else None,
            "best_config": str(result.best_config) if result.best_config else None,
            "trials": [r.as_dict() for r in result.trials],
        },
    )


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(result: TuneResult) -> str:
    """The trials, one a line (number, each searched value, the metric, state, seconds), the best marked ``*``."""
    metric = result.metric or "value"
    header = ["trial", *result.search, metric, "state", "seconds"]
    rows = []
    for t in result.trials:
        mark = "*" if result.best is not None and t.number == result.best.number else " "
        seconds = "-" if t.seconds is None else f"{t.seconds:.1f}"
        values = [format_value(t.params.get(name)) for name in result.search]
        rows.append([f"{mark}{t.number:>4}", *values, format_value(t.value), t.state, seconds])
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(f"{c:>{w}}" for c, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    for t in result.trials:
        if t.error and t.state == "failed":
            lines.append(f"trial {t.number}: {first_line(t.error)}")
    if result.best is not None:
        direction = "higher" if result.higher_is_better else "lower"
        lines.append(
            f"best: trial {result.best.number} ({metric} {result.best.value:.6g}, {direction} is better) -> "
            f"{result.best_config}"
        )
    return "\n".join(lines)


__all__ = ["SEARCH_SPACE", "TrialRecord", "TuneError", "TuneResult", "format_table", "parse_search", "tune"]
