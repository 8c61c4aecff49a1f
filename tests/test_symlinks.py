"""Links planted by someone who can write to a store, checkpoint or cache folder, at every name orch
writes there (issue 21): orch never writes through them, never removes through them, and does its
job or refuses in one line. Journal files that are not journals (a device, a FIFO, another file,
another study's journal) are refused before they are read, untouched, their content never shown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import pytorch_lightning as pl
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader, TensorDataset

from orch_plugins.datasets.ptb import PTB, _tensor_file
from orchestrator import cache, schema
from orchestrator.cli import main
from orchestrator.errors import StoreError, UsageError
from orchestrator.execution.claims import claim_lock
from orchestrator.registry.listing import LISTING
from orchestrator.storage import owners, probes
from orchestrator.storage.backends import open_storage
from orchestrator.training import checkpoints

from helpers import echo_study, load, orch, write, write_corpus

VICTIM = b"the victim's own bytes: never to be changed by orch\n"


@pytest.fixture
def outside(tmp_path):
    """A folder outside every store, holding the victim file; ``outside.check()`` asserts that
    nothing in it changed and nothing was added."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "victim.txt").write_bytes(VICTIM)

    class Outside:
        path = folder
        victim = folder / "victim.txt"

        @staticmethod
        def target(dangling: bool) -> Path:
            return folder / "nothing" if dangling else folder / "victim.txt"

        @staticmethod
        def check() -> None:
            assert {p.name: p.read_bytes() for p in folder.iterdir()} == {"victim.txt": VICTIM}

    return Outside


def plant(at: Path, target: Path) -> Path:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(target)
    return at


def still_planted(*links: Path) -> None:
    """The planted links are still there, untouched (orch wrote beside them, not through them)."""
    for link in links:
        assert link.is_symlink(), link


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def one_line_refusal(result) -> str:
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


# ---- probe files --------------------------------------------------------------------------------
@pytest.mark.parametrize("dangling", [False, True], ids=["link", "dangling"])
def test_study_create_probes_beside_links_planted_at_the_probe_names(tmp_path, monkeypatch, outside, dangling):
    monkeypatch.chdir(tmp_path)
    study = write(tmp_path / "tiny.yaml", echo_study(trials=2))
    name = f".orch-probe-{os.getpid()}"  # the name this process's probes had
    links = [plant(tmp_path / "mlruns" / sub / name, outside.target(dangling)) for sub in ("optuna", ".", "artifacts")]
    result = invoke("study", "create", study)
    assert result.exit_code == 0, result.output
    outside.check()
    still_planted(*links)
    assert json.loads(result.stdout)["budget"] == 2
    assert not [p for p in (tmp_path / "mlruns").rglob(".orch-probe-*") if not p.is_symlink()]  # none left


@pytest.mark.parametrize("dangling", [False, True], ids=["link", "dangling"])
def test_the_checkpoint_store_probe_writes_beside_a_planted_link(tmp_path, outside, dangling):
    store = tmp_path / "mlruns" / "checkpoints"
    link = plant(store / f".orch-probe-{os.getpid()}", outside.target(dangling))
    probes.probe(store, "the checkpoint store")
    outside.check()
    still_planted(link)
    assert [p.name for p in store.iterdir()] == [link.name]


@pytest.mark.slow  # two real study runs
@pytest.mark.parametrize("dangling", [False, True], ids=["link", "dangling"])
def test_a_link_planted_at_the_journal_s_presence_file_is_refused_not_followed(tmp_path, outside, dangling):
    """``study run`` holds ``NAME.journal.STUDY.live`` (for ``study repair``) for its whole life: a link
    planted there is refused with one line before any trial, never opened."""
    link = plant(tmp_path / "mlruns" / "optuna" / "tiny.journal.tiny.live", outside.target(dangling))
    proc = orch("study", "run", write(tmp_path / "tiny.yaml", echo_study(trials=1)), cwd=tmp_path)
    assert proc.returncode == 2 and "it is a link" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    outside.check()
    still_planted(link)
    assert load(tmp_path)[0].trials == []


