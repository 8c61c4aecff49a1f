"""Passwords in storage and tracking URLs: kept out of every message, log line and MLflow field.

A URL is parsed with SQLAlchemy's URL parser (the same one Optuna and MLflow use), so a password
holding ``@``, ``:`` or ``/`` (percent-encoded, as URLs require) is found whole. Every password
seen this way is remembered for the life of the process, in its raw and its encoded form, and
:func:`redact` replaces each occurrence of either in any text: an error message from a database
driver, a traceback, a YAML dump. URLs that were never parsed (or cannot be) are still redacted
by their shape, up to the last ``@`` of the word.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlsplit

MASK = "***"
_known: set[str] = set()
# scheme://user:PASSWORD@host, the password running to the last "@" before white space or a quote
_SHAPE = re.compile(r"""(\b[a-zA-Z][\w+.-]*://[^:/@\s'"]*:)[^\s'"]*@""")


def password_of(url: str) -> str | None:
    """The password in ``url`` (decoded), or ``None``."""
    if "://" not in url:
        return None
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL (http://..., or malformed)
        try:
            password = urlsplit(url).password
            password = unquote(password) if password is not None else None
        except ValueError:
            password = None
    return str(password) if password else None


def remember(url: str | None) -> None:
    """Register the password of ``url`` (if any) so that :func:`redact` hides it from now on."""
    password = password_of(url) if url else None
    if password:
        _known.update({password, quote(password, safe=""), quote(password, safe=" +"),
                       quote(password, safe="+")})


def redact(text: str) -> str:
    """``text`` with every known password, and the password of any URL in it, replaced by ``***``."""
    if not text:
        return text
    for secret in sorted(_known, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _SHAPE.sub(lambda m: m.group(1) + MASK + "@", text)


def redact_url(url: str | None) -> str:
    """``url`` fit to show: its password (remembered for later :func:`redact` calls) replaced."""
    if not url:
        return url or ""
    remember(url)
    return redact(url)


def redact_data(node):
    """A copy of loaded YAML/JSON data with the password of every URL-valued string hidden."""
    if isinstance(node, dict):
        return {k: redact_data(v) for k, v in node.items()}
    if isinstance(node, list):
        return [redact_data(v) for v in node]
    if isinstance(node, str) and "://" in node:
        return redact_url(node)
    return node
