"""``study.checkpoint_dir`` as an fsspec URL: object storage (``s3://bucket/prefix``, ``gs://``,
``abfs://``), where a study has a bucket that every machine reaches.

The store keeps the layout of a folder store, ``URL/STUDY/trial-N/``: the line's checkpoint under a
name of its own (``last-EPOCH-WINDOW-RANDOM.ckpt``) and ``last.json``, which names it
(:class:`orchestrator.training.stores.FsspecLine`). Only the protocols of :data:`PROTOCOLS` are
taken, each through its fsspec package (``s3fs``, ``gcsfs``, ``adlfs``...), installed on every
machine of the study. Credentials come from the backend's own configuration (for S3: the AWS
environment variables or ``~/.aws``, ``AWS_ENDPOINT_URL`` for an S3-compatible server; fsspec's
``FSSPEC_S3_*`` variables), never from the study file: a URL with a user or password, a query, a
fragment, a glob character or a chain of filesystems (``::``) is refused, and so is any protocol
but object storage's, where writing one object is atomic (not ``memory://``, which a retry on another
machine cannot read, ``http://``, which cannot be written, nor remote filesystems whose rename
does not replace). Nothing here imports fsspec until a URL is used.
"""

from __future__ import annotations

import re
import secrets

from orchestrator import names
from orchestrator.errors import StoreError

URL = re.compile(r"[a-z][a-z0-9+.-]*://")
#: what a store's URL may hold: printable ASCII without white space, glob characters (``* ? [ ]``,
#: which fsspec expands when it removes or moves), a user (``@``), a query or fragment, quotes or markup
_CHARS = re.compile(r"[A-Za-z0-9._~/:%+=,-]+")
#: the protocols a checkpoint store may use: object storage, where writing one object is atomic
PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az"})
#: the package each protocol needs, named in the message when it is missing
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs", "az": "adlfs"}


def is_url(value: str | None) -> bool:
    """Whether ``study.checkpoint_dir`` names a URL, or a chain of them (else a folder, or ``mlflow``)."""
    return bool(value) and ("://" in value or "::" in value.split("://", 1)[0])


def check(url: str) -> str:
    """``url`` if orch can keep checkpoints there; else a :class:`ValueError` saying why (a study
    file's value: nothing is opened or imported)."""
    if "::" in url.split("://", 1)[0]:
        raise ValueError("a chain of filesystems (::) is not a checkpoint store: give the store's own URL")
    if not URL.match(url):
        raise ValueError("not a checkpoint store's URL (a lower-case PROTOCOL://bucket/prefix) nor a folder orch "
                         "takes (a folder's name has no '://')")
    protocol = url.split("://", 1)[0]
    if protocol in ("file", "local"):
        raise ValueError("a file:// URL is a local folder: write the folder itself (on several machines, a shared "
                         "filesystem)")
    if protocol not in PROTOCOLS:
        raise ValueError(f"{protocol[:20]}:// is not a checkpoint store orch writes to: use object storage "
                         f"({', '.join(sorted(PROTOCOLS))}), a folder (on several machines, a shared filesystem), "
                         "or mlflow")
    rest = url[len(protocol) + 3:]
    if "@" in rest:
        raise ValueError("a checkpoint store's URL names no user or password (the study file is stored and shown): "
                         "give the credentials through the storage's own configuration (for S3: the AWS "
                         "environment variables or ~/.aws)")
    if "?" in rest or "#" in rest:
        raise ValueError("a checkpoint store's URL has no query or fragment (?, #): give the bucket and prefix only")
    if not _CHARS.fullmatch(rest or "/"):
        raise ValueError("a checkpoint store's URL is letters, digits and . _ ~ / : % + = , - only (no space, "
                         "glob character * ? [ ], quote or control character)")
    if not rest.strip("/"):
        raise ValueError(f"{protocol}:// names no bucket")
    if any(part in (".", "..") for part in rest.split("/")):
        raise ValueError("a checkpoint store's URL has no '.' or '..' component")
    return url


def open_root(url: str):
    """The filesystem of the store ``url`` and its root path in it (:class:`StoreError` where the
    protocol's package is missing)."""
    import fsspec

    try:
        check(url)
    except ValueError as exc:  # a URL read back from a stored study file
        raise StoreError(f"study.checkpoint_dir {names.shown(url)}: {exc}") from None
    protocol = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package = PACKAGES.get(protocol, f"the fsspec package for {protocol}://")
        raise StoreError(f"study.checkpoint_dir is {url}, which needs {package} on every machine of the "
                         f"study: pip install {package}") from None


def line_path(root: str, study: str, lineage: int) -> str:
    """The path of a line of trials in the store whose root path is ``root``: ``ROOT/STUDY/trial-N``."""
    return f"{study_path(root, study)}/trial-{int(lineage)}"


def study_path(root: str, study: str) -> str:
    return f"{root.rstrip('/')}/{names.check(study)}"


def probe(url: str, study: str) -> None:
    """Write, list, read back and remove a small object in the study's folder of the store, before
    any trial runs (:class:`StoreError` naming the store and the reason: no such bucket, no
    credentials, a policy that lets orch write but not read...)."""
    fs, root = open_root(url)
    path = f"{study_path(root, study)}/.orch-probe-{secrets.token_hex(8)}"
    try:
        fs.pipe_file(path, b"orch")
        try:
            fs.ls(study_path(root, study), refresh=True)
            if fs.cat_file(path) != b"orch":
                raise OSError("the object read back differs from the one written")
        finally:
            fs.rm_file(path)
    except Exception as exc:  # noqa: BLE001 - each backend has errors of its own: all are reported
        raise StoreError(f"cannot use the checkpoint store {url} (study.checkpoint_dir): {describe(exc)}; check "
                         "the bucket and the credentials (the storage's own configuration), then run the same "
                         "command again") from None


def describe(exc: BaseException) -> str:
    """``Type: message`` of a store's error, on one line and cut short."""
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text[:200]}"