# ---- checkpoints ----------------------------------------------------------------------------------
class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Planter(pl.Callback):
    """Plants links once the fit has started (its LastCheckpoint has taken the folder)."""

    def __init__(self, links: dict[Path, Path]):
        self.links = links

    def on_train_start(self, trainer, module) -> None:
        for at, target in self.links.items():
            plant(at, target)


def fit_keeping_last(directory: Path, key: str = "key", epochs: int = 3, links: dict | None = None) -> None:
    """A real Lightning fit whose LastCheckpoint keeps ``last.ckpt`` in ``directory`` (``links``:
    planted when the fit starts)."""
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[checkpoints.LastCheckpoint(directory, key),
                                                       Planter(links or {})], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu")
    trainer.fit(Tiny(), data)


@pytest.mark.parametrize("dangling", [False, True], ids=["link", "dangling"])
def test_checkpoint_temporaries_and_files_are_never_written_through_planted_links(tmp_path, outside, dangling):
    folder = checkpoints.folder(tmp_path / "store", "tiny", 0)
    folder.mkdir(parents=True)
    pid = os.getpid()  # the temporary names this process had
    temporaries = [folder / f"last.ckpt.{pid}.tmp", folder / f"last.json.{pid}.tmp"]
    finals = [folder / "last.ckpt", folder / "last.json"]
    # planted before the fit (while others could write to the folder): removed when the fit takes it
    for at in temporaries + finals:
        plant(at, outside.target(dangling))
    fit_keeping_last(folder, links={at: outside.target(dangling) for at in temporaries + finals})
    outside.check()
    still_planted(*temporaries)  # planted again during the fit: written beside, never through
    # the final names were replaced by the checkpoint files, not written through
    assert not any(at.is_symlink() for at in finals)
    assert json.loads((folder / "last.json").read_text()) == {"epoch": 1, "window": None, "key": "key"}
    assert checkpoints.resume_point(folder, "key") == (2, None)
    assert "state_dict" in torch.load(folder / "last.ckpt", weights_only=True)
    assert sorted(p.name for p in folder.iterdir() if not p.is_symlink()) == ["last.ckpt", "last.json"]


def test_a_link_planted_at_a_trial_folder_is_removed_never_followed(tmp_path, outside):
    (outside.path / "last.ckpt").write_bytes(b"someone else's checkpoint")
    (outside.path / "last.json").write_text(json.dumps({"epoch": 5, "key": "key"}))
    before = {p.name: p.read_bytes() for p in outside.path.iterdir()}
    folder = checkpoints.folder(tmp_path / "store", "tiny", 3)
    plant(folder, outside.path)
    # a retry: nothing to resume from through the link, and the fit writes to a folder of its own
    assert checkpoints.resume_point(folder, "key") is None
    fit_keeping_last(folder)
    assert folder.is_dir() and not folder.is_symlink()
    assert checkpoints.resume_point(folder, "key") == (2, None)
    # a new line (or an ended trial): the link is removed, and what it pointed to is left alone
    plant(tmp_path / "store" / "tiny" / "trial-4", outside.path)
    checkpoints.remove(tmp_path / "store" / "tiny" / "trial-4")
    assert not (tmp_path / "store" / "tiny" / "trial-4").exists()
    (folder / "escape").symlink_to(outside.path)  # a link inside a trial folder: removed, not followed
    checkpoints.remove(folder)
    assert not folder.exists()
    assert {p.name: p.read_bytes() for p in outside.path.iterdir()} == before


def test_a_study_folder_that_leads_out_of_the_checkpoint_store_is_refused(tmp_path, outside):
    store = tmp_path / "store"
    plant(store / "tiny", outside.path)
    with pytest.raises(UsageError, match="would lead out of"):
        checkpoints.folder(store, "tiny", 0)
    (store / "other").mkdir()
    plant(store / "inner", store / "other")  # inside the store, but another study's folder
    with pytest.raises(StoreError, match="is a symbolic link"):
        checkpoints.folder(store, "inner", 0)
    with pytest.raises(ValueError):
        checkpoints.folder(store, "real", "../../outside")  # a lineage read from a shared storage
    outside.check()


