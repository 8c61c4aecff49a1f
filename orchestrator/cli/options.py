"""What the commands share: their options, click parameter types, and the steps every command that
takes a study or a run file starts with (locate it, load and check it, open its Optuna study)."""

from __future__ import annotations

import click

from orchestrator import names
from orchestrator.contracts import SECTIONS
from orchestrator.errors import UsageError
from orchestrator.spec.files import load_yaml
from orchestrator.spec.study import Study, load_study, parsed_study
from orchestrator.storage import record
from orchestrator.storage.urls import default_storage_url

SET_HELP = "Override a setting, e.g. --set cell.hidden_size=200 (repeatable)."
STORAGE_HELP = ("Optuna storage URL, e.g. postgresql://user:pass@host/db (default: $ORCH_STORAGE, else the "
                "file's study.storage, else a journal file under mlruns/optuna/).")
TRACKING_HELP = "MLflow tracking URI, e.g. http://host:5000 (default: SQLite in ./mlruns)."


class Devices(click.ParamType):
    """``--devices 0,2``: GPU ids."""

    name = "ids"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [int(v) for v in str(value).split(",") if v.strip()] or None
        except ValueError:
            raise UsageError(f"--devices {value!r}: expected GPU ids such as 0,2") from None


def storage_option(f):
    """``--storage``, defaulting to ``$ORCH_STORAGE`` (a password need not be typed on a command line)."""
    return click.option("--storage", default=None, envvar="ORCH_STORAGE", show_envvar=False, help=STORAGE_HELP)(f)


def set_option(f):
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(f)


def slot_options(f):
    """The worker slots of ``study run`` and ``study worker``."""
    for option in reversed([
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Stop claiming new trials after this many seconds."),
        click.option("--workers", "workers_n", type=click.IntRange(min=1), default=None,
                     help="CPU worker processes (torch threads are split between them)."),
        click.option("--devices", type=Devices(), default=None,
                     help="GPU ids to use, e.g. 0,2 (default: all visible GPUs)."),
        click.option("--trials-per-device", type=click.IntRange(min=1), default=None,
                     help="Trials packed on each GPU at once (default: the file's, else 1)."),
        click.option("--tracking-uri", default=None, help=TRACKING_HELP),
    ]):
        f = option(f)
    return storage_option(f)


def is_file(target: str) -> bool:
    """Whether a FILE|NAME argument names a study file rather than a study."""
    return target.endswith((".yaml", ".yml"))


def preflight(run, file: str, study: Study | None = None) -> None:
    """Missing data, a module that does not fit its dataset, a plugin that breaks its contract
    (of the run, or any a ``study``'s space chooses): exit 2 before anything is written."""
    from orchestrator.training.build import preflight as check_run

    also = {}
    if study is not None:
        for section, kind in SECTIONS.items():
            param = study.section.space.get(f"{section}.plugin")
            also[kind] = set(getattr(param, "choices", ()) or ())
    variants = study.variants if study is not None and "dataset.plugin" not in study.section.space else []
    try:
        logged = check_run(run, also, variants)
    except UsageError as exc:
        raise UsageError(f"{file}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a dataset plugin's own error says what is wrong
        raise UsageError(f"{file}: {type(exc).__name__}: {exc}") from None
    if study is not None and study.section.metric not in logged and "module.plugin" not in study.section.space:
        raise study.src.error("study.metric", f"study.metric {study.section.metric!r} is not a metric that module "
                              f"{run.module.plugin!r} logs; it logs: {', '.join(logged)}")


def checked_study(file: str, overrides=()) -> Study:
    """A validated study file, with its data and plugins checked on this machine."""
    study = load_study(file, overrides)
    preflight(study.base, file, study)
    return study


def locate(target: str, storage: str | None) -> tuple[str, str, Study | None]:
    """The name and storage URL of a study named by its file or its name (default: its journal
    file), and the parsed file if a file was given (its plugins are not imported: no check needed
    to look at a study)."""
    if is_file(target):
        study = parsed_study(*load_yaml(target))
        return study.name, storage or study.section.storage or default_storage_url(study.name), study
    return names.check(target), storage or default_storage_url(target), None


def open_optuna(target: str, storage: str | None):
    """The Optuna study named by a study file or by its name, and its storage URL."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name, url, _ = locate(target, storage)
    return record.load(url, name), url
