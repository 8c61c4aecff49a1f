from __future__ import annotations

import hashlib
import os
import random
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAMES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")


def shared_ptb_dir() -> Path | None:
    """The shared Penn Treebank copy (``$ORCH_DATA_DIR/ptb`` or ``../shared/data/ptb``), if present."""
    root = os.environ.get("ORCH_DATA_DIR")
    candidates = [Path(root) / "ptb"] if root else []
    candidates.append(REPO.parent / "shared" / "data" / "ptb")
    return next((c for c in candidates if all((c / n).is_file() for n in NAMES)), None)


def write_corpus(folder: Path, seed: int = 0) -> dict[str, str]:
    """A tiny PTB-like corpus in ``folder``; returns its SHA-256 per file name."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(30)] + ["<unk>", "N"]
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for name, n_lines in zip(NAMES, (120, 30, 25)):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(n_lines)]
        if name == "ptb.train.txt":
            lines.append(" ".join(words))  # every word occurs in train
        data = ("".join(f" {line} \n" for line in lines)).encode()
        (folder / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums



@pytest.fixture
def corpus(tmp_path):
    """A tiny generated PTB-like corpus: ``(folder, checksums)``."""
    folder = tmp_path / "corpus"
    return folder, write_corpus(folder)


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """A third-party distribution on sys.path: ``make(name, entry_points_txt, {module: source})``."""

    def make(name: str, entry_points: str, modules: dict[str, str] | None = None, version: str = "1.0"):
        root = tmp_path / "site"
        info = root / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
        for mod, src in (modules or {}).items():
            (root / f"{mod}.py").write_text(textwrap.dedent(src))
        monkeypatch.syspath_prepend(str(root))
        from orchestrator import registry

        registry._cache.clear()
        return root

    yield make
    from orchestrator import registry

    registry._cache.clear()