@pytest.mark.slow
def test_study_run_with_a_link_planted_at_its_trial_folder(tmp_path, outside):
    """End to end (about 30 s): the trial's folder is a link to a folder outside the store."""
    (outside.path / "last.ckpt").write_bytes(b"someone else's checkpoint")
    before = {p.name: p.read_bytes() for p in outside.path.iterdir()}
    plant(tmp_path / "mlruns" / "checkpoints" / "tiny" / "trial-0", outside.path)
    data = echo_study(trials=1)
    data["trainer"]["max_epochs"] = 2
    ran = orch("study", "run", write(tmp_path / "tiny.yaml", data), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    study, *_ = load(tmp_path)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]
    assert {p.name: p.read_bytes() for p in outside.path.iterdir()} == before
    assert not (tmp_path / "mlruns" / "checkpoints" / "tiny" / "trial-0").exists()  # the link removed, not followed


# ---- journals: torn tails, repair temporaries and backups ------------------------------------------
def make_journal(path: Path, name: str = "tiny", trials: int = 3) -> bytes:
    """A real Optuna journal of study ``name`` with ``trials`` complete trials; returns its bytes."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=trials)
    return path.read_bytes()


def stamps(seconds: int = 4) -> list[str]:
    """The time stamps orch's journal files were named after, from now on."""
    now = time.time()
    return [time.strftime("%Y%m%d-%H%M%S", time.gmtime(now + s)) for s in range(seconds)]


@pytest.mark.parametrize("dangling", [False, True], ids=["link", "dangling"])
def test_a_torn_tail_is_kept_beside_links_planted_at_its_names(tmp_path, outside, dangling):
    path = tmp_path / "mlruns" / "optuna" / "tiny.journal"
    data = make_journal(path)
    path.write_bytes(data + b'{"op_code": 4, "wor')  # a record cut off mid-write
    links = [plant(path.parent / f"tiny.journal.torn-{s}", outside.target(dangling)) for s in stamps()]
    optuna.load_study(study_name="tiny", storage=open_storage(f"journal:{path}")).set_user_attr("after", 1)
    outside.check()
    still_planted(*links)
    assert path.read_bytes().startswith(data)
    (torn,) = [p for p in path.parent.glob("tiny.journal.torn-*") if not p.is_symlink()]
    assert torn.read_bytes() == b'{"op_code": 4, "wor'


