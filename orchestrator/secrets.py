"""Passwords in storage and tracking URLs: kept out of every message, log line and MLflow field.

A URL's password is the part of its user info before the *last* ``@`` (as ``urllib`` and the
browsers read it, so that an unencoded ``@`` in a password does not leave half of it behind), or
a ``password=`` query parameter (which psycopg accepts). URLs are shown with that part replaced
by ``***``, by position, never by searching for the password in the text. Every password seen
this way is also remembered for the life of the process, in its raw and percent-encoded forms,
and :func:`redact` hides any later occurrence of them in free text (a driver's error message, a
traceback) that is not part of a longer word; URLs that were never parsed are still redacted
by their shape.

Plugin settings named like credentials (``hf_token``, ``aws_secret_access_key``, ...) are hidden
the same way where they are logged (:func:`redact_settings`).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, unquote, urlsplit

MASK = "***"
_known: set[str] = set()
# scheme://user:PASSWORD@host, the password running to the last "@" before white space or a quote
_SHAPE = re.compile(r"""(\b[a-zA-Z][\w+.-]*://[^:/@\s'"]*:)[^\s'"]*@""")
# ?password=... or &password=... in a URL's query
_QUERY = re.compile(r"""([?&](?:password|passwd|pwd)=)[^&\s'"#]*""", re.I)
# the words (and pairs of words) of a setting's name that make its value a credential
_CREDENTIAL_WORDS = {"password", "passwd", "pwd", "secret", "secrets", "token", "apikey", "credential",
                     "credentials", "auth"}
_CREDENTIAL_PAIRS = {("api", "key"), ("access", "key"), ("private", "key")}
# a name's words: split at anything but letters and digits, and where camelCase turns upper
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def passwords_of(url: str) -> list[str]:
    """The passwords in ``url`` (decoded): in its user info and in its query string."""
    if "://" not in url:
        return []
    try:
        parts = urlsplit(url)
        found = [unquote(parts.password)] if parts.password else []
        query = parts.query
    except ValueError:  # malformed (an unencoded "[" or "]", a bad port): fall back on the shape
        match = _SHAPE.search(url)
        found = [unquote(match.group(0)[len(match.group(1)):-1])] if match else []
        query = url.partition("?")[2]
    found += [v for k, v in parse_qsl(query) if k.lower() in ("password", "passwd", "pwd") and v]
    return found


def remember(url: str | None) -> None:
    """Register the passwords of ``url`` (if any) so that :func:`redact` hides them from now on."""
    for password in passwords_of(url) if url else []:
        _known.update({password, quote(password, safe=""), quote(password), quote(password, safe="+")})
        # a parser that splits an unencoded password at "@" or ":" quotes a fragment of it in its error
        _known.update(part for part in re.split(r"[@:]", password) if len(part) >= 4 and part != password)


def redact_url(url: str | None) -> str:
    """``url`` fit to show: its passwords replaced by ``***`` (and remembered for :func:`redact`)."""
    if not url:
        return url or ""
    remember(url)
    return _QUERY.sub(lambda m: m.group(1) + MASK, _SHAPE.sub(lambda m: m.group(1) + MASK + "@", url))


def redact(text: str) -> str:
    """``text`` with the password of every URL in it, and every remembered password, hidden."""
    if not text:
        return text
    text = _QUERY.sub(lambda m: m.group(1) + MASK, _SHAPE.sub(lambda m: m.group(1) + MASK + "@", text))
    for secret in sorted(_known, key=len, reverse=True):
        if secret in text:  # not inside a longer word: a password "postgres" leaves "postgresql" alone
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", MASK, text)
    return text


def redact_data(node):
    """A copy of loaded YAML/JSON data in which the password of every URL-valued string is hidden."""
    if isinstance(node, dict):
        return {k: redact_data(v) for k, v in node.items()}
    if isinstance(node, list):
        return [redact_data(v) for v in node]
    if isinstance(node, str) and "://" in node:
        return redact_url(node)
    return node


def is_credential(key: str) -> bool:
    """Whether a setting named ``key`` (its last dotted part) holds a credential: one of its words is
    password, passwd, pwd, secret, token, apikey, credential(s) or auth, or two of them are api key,
    access key or private key (``download_token``, ``hfToken``, ``aws_secret_access_key``; not
    ``max_tokens`` or ``author``)."""
    words = [w.lower() for w in _WORD.findall(str(key).rpartition(".")[2])]
    return bool(_CREDENTIAL_WORDS.intersection(words) or _CREDENTIAL_PAIRS.intersection(zip(words, words[1:])))


def redact_settings(node):
    """A copy of settings (dotted ``section.key`` params, or nested YAML/JSON data) fit to log: the
    value of every credential-named key (:func:`is_credential`) is ``***`` (an empty or ``None`` one
    is left as it is: nothing to hide), and the password of every URL-valued string is hidden. The
    credentials hidden are remembered, as passwords are, so that :func:`redact` hides them from a
    later traceback too."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if is_credential(key) and value not in (None, ""):
                if isinstance(value, str) and len(value) >= 8:  # a shorter one would hide ordinary words
                    _known.add(value)
                out[key] = MASK
            else:
                out[key] = redact_settings(value)
        return out
    if isinstance(node, (list, tuple)):
        return [redact_settings(v) for v in node]
    return redact_data(node)


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``, passwords hidden: an exception fit for a one-line error
    (drivers append the SQL and a link on further lines)."""
    lines = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": "))
