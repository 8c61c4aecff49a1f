"""What a study keeps in its Optuna storage, so that any process on any machine can join it.

Beside its trials, a study created by orch holds (as study user attributes):

- ``orch.spec``: the study file it runs (after ``--set``, its storage URL left out, passwords
  hidden), so that ``orch study worker NAME`` needs nothing but the storage URL;
- ``orch.budget``: the total number of trials, read under the study's lock at every claim;
- ``orch.parent_run_id`` and ``orch.tracking_uri``: its one MLflow parent run and the store that
  holds it (the URI with its password hidden: such a store must be named again by each worker);
- ``orch.streams``: how many workers have joined, which gives each its own sampler stream.

:func:`open_study` creates or joins a study under the study's lock, so that processes started at
the same instant agree on all of this: one study, one spec, one experiment and one parent run.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

from orchestrator import claims, probes, tracking, views
from orchestrator.config import SpecError
from orchestrator.secrets import MASK, describe, redact_data, redact_url
from orchestrator.study import Study, open_storage, parsed_study, study_from

SPEC_ATTR = "orch.spec"
BUDGET_ATTR = "orch.budget"
PARENT_ATTR = "orch.parent_run_id"
TRACKING_ATTR = "orch.tracking_uri"
STREAMS_ATTR = "orch.streams"
#: settings that may change from one invocation of a study to the next
PER_INVOCATION = ("name", "tracking_uri", "study.name", "study.trials", "study.timeout", "study.resources",
                  "study.storage", "study.checkpoint_dir")
_UNSET = object()


@dataclass
class Joined:
    """A study opened by :func:`open_study`."""

    ostudy: Any
    storage_url: str
    tracking_uri: str
    mlf: Any  # an MLflow client on tracking_uri
    parent_run_id: str
    lost: list[int]
    retried: list[int]


def open_study(study: Study, storage_url: str, *, create: bool, tracking_uri: str | None = None,
               budget: Any = _UNSET) -> Joined:
    """Create (``create``) or join the study, under its lock, and find or create its parent run.

    Joining checks that ``study`` is the study that the storage holds (a changed search space or
    fixed setting is a :class:`SpecError` naming the settings). ``budget`` (``None``: no limit)
    replaces the stored budget. Lost trials found on the way are failed and queued again.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lock = claims.claim_lock(storage_url, study.name)
    shown = redact_url(storage_url)
    if not create:
        load(storage_url, study.name)  # a clear message, before anything is created, if it is not there
    else:
        probes.probe_stores(storage_url, None)
    if tracking_uri:  # an unreachable server fails here, in seconds, not while the study's lock is held
        tracking.check_reachable(tracking_uri)
    try:
        with lock:
            ostudy = _load(study, storage_url, create)
            attrs = ostudy.user_attrs
            _check_spec(study, ostudy, attrs.get(SPEC_ATTR), shown, update=create)
            if budget is not _UNSET and attrs.get(BUDGET_ATTR, _UNSET) != budget:
                ostudy.set_user_attr(BUDGET_ATTR, budget)
            uri = study_tracking_uri(study, attrs.get(TRACKING_ATTR), tracking_uri, create)
            if uri != tracking_uri:
                tracking.check_reachable(uri)
            probes.probe_stores(storage_url, uri)
            try:
                mlf = tracking.client(uri)
                parent = parent_run(mlf, study, ostudy, storage_url, uri, attrs, create)
            except SpecError:
                raise
            except Exception as exc:  # noqa: BLE001 - unreachable or refusing tracking server, ...
                raise SpecError(f"cannot use the MLflow tracking store {redact_url(uri)}: {describe(exc)}") from None
            lost, retried, _ = claims.reap(ostudy)
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreachable server, bad URL, missing driver, ...
        raise SpecError(f"cannot open the Optuna storage {shown}: {describe(exc)}") from None
    claims.close_runs(mlf, lost)
    return Joined(ostudy, storage_url, uri, mlf, parent, [e.number for e in lost], retried)


def _load(study: Study, storage_url: str, create: bool):
    import optuna

    storage = open_storage(storage_url, study.section.heartbeat)
    direction = study.section.direction
    if create:
        ostudy = optuna.create_study(study_name=study.name, storage=storage, direction=direction,
                                     load_if_exists=True)
    else:
        ostudy = load(storage_url, study.name, storage)
    stored = ostudy.direction.name.lower()
    if stored != direction:
        raise SpecError(f"{study.src.where('study.direction')}: study {study.name!r} in {redact_url(storage_url)} "
                        f"was created to {stored}, not {direction}; use another study name or storage")
    return ostudy


