"""The failure every contract check raises: which rule broke, what was seen, and how to fix it."""

from __future__ import annotations

from contextlib import contextmanager


class ContractError(AssertionError):
    """A plugin breaks rule ``rule`` of its contract (an ``AssertionError``, so pytest shows it as a failure).

    Attributes:
        rule: the rule's id, for example ``cell.state_gradient``.
        detail: what the check saw.
        fix: what to change in the plugin.
    """

    def __init__(self, rule: str, detail: str, fix: str):
        super().__init__(f"[{rule}] {detail}\n  fix: {fix}")
        self.rule = rule
        self.detail = detail
        self.fix = fix


def require(condition: bool, rule: str, detail: str, fix: str) -> None:
    if not condition:
        raise ContractError(rule, detail, fix)


@contextmanager
def rule(name: str, fix: str):
    """Run a step of a check; any exception in it becomes a :class:`ContractError` of rule ``name``."""
    try:
        yield
    except ContractError:
        raise
    except Exception as exc:  # noqa: BLE001 - the plugin's own error, reported as the rule it broke
        raise ContractError(name, f"{type(exc).__name__}: {exc}", fix) from exc