def damaged(path: Path, data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    broken = b"".join(lines[:3] + [b"\x00\x17garbage from a bad disk\n"] + lines[3:])
    path.write_bytes(broken)
    return broken


def repair(path: Path, name: str = "tiny"):
    return invoke("study", "repair", name, "--storage", f"journal:{path}")


@pytest.mark.parametrize("dangling", [False, True], ids=["link", "dangling"])
def test_repair_writes_beside_links_planted_at_its_temporary_and_backup_names(tmp_path, outside, dangling):
    path = tmp_path / "tiny.journal"
    data = make_journal(path)
    broken = damaged(path, data)
    links = [plant(tmp_path / "tiny.journal.repair-tmp", outside.target(dangling))]
    links += [plant(tmp_path / f"tiny.journal.bak-{s}", outside.target(dangling)) for s in stamps()]
    result = repair(path)
    assert result.exit_code == 0, result.output
    outside.check()
    still_planted(*links)
    report = json.loads(result.stdout)
    assert report["dropped_lines"] == [4] and path.read_bytes() == data
    backup = Path(report["backup"])
    assert not backup.is_symlink() and backup.read_bytes() == broken


def test_two_repairs_in_one_second_keep_two_backups(tmp_path):
    path = tmp_path / "tiny.journal"
    data = make_journal(path)
    first = damaged(path, data)
    one = json.loads(repair(path).stdout)
    second = first.replace(b"garbage", b"GARBAGE")
    path.write_bytes(second)
    two = json.loads(repair(path).stdout)
    assert one["backup"] != two["backup"]
    assert Path(one["backup"]).read_bytes() == first and Path(two["backup"]).read_bytes() == second
    assert path.read_bytes() == data


@pytest.mark.parametrize("content", ["passwd", "random", "other study", "empty"])
def test_repair_refuses_a_file_that_is_no_journal_of_the_study(tmp_path, content):
    path = tmp_path / "tiny.journal"
    if content == "passwd":
        path.write_bytes(Path("/etc/passwd").read_bytes() + b"root:x:0:0:a secret of the file:/root:/bin/sh\n")
    elif content == "random":
        path.write_bytes(os.urandom(8192))
    elif content == "other study":
        damaged(path, make_journal(path, name="other"))
    else:
        path.write_bytes(b"")
    before = path.read_bytes()
    message = one_line_refusal(repair(path))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["tiny.journal"]
    assert "Nothing was changed" in message and "secret" not in message and "root:x" not in message
    if content == "other study":
        assert "not a journal of study 'tiny'" in message and "other" not in message.split("tiny.journal")[1]


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_repair_refuses_while_a_live_process_runs_a_trial_or_claims_one(tmp_path, sleeper):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = tmp_path / "tiny.journal"
    make_journal(path, trials=1)
    study = optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(path))))
    study.ask().set_user_attr(schema.WORKER, owners.worker_id(sleeper.pid))  # a trial a live process runs
    broken = damaged(path, path.read_bytes())
    message = one_line_refusal(repair(path))
    assert f"running in process {sleeper.pid}" in message and path.read_bytes() == broken
    assert not list(tmp_path.glob("*.bak-*")) and not list(tmp_path.glob("*.tmp"))

    sleeper.kill()
    sleeper.wait()
    lock_file = claim_lock(f"journal:{path}", "tiny").lock_file
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom filelock import FileLock\n"
                               "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); "
                               "time.sleep(120)", lock_file], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        message = one_line_refusal(repair(path))
        assert "is using" in message and path.read_bytes() == broken
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    # a live `study run`/`study worker` between trials: it holds the journal's presence lock for its life
    idle = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom orchestrator.storage import presence\n"
                             "with presence.present('journal:' + sys.argv[1], 'tiny'):\n"
                             "    print('present', flush=True); time.sleep(120)", str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert idle.stdout.readline().strip() == "present"
        message = one_line_refusal(repair(path))
        assert "is using" in message and path.read_bytes() == broken
    finally:
        idle.send_signal(signal.SIGKILL)  # the kernel drops its lock with it
        idle.wait()
    assert repair(path).exit_code == 0  # its processes gone: repaired


# ---- journal paths that are not regular files -------------------------------------------------------
@pytest.fixture(params=["/dev/zero", "fifo", "folder", "link to /dev/zero", "dangling link"])
def not_a_file(request, tmp_path):
    if request.param == "/dev/zero":
        return Path("/dev/zero")
    path = tmp_path / "tiny.journal"
    if request.param == "fifo":
        os.mkfifo(path)
    elif request.param == "folder":
        path.mkdir()
    elif request.param == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    else:
        path.symlink_to(tmp_path / "nowhere" / "tiny.journal")
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["show", "repair", "create"])
def test_a_journal_that_is_not_a_regular_file_is_refused_at_once(tmp_path, monkeypatch, not_a_file, command):
    monkeypatch.chdir(tmp_path)
    args = {"show": ["study", "show", "tiny"], "repair": ["study", "repair", "tiny"],
            "create": ["study", "create", write(tmp_path / "tiny.yaml", echo_study(trials=2))]}[command]
    before = sorted(os.listdir(not_a_file.parent))
    start = time.monotonic()
    result = invoke(*args, "--storage", f"journal:{not_a_file}")
    took = time.monotonic() - start
    message = one_line_refusal(result)
    assert str(not_a_file) in message
    assert "not a journal file" in message or (command == "show" and "nowhere/tiny.journal does not exist" in message)
    if command != "create":  # create checks the study file and its plugins first
        assert took < 1, took
    assert sorted(os.listdir(not_a_file.parent)) == before  # no lock, probe or backup beside it
    assert not (tmp_path / "nowhere").exists()


