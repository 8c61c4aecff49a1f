"""``study.checkpoint_dir`` as an fsspec URL: object storage (``s3://bucket/prefix``, ``gs://``,
``abfs://``...) or a remote filesystem, where a study has one that every machine reaches.

The store keeps the layout of a folder store, ``URL/STUDY/trial-N/``: the line's checkpoint under a
name of its own (``last-EPOCH-WINDOW-RANDOM.ckpt``) and ``last.json``, which names it
(:class:`orchestrator.training.stores.FsspecLine`). Only the protocols of :data:`PROTOCOLS` are
taken, each through its fsspec package (``s3fs``, ``gcsfs``, ``adlfs``...), installed on every
machine of the study. Credentials come from the backend's own configuration (for S3: the AWS
environment variables or ``~/.aws``, ``AWS_ENDPOINT_URL`` for an S3-compatible server; fsspec's
``FSSPEC_S3_*`` variables), never from the study file: a URL with a password, a query, a fragment
or a chain of filesystems (``::``) is refused, and so are protocols a retry on another machine
cannot read (``memory://``) or that cannot be written (``http://``). Nothing here imports fsspec
until a URL is used.
"""

from __future__ import annotations

import re
import secrets
from urllib.parse import urlsplit

from orchestrator import names
from orchestrator.errors import StoreError

URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: the protocols a checkpoint store may use: object storage and filesystems shared between machines
PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az", "adl", "oci", "oss", "hdfs", "webhdfs",
                       "sftp", "ssh", "smb", "dbfs"})
#: the package each protocol needs, named in the message when it is missing
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs", "az": "adlfs",
            "adl": "adlfs", "oci": "ocifs", "oss": "ossfs", "hdfs": "pyarrow", "sftp": "paramiko",
            "ssh": "paramiko", "smb": "smbprotocol"}


def is_url(value: str | None) -> bool:
    """Whether ``study.checkpoint_dir`` names a URL, or a chain of them (else a folder, or ``mlflow``)."""
    return bool(value) and ("://" in value or "::" in value)


def check(url: str) -> str:
    """``url`` if orch can keep checkpoints there; else a :class:`ValueError` saying why (a study
    file's value: nothing is opened or imported)."""
    if "::" in url:
        raise ValueError("a chain of filesystems (::) is not a checkpoint store: give the store's own URL")
    if not URL.match(url):
        raise ValueError("not a URL (PROTOCOL://...) nor a folder orch takes: name a folder without '://'")
    protocol = url.split("://", 1)[0].lower()
    if protocol in ("file", "local"):
        raise ValueError("a file:// URL is a local folder: write the folder itself (on several machines, a shared "
                         "filesystem)")
    if protocol not in PROTOCOLS:
        raise ValueError(f"{protocol[:20]}:// is not a checkpoint store orch writes to: use object storage or a "
                         f"shared filesystem ({', '.join(sorted(PROTOCOLS))}), a folder, or mlflow")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"not a URL orch can read ({exc})") from None
    if parts.password is not None:
        raise ValueError("a checkpoint store's URL carries no password (the study file is stored and shown): "
                         "give the credentials through the storage's own configuration (for S3: the AWS "
                         "environment variables or ~/.aws)")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("a checkpoint store's URL has no query or fragment (?, #): give the bucket and prefix only")
    if not (parts.netloc + parts.path).strip("/"):
        raise ValueError(f"{protocol}:// names no bucket or folder")
    if any(part in (".", "..") for part in parts.path.split("/")):
        raise ValueError("a checkpoint store's URL has no '.' or '..' component")
    return url


def open_root(url: str):
    """The filesystem of the store ``url`` and its root path in it (:class:`StoreError` where the
    protocol's package is missing)."""
    import fsspec

    check(url)
    protocol = url.split("://", 1)[0].lower()
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
    """Write and remove a small object in the study's folder of the store, before any trial runs
    (:class:`StoreError` naming the store and the reason: no such bucket, no credentials...)."""
    fs, root = open_root(url)
    path = f"{study_path(root, study)}/.orch-probe-{secrets.token_hex(8)}"
    try:
        fs.pipe_file(path, b"orch")
        fs.rm_file(path)
    except Exception as exc:  # noqa: BLE001 - each backend has errors of its own: all are reported
        detail = names.shown(str(exc) or type(exc).__name__, 200)
        raise StoreError(f"cannot write to the checkpoint store {url} (study.checkpoint_dir): "
                         f"{type(exc).__name__}: {detail}; check the bucket and the credentials "
                         "(the storage's own configuration), then run the same command again") from None
