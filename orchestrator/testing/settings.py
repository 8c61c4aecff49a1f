"""The ``*.settings`` rule, shared by every kind: a plugin's settings are what orch can check."""

from __future__ import annotations

import typing
from typing import Any

from orchestrator.contracts import SECTIONS
from orchestrator.errors import SpecError
from orchestrator.spec.files import Source
from orchestrator.spec.run import check_plugin_settings
from orchestrator.testing.rules import ContractError

FIX = ("declare each setting as a keyword argument of __init__ with a type hint and a default (ranges with "
       "typing.Annotated, e.g. orchestrator.contracts.settings.Count), so that orch can check study files")


def check_settings(cls: type, section: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``{section}.settings``: ``settings`` pass orch's validation of a ``section`` section (types,
    declared ranges, no unknown or missing key) and the type hints of ``__init__`` resolve.

    Returns the settings as orch converts them.
    """
    name = f"{section}.settings"
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass.__module__.startswith(("torch", "pytorch_lightning", "lightning")):
            continue
        try:
            typing.get_type_hints(init, include_extras=True)
        except Exception as exc:  # noqa: BLE001 - a name the hints use is not importable at run time
            raise ContractError(name, f"the type hints of {klass.__qualname__}.__init__ do not resolve: "
                                f"{type(exc).__name__}: {exc}", "import every name a hint uses at module level "
                                "(not only under TYPE_CHECKING)") from exc
    checked = dict(settings)
    try:
        check_plugin_settings(section, SECTIONS[section], cls, checked, Source(f"<{cls.__name__}>", {}))
    except SpecError as exc:
        raise ContractError(name, exc.detail, FIX) from None
    return checked