def test_a_journal_error_never_quotes_the_file(tmp_path):
    copy = tmp_path / "passwd"
    copy.write_bytes(b"root:x:0:0:a secret of the file:/root:/bin/sh\n" + Path("/etc/passwd").read_bytes())
    for args in (["study", "show", "tiny"], ["study", "repair", "tiny"]):
        message = one_line_refusal(invoke(*args, "--storage", f"journal:{copy}"))
        assert "secret" not in message and "root:x" not in message
    path = tmp_path / "tiny.journal"
    make_journal(path)
    with open(path, "ab") as f:
        f.write(b"a secret line\n")
    message = one_line_refusal(invoke("study", "show", "tiny", "--storage", f"journal:{path}"))
    assert "damaged at line" in message and "secret" not in message


# ---- the user cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dangling", [False, True], ids=["link", "dangling"])
def test_cache_files_are_replaced_not_written_through(tmp_path, monkeypatch, outside, dangling):
    root = tmp_path / "cache"
    monkeypatch.setenv("ORCH_CACHE_DIR", str(root))
    link = plant(root / LISTING, outside.target(dangling))
    assert cache.read(LISTING) is None  # a link is no cache, whatever it points to
    cache.write(LISTING, {"plugins": 1})
    outside.check()
    assert not link.is_symlink() and cache.read(LISTING) == {"plugins": 1}
    # a folder of the cache that leads out of it: nothing is written there
    plant(root / "tensors", outside.path)
    cache.write("tensors/x.json", [1])
    assert cache.read("tensors/x.json") is None
    outside.check()


@pytest.mark.parametrize("dangling", [False, True], ids=["link", "dangling"])
def test_ptb_tensor_cache_is_written_beside_a_planted_link(tmp_path, monkeypatch, outside, corpus, dangling):
    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / "cache"))
    folder, sums = corpus
    kept = plant(tmp_path / "cache" / _tensor_file(sums), outside.target(dangling))
    ds = PTB(data_dir=str(folder), checksums=sums)
    expected = reference_ids(folder)
    assert {split: ids.tolist() for split, ids in ds._load().items()} == expected
    outside.check()
    assert not kept.is_symlink() and torch.load(kept, weights_only=True)["ids"]["train"].tolist() == expected["train"]


def reference_ids(folder: Path) -> dict[str, list[int]]:
    """Word ids of the corpus in ``folder``, made here from the text: ids by descending frequency in
    train, ties alphabetically, ``<eos>`` at each line end."""
    from collections import Counter

    words = {split: [w for line in (folder / f"ptb.{split}.txt").read_text().splitlines()
                     for w in line.split() + ["<eos>"]] for split in ("train", "valid", "test")}
    counts = Counter(words["train"])
    index = {w: i for i, w in enumerate(sorted(counts, key=lambda w: (-counts[w], w)))}
    return {split: [index[w] for w in ws] for split, ws in words.items()}


def test_a_tampered_ptb_cache_is_rebuilt_not_trusted(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / "cache"))
    folder, sums = corpus
    expected = reference_ids(folder)
    PTB(data_dir=str(folder), checksums=sums).describe()
    kept = tmp_path / "cache" / _tensor_file(sums)
    saved = torch.load(kept, weights_only=True)
    assert saved["sources"] == sums

    def loaded() -> dict[str, list[int]]:
        return {split: ids.tolist() for split, ids in PTB(data_dir=str(folder), checksums=sums)._load().items()}

    # every token replaced by 0, the rest (and the recorded checksums) left as they were
    torch.save({**saved, "ids": {s: torch.zeros_like(t) for s, t in saved["ids"].items()}}, kept)
    assert loaded() == expected
    assert torch.load(kept, weights_only=True)["ids"]["train"].tolist() == expected["train"]  # rewritten whole

    # a cache made from other files, put under this corpus's name: its recorded checksums differ
    other = tmp_path / "other"
    other_sums = write_corpus(other, seed=3)
    PTB(data_dir=str(other), checksums=other_sums).describe()
    kept.write_bytes((tmp_path / "cache" / _tensor_file(other_sums)).read_bytes())
    assert loaded() == expected
    assert torch.load(kept, weights_only=True)["sources"] == sums

    # a cache file that another user could have written (writable by all) is not read: written anew
    torch.save(saved, kept)
    os.chmod(kept, 0o666)
    assert loaded() == expected
    assert kept.stat().st_mode & 0o022 == 0