def load(storage_url: str, name: str, storage=None, writable: bool = False):
    """The Optuna study ``name`` in the storage at ``storage_url``; a missing study, journal file or
    database, or an unreachable one, is a :class:`SpecError`."""
    import optuna

    from orchestrator.locks import file_of

    missing = (f"no study {name!r} in {redact_url(storage_url)}: create it with `orch study create FILE "
               "--storage URL` (or start it with `orch study run FILE --storage URL`)")
    path = file_of(storage_url)
    if storage is None and path is not None and not os.path.exists(path):
        raise SpecError(f"{missing}; {path} does not exist")
    try:
        return optuna.load_study(study_name=name, storage=storage or open_storage(storage_url, writable=writable))
    except KeyError:
        raise SpecError(missing) from None
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreachable server, bad URL, missing driver, ...
        raise SpecError(f"cannot open the Optuna storage {redact_url(storage_url)}: {describe(exc)}") from None


def stored_study(storage_url: str, name: str, checked: bool = True) -> Study:
    """The study file that study ``name`` was created with, as stored with it; ``checked=False``:
    parsed only (:func:`~orchestrator.study.parsed_study`), for commands that only read the study."""
    from orchestrator.config import yaml_source

    text = load(storage_url, name).user_attrs.get(SPEC_ATTR)
    if text is None:
        raise SpecError(f"study {name!r} in {redact_url(storage_url)} holds no orch study file (it was "
                        "created by an older orch, or by Optuna itself): pass the study FILE instead of its name")
    data, src = yaml_source(text, f"study {name!r} as stored in {redact_url(storage_url)}")
    return study_from(data, src) if checked else parsed_study(data, src)


def spec_text(study: Study) -> str:
    """The study file as stored: named, without its storage URL, with every password hidden."""
    import yaml

    data = copy.deepcopy(study.data)
    data.setdefault("study", {})["name"] = study.name
    data["study"].pop("storage", None)
    return yaml.safe_dump(redact_data(data), sort_keys=False)


