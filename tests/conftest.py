from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_ptb_dir() -> Path | None:
    """The shared Penn Treebank copy, if this machine has it."""
    candidates = []
    if os.environ.get("ORCH_DATA_DIR"):
        candidates.append(Path(os.environ["ORCH_DATA_DIR"]) / "ptb")
    candidates.append(REPO.parent / "shared" / "data" / "ptb")
    for c in candidates:
        if (c / "ptb.train.txt").exists():
            return c
    return None


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
