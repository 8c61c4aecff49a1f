"""What a study keeps in its Optuna storage, so that any process on any machine can join it.

Beside its trials, a study created by orch holds (as study user attributes):

- ``orch.spec``: the study file it runs (after ``--set``, its storage URL left out, passwords
  hidden), so that ``orch study worker NAME`` needs nothing but the storage URL;
- ``orch.budget``: the total number of trials, read under the study's lock at every claim;
- ``orch.parent_run_id`` and ``orch.tracking_uri``: its one MLflow parent run and the store that
  holds it (the URI with its password hidden: such a store must be named again by each worker);
- ``orch.streams``: how many workers have joined, which gives each its own sampler seed offset.

The names are :mod:`orchestrator.schema`'s. Opening a study for work (creating it, its MLflow
parent run, reaping lost trials) is :func:`orchestrator.execution.opening.open_study`.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import yaml

from orchestrator import names, schema
from orchestrator.errors import StoreError
from orchestrator.secrets import describe, redact_data, redact_url
from orchestrator.spec.files import parse_yaml, yaml_source
from orchestrator.spec.study import Study, parsed_study, study_from
from orchestrator.storage.backends import open_storage
from orchestrator.storage.urls import file_of

#: settings that may change from one invocation of a study to the next
PER_INVOCATION = ("name", "tracking_uri", "study.name", "study.trials", "study.timeout", "study.resources",
                  "study.storage", "study.checkpoint_dir", "study.outage_grace")
_UNSET = object()


def load(storage_url: str, name: str, storage=None, writable: bool = False):
    """The Optuna study ``name`` in the storage at ``storage_url``; a missing study, journal file or
    database, or an unreachable one, is a :class:`StoreError`."""
    import optuna

    names.check(name)
    missing = (f"no study {name!r} in {redact_url(storage_url)}: create it with `orch study create FILE "
               "--storage URL` (or start it with `orch study run FILE --storage URL`)")
    path = file_of(storage_url)
    if storage is None and path is not None and not os.path.exists(path):
        raise StoreError(f"{missing}; {path} does not exist")
    try:
        return optuna.load_study(study_name=name, storage=storage or open_storage(storage_url, writable=writable))
    except KeyError:
        raise StoreError(missing) from None
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreachable server, bad URL, missing driver, ...
        raise StoreError(f"cannot open the Optuna storage {redact_url(storage_url)}: {describe(exc)}") from None


def stored_study(storage_url: str, name: str, checked: bool = True) -> Study:
    """The study file that study ``name`` was created with, as stored with it; ``checked=False``:
    parsed only (:func:`~orchestrator.spec.study.parsed_study`), for commands that only read the study."""
    text = load(storage_url, name).user_attrs.get(schema.SPEC)
    if text is None:
        raise StoreError(f"study {name!r} in {redact_url(storage_url)} holds no orch study file (it was "
                         "created by an older orch, or by Optuna itself): pass the study FILE instead of its name")
    data, src = yaml_source(text, f"study {name!r} as stored in {redact_url(storage_url)}")
    study = study_from(data, src) if checked else parsed_study(data, src)
    if study.name != name:  # a record written by another process: it steers where every worker writes
        raise StoreError(f"study {name!r} in {redact_url(storage_url)} holds the file of a study named "
                         f"{names.shown(study.name)}: refused (the storage was changed by hand?)")
    return study


def stored_or_none(storage_url: str, name: str) -> Study | None:
    """The study file stored with study ``name``, parsed, or ``None`` for a study that holds none
    (made by Optuna itself, or not there): for commands that only show a study."""
    try:
        return stored_study(storage_url, name, checked=False)
    except Exception:  # noqa: BLE001 - no file stored with it, or one an older orch wrote differently
        return None


def spec_text(study: Study) -> str:
    """The study file as stored: named, without its storage URL, with every password hidden."""
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


def check_spec(study: Study, ostudy, stored: str | None, shown: str, update: bool) -> None:
    """Refuse a study file that is not the one the study runs; with ``update``, store the file
    (a new study, or one whose per-invocation settings changed)."""
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
        ostudy.set_user_attr(schema.SPEC, text)


def budget(ostudy) -> int | None:
    """The study's budget (``None``: no limit), as last set by ``orch study run`` or ``create``."""
    return ostudy.user_attrs.get(schema.BUDGET)


def next_sampler_offset(ostudy) -> int:
    """A sampler seed offset no other worker of the study has had (call under the claim lock)."""
    n = int(ostudy.user_attrs.get(schema.SAMPLER_OFFSETS, 0))
    ostudy.set_user_attr(schema.SAMPLER_OFFSETS, n + 1)
    return n


def copy_study(name: str, source: str, dest: str, to_name: str | None = None) -> int:
    """Copy study ``name`` with its trials and this record to another storage (``optuna.copy_study``);
    returns the number of trials copied. The copy keeps the MLflow parent run."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if to_name is not None:
        names.check(to_name, "--to-name")
    trials = load(source, name).get_trials(deepcopy=False)
    running = [t.number for t in trials if t.state.name == "RUNNING"]
    if running:
        raise StoreError(f"study {name!r} has running trials {running}: stop its workers first (a running "
                         "trial cannot be copied with the heartbeats and processes that would tell if it is lost)")
    try:
        optuna.copy_study(from_study_name=name, from_storage=open_storage(source), to_storage=open_storage(dest),
                          to_study_name=to_name)
    except optuna.exceptions.DuplicatedStudyError:
        raise StoreError(f"{redact_url(dest)} already holds a study {to_name or name!r}; pass --to-name") from None
    except Exception as exc:  # noqa: BLE001 - unreachable server, bad URL, ...
        raise StoreError(f"cannot copy study {name!r} to {redact_url(dest)}: {describe(exc)}") from None
    n = len(trials)
    if to_name and to_name != name:
        copied = load(dest, to_name, writable=True)
        text = copied.user_attrs.get(schema.SPEC)
        if text:  # the stored study file names its study
            data = parse_yaml(text)
            data["study"]["name"] = to_name
            copied.set_user_attr(schema.SPEC, yaml.safe_dump(data, sort_keys=False))
    return n