def differences(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted settings (not counting :data:`PER_INVOCATION` ones) in which two study files differ."""
    a, b = _flat(stored), _flat(redact_data(new))
    return sorted(k for k in a.keys() | b.keys() if a.get(k, _UNSET) != b.get(k, _UNSET)
                  and not any(k == p or k.startswith(p + ".") for p in PER_INVOCATION))


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict) or not node:
        return {prefix: node} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return out


def _check_spec(study: Study, ostudy, stored: str | None, shown: str, update: bool) -> None:
    """Refuse a study file that is not the one the study runs; with ``update``, store the file
    (a new study, or one whose per-invocation settings changed)."""
    from orchestrator.config import parse_yaml

    if stored is not None:
        differ = differences(parse_yaml(stored), study.data)
        if differ:
            listed = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
            raise study.src.error(differ[0], f"study {study.name!r} in {shown} was created with other settings "
                                  f"({listed} differ); trials of one study must share them. Run the stored study "
                                  f"with `orch study worker {study.name} --storage URL`, or start a new study: "
                                  "set study.name (or --set study.name=NEW) or use another storage")
    text = spec_text(study)
    if update and stored != text:
        ostudy.set_user_attr(SPEC_ATTR, text)


def budget(ostudy) -> int | None:
    """The study's budget (``None``: no limit), as last set by ``orch study run`` or ``create``."""
    return ostudy.user_attrs.get(BUDGET_ATTR)


def next_stream(ostudy) -> int:
    """A sampler stream number no other worker of the study has had (call under the claim lock)."""
    n = int(ostudy.user_attrs.get(STREAMS_ATTR, 0))
    ostudy.set_user_attr(STREAMS_ATTR, n + 1)
    return n


def study_tracking_uri(study: Study, recorded: str | None, given: str | None, create: bool) -> str:
    """The MLflow store: the one given (flag, the file when creating, ``$MLFLOW_TRACKING_URI``),
    else the one the study recorded, else the default SQLite store under ``mlruns/``."""
    import os

    explicit = given or (study.base.tracking_uri if create else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if explicit:
        return tracking.resolve_tracking_uri(explicit)
    if recorded and MASK in recorded:
        raise SpecError(f"study {study.name!r} logs to {recorded}, whose password is not stored: pass it with "
                        "--tracking-uri (or $MLFLOW_TRACKING_URI)")
    if recorded and recorded.startswith("sqlite:///") and not os.path.exists(recorded[len("sqlite:///"):]):
        raise SpecError(f"study {study.name!r} logs to {recorded}, a file of the machine it was created on: "
                        "pass --tracking-uri (an MLflow tracking server, for studies on several machines)")
    return tracking.resolve_tracking_uri(recorded)


def parent_run(mlf, study: Study, ostudy, storage_url: str, uri: str, attrs: dict[str, Any], create: bool) -> str:
    """The study's one parent run in ``mlf``'s store: the recorded one, else found by its tags (a study
    from an older orch), else created with the study settings (``create``), and recorded."""
    from mlflow.exceptions import MlflowException

    from orchestrator import runner

    exp_id = tracking.experiment_id(mlf, study.name)
    if create:
        views.save_study_view(mlf, exp_id, study)
    run_id = attrs.get(PARENT_ATTR)
    if run_id:
        try:
            if mlf.get_run(run_id).info.experiment_id != exp_id:
                run_id = None
        except MlflowException as exc:  # only a run that is not there; an unreachable store is an error
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run_id = None
    if not run_id:  # a study started by an older orch, which did not record its parent run
        found = mlf.search_runs([exp_id], max_results=1, filter_string=(
            f"tags.`orch.role` = 'study' and tags.`orch.study` = '{study.name}' and "
            f"tags.`orch.storage` = '{redact_url(storage_url)}'"))
        run_id = found[0].info.run_id if found else None
    if not run_id and not create:
        raise SpecError(f"study {study.name!r}: its MLflow parent run {attrs.get(PARENT_ATTR)} is not in "
                        f"{redact_url(mlf.tracking_uri)}; point --tracking-uri at the store it was created with "
                        f"({attrs.get(TRACKING_ATTR) or 'unknown'})")
    if run_id:
        mlf.update_run(run_id, status="RUNNING")
    else:
        run_id = runner.start_run(mlf, study.name, run_name=f"study-{study.name}",
                                  tags={"orch.role": "study", "orch.study": study.name,
                                        "orch.storage": redact_url(storage_url)})
        s = study.section
        params = {"study.metric": s.metric, "study.direction": s.direction, "study.sampler": s.sampler.type,
                  "study.pruner": s.pruner.type, **{f"study.sampler.{k}": v for k, v in s.sampler.options.items()},
                  **{f"study.pruner.{k}": v for k, v in s.pruner.options.items()},
                  **{f"space.{k}": p.model_dump(exclude_none=True) for k, p in s.space.items()},
                  **{f"fixed.{k}": v for k, v in study.base.flat_params().items()}}
        tracking.log_params(mlf, run_id, params)
        mlf.log_text(run_id, spec_text(study), "study.yaml")
    if attrs.get(PARENT_ATTR) != run_id:
        ostudy.set_user_attr(PARENT_ATTR, run_id)
    shown = redact_url(uri)
    if attrs.get(TRACKING_ATTR) != shown:
        ostudy.set_user_attr(TRACKING_ATTR, shown)
    return run_id


def copy_study(name: str, source: str, dest: str, to_name: str | None = None) -> int:
    """Copy study ``name`` with its trials and this record to another storage (``optuna.copy_study``);
    returns the number of trials copied. The copy keeps the MLflow parent run."""
    import optuna
    import yaml

    from orchestrator.config import parse_yaml

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = load(source, name).get_trials(deepcopy=False)
    running = [t.number for t in trials if t.state.name == "RUNNING"]
    if running:
        raise SpecError(f"study {name!r} has running trials {running}: stop its workers first (a running "
                        "trial cannot be copied with the heartbeats and processes that would tell if it is lost)")
    try:
        optuna.copy_study(from_study_name=name, from_storage=open_storage(source), to_storage=open_storage(dest),
                          to_study_name=to_name)
    except optuna.exceptions.DuplicatedStudyError:
        raise SpecError(f"{redact_url(dest)} already holds a study {to_name or name!r}; pass --to-name") from None
    except Exception as exc:  # noqa: BLE001 - unreachable server, bad URL, ...
        raise SpecError(f"cannot copy study {name!r} to {redact_url(dest)}: {describe(exc)}") from None
    n = len(trials)
    if to_name and to_name != name:
        copied = load(dest, to_name, writable=True)
        text = copied.user_attrs.get(SPEC_ATTR)
        if text:  # the stored study file names its study
            data = parse_yaml(text)
            data["study"]["name"] = to_name
            copied.set_user_attr(SPEC_ATTR, yaml.safe_dump(data, sort_keys=False))
    return n
