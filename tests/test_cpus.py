"""The usable cores (:mod:`orchestrator.cpus`): the affinity mask, cgroup v1 and v2 CPU quotas
(their parents' too) and ``ORCH_CPUS``, on fake ``/proc`` and ``/sys`` trees; then real processes
under ``taskset`` and in a real cgroup with a quota, and what ``orch doctor``, the worker slots and
``orch train`` make of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.cpus import Cpus, limit_threads, torch_threads, usable_cpus
from orchestrator.errors import UsageError

from helpers import REPO, echo_study, write

V2_MOUNT = "30 23 0:27 {root} /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw\n"
V1_MOUNTS = ("34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime shared:12 - cgroup cgroup rw,cpuset\n"
             "35 31 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:13 - cgroup cgroup rw,cpu,cpuacct\n")


@pytest.fixture
def cores(monkeypatch):
    """A machine of 8 cores whose affinity mask allows ``allowed`` of them (all by default)."""

    def set_cores(allowed: int = 8) -> None:
        monkeypatch.setattr(os, "cpu_count", lambda: 8)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(allowed)), raising=False)

    set_cores()
    return set_cores


def tree(root: Path, cgroup: str, mountinfo: str | None, files: dict[str, str]) -> Path:
    """A fake ``/proc/self/{cgroup,mountinfo}`` and cgroup files under ``root``."""
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "self" / "cgroup").write_text(cgroup)
    if mountinfo is not None:
        (root / "proc" / "self" / "mountinfo").write_text(mountinfo)
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


POD = "sys/fs/cgroup/kubepods/pod1/ctr"


# ---- fake trees -----------------------------------------------------------------------------------

def test_a_cgroup_v2_quota_is_rounded_up(tmp_path, cores):
    root = tree(tmp_path, "0::/kubepods/pod1/ctr\n", V2_MOUNT.format(root="/"), {f"{POD}/cpu.max": "150000 100000\n"})
    cpus = usable_cpus({}, root)
    assert cpus.count == 2
    assert cpus.source == "cgroup v2 CPU quota 150000/100000 → 2, set in /sys/fs/cgroup/kubepods/pod1/ctr"
    (root / POD / "cpu.max").write_text("50000 100000\n")  # half a core is still one
    assert usable_cpus({}, root).count == 1


def test_max_is_no_limit(tmp_path, cores):
    root = tree(tmp_path, "0::/kubepods/pod1/ctr\n", V2_MOUNT.format(root="/"),
                {f"{POD}/cpu.max": "max 100000\n", "sys/fs/cgroup/kubepods/pod1/cpu.max": "max 100000\n"})
    assert usable_cpus({}, root) == Cpus(8, "os.cpu_count(): all 8 cores, no affinity mask or cgroup CPU quota")


def test_the_smallest_quota_on_the_way_up_counts(tmp_path, cores):
    root = tree(tmp_path, "0::/kubepods/pod1/ctr\n", V2_MOUNT.format(root="/"),
                {f"{POD}/cpu.max": "max 100000\n", "sys/fs/cgroup/kubepods/pod1/cpu.max": "250000 100000\n",
                 "sys/fs/cgroup/kubepods/cpu.max": "600000 100000\n"})
    cpus = usable_cpus({}, root)
    assert cpus.count == 3 and cpus.source.endswith("250000/100000 → 3, set in /sys/fs/cgroup/kubepods/pod1")
    (root / "sys/fs/cgroup/kubepods/cpu.max").write_text("100000 100000\n")
    assert usable_cpus({}, root).count == 1


def test_a_namespaced_cgroup_is_read_at_its_mount_point(tmp_path, cores):
    """In a container the mount's root is the container's cgroup: its limit is at the mount point."""
    root = tree(tmp_path, "0::/\n", V2_MOUNT.format(root="/kubepods/pod1"), {"sys/fs/cgroup/cpu.max": "300000 100000"})
    assert usable_cpus({}, root).count == 3


def test_a_cgroup_v1_quota(tmp_path, cores):
    files = {"sys/fs/cgroup/cpu,cpuacct/slurm/job_7/cpu.cfs_quota_us": "300000\n",
             "sys/fs/cgroup/cpu,cpuacct/slurm/job_7/cpu.cfs_period_us": "100000\n",
             "sys/fs/cgroup/cpu,cpuacct/slurm/cpu.cfs_quota_us": "-1\n",
             "sys/fs/cgroup/cpu,cpuacct/slurm/cpu.cfs_period_us": "100000\n",
             "sys/fs/cgroup/cpuset/cpu.cfs_quota_us": "100000\n"}  # not the cpu hierarchy: never read
    root = tree(tmp_path, "5:cpuset:/\n4:cpu,cpuacct:/slurm/job_7\n", V1_MOUNTS, files)
    cpus = usable_cpus({}, root)
    assert cpus == Cpus(3, "cgroup v1 CPU quota 300000/100000 → 3, set in /sys/fs/cgroup/cpu,cpuacct/slurm/job_7")
    # without a mountinfo, the usual mount points are looked at
    (root / "proc" / "self" / "mountinfo").unlink()
    assert usable_cpus({}, root).count == 3


def test_the_affinity_mask_and_a_quota_the_smaller_wins(tmp_path, cores):
    root = tree(tmp_path, "0::/kubepods/pod1/ctr\n", V2_MOUNT.format(root="/"), {f"{POD}/cpu.max": "400000 100000"})
    cores(2)
    assert usable_cpus({}, root) == Cpus(2, "affinity mask (taskset/cpuset): 2 of 8 cores")
    cores(6)
    assert usable_cpus({}, root).count == 4


def test_no_cgroup_files_and_unreadable_ones_are_skipped(tmp_path, cores):
    assert usable_cpus({}, tmp_path / "nothing").count == 8
    cores(3)
    assert usable_cpus({}, tmp_path / "nothing") == Cpus(3, "affinity mask (taskset/cpuset): 3 of 8 cores")
    cores()
    root = tree(tmp_path / "bad", "0::/kubepods/pod1/ctr\nnot a line\n", "garbage\n",
                {f"{POD}/cpu.max": "banana 100000", "sys/fs/cgroup/kubepods/pod1/cpu.max/x": "a folder, not a file",
                 "sys/fs/cgroup/kubepods/cpu.max": "0 100000"})
    assert usable_cpus({}, root).count == 8


def test_orch_cpus_overrides_everything(tmp_path, cores):
    root = tree(tmp_path, "0::/kubepods/pod1/ctr\n", V2_MOUNT.format(root="/"), {f"{POD}/cpu.max": "100000 100000"})
    assert usable_cpus({"ORCH_CPUS": "3"}, root) == Cpus(3, "ORCH_CPUS=3")
    assert usable_cpus({"ORCH_CPUS": " 12 "}, root).count == 12
    assert usable_cpus({"ORCH_CPUS": ""}, root).count == 1  # empty: as if unset


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_an_invalid_orch_cpus_is_a_usage_error(value):
    with pytest.raises(UsageError) as caught:
        usable_cpus({"ORCH_CPUS": value})
    message = str(caught.value)
    assert message.startswith(f"ORCH_CPUS={value!r}: expected a positive whole number") and "\n" not in message


def test_torch_threads_follow_the_cores_unless_the_user_set_omp_num_threads():
    assert torch_threads(Cpus(3, "x"), {}) == 3
    env = {"ORCH_CPUS": "3"}
    assert limit_threads(env) == 3 and env["OMP_NUM_THREADS"] == "3"
    env = {"ORCH_CPUS": "3", "OMP_NUM_THREADS": "5"}
    assert limit_threads(env) == 5 and env["OMP_NUM_THREADS"] == "5"  # theirs, kept
    env = {"ORCH_CPUS": "3", "OMP_NUM_THREADS": "lots"}
    assert limit_threads(env) == 3 and env["OMP_NUM_THREADS"] == "lots"  # not ours to correct


def test_the_worker_slots_split_the_usable_cores(cores):
    from orchestrator.execution.slots import slots_for

    resources = SimpleNamespace(devices=None, workers=None, trials_per_device=1)
    study = SimpleNamespace(base=SimpleNamespace(trainer={"accelerator": "cpu"}),
                            section=SimpleNamespace(resources=resources))
    assert [s.threads for s in slots_for(study, None, 2, None)] == [4, 4]
    cores(2)
    assert [s.threads for s in slots_for(study, None, 2, None)] == [1, 1]


# ---- real processes -------------------------------------------------------------------------------

def _clean_env(**more) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ORCH_CPUS", "OMP_NUM_THREADS")}
    return {**env, "PYTHONPATH": str(REPO), **more}


def one_core() -> list[str]:
    """``taskset -c N``: one core of those this process may use."""
    if shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"):
        pytest.skip("needs taskset and an affinity mask (Linux)")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("a one-core machine: an affinity mask of one core limits nothing")
    return ["taskset", "-c", str(min(os.sched_getaffinity(0)))]


def test_taskset_one_core_is_one_usable_core():
    proc = subprocess.run([*one_core(), sys.executable, "-c", "from orchestrator.cpus import usable_cpus; "
                           "print(usable_cpus())"], capture_output=True, text=True, env=_clean_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("1 (affinity mask (taskset/cpuset): 1 of "), proc.stdout


def test_orch_doctor_names_the_usable_cores_and_where_they_come_from(tmp_path):
    proc = subprocess.run([*one_core(), sys.executable, "-m", "orchestrator.cli", "doctor"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env=_clean_env(COLUMNS="250",
                                         ORCH_DATA_DIR=str(tmp_path / "data")))
    row = next((line for line in proc.stdout.splitlines() if "usable CPUs" in line), None)
    assert row is not None, proc.stdout + proc.stderr
    assert "1 (affinity mask (taskset/cpuset): 1 of" in row and "ok" in row


def run_tags(tmp_path, role: str) -> list[dict]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    [exp] = [e for e in client.search_experiments() if e.name != "Default"]
    return [r.data.tags for r in client.search_runs([exp.experiment_id]) if role in (r.data.tags.get("orch.role"),
                                                                                      r.data.tags.get("orch.command"))]


@pytest.mark.slow
def test_orch_train_and_study_run_give_torch_the_usable_cores(tmp_path):
    """Under ``taskset`` one core, the real ``orch train`` trains with one torch thread, and so does
    each worker of ``orch study run --workers 2`` (one thread each: never fewer than one); without
    it, on this machine, ``orch train`` takes every core."""
    data = echo_study(trials=2)
    path = write(tmp_path / "tiny.yaml", data)
    env = _clean_env()
    for command in (["train", path], ["study", "run", path, "--workers", "2"]):
        proc = subprocess.run([*one_core(), sys.executable, "-m", "orchestrator.cli", *command], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    [train] = run_tags(tmp_path, "train")
    trials = run_tags(tmp_path, "trial")
    assert train["orch.threads"] == "1" and len(trials) == 2 and {t["orch.threads"] for t in trials} == {"1"}
    free = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", path, "--experiment", "free"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert free.returncode == 0, free.stderr
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("free").experiment_id])
    assert run.data.tags["orch.threads"] == str(len(os.sched_getaffinity(0)))


# ---- a real cgroup with a CPU quota -----------------------------------------------------------------

def _own_cgroup(version: str) -> Path:
    """The folder of this process's cgroup of ``version`` (v2, or v1's cpu hierarchy)."""
    from orchestrator.cpus import _cgroup_folders

    found = [folder for v, folder, _ in _cgroup_folders(Path("/")) if v == version]
    if not found:
        pytest.skip(f"no cgroup {version} hierarchy {'with the cpu controller ' if version == 'v1' else ''}here")
    return found[0]


def _make_quota_cgroup(version: str) -> tuple[Path, Path]:
    """A new cgroup under this process's with a quota of half a core, and a child of it without one
    (the process goes in the child: the limit is its parent's). Skips where that cannot be done."""
    base = _own_cgroup(version)
    parent = base / f"orch-test-{uuid.uuid4().hex[:8]}"
    child = parent / "child"
    try:
        parent.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup {version} under {base}: {exc.strerror or exc}")
    try:
        if version == "v2":
            for folder in (base, parent):  # the cpu controller, handed down to the children
                if "cpu" not in (folder / "cgroup.subtree_control").read_text().split():
                    (folder / "cgroup.subtree_control").write_text("+cpu")
            child.mkdir()
            (parent / "cpu.max").write_text("50000 100000")
        else:
            child.mkdir()
            (parent / "cpu.cfs_quota_us").write_text("50000")
    except OSError as exc:
        _remove(parent)
        controllers = (base / "cgroup.controllers").read_text().split() if version == "v2" else []
        why = (f"the cpu controller is not available to cgroup v2 here (controllers: {' '.join(controllers) or 'none'})"
               if version == "v2" and "cpu" not in controllers else exc.strerror or str(exc))
        pytest.skip(f"cannot set a CPU quota on a cgroup {version} under {base}: {why}")
    return parent, child


def _remove(parent: Path) -> None:
    for folder in (parent / "child", parent):
        try:
            folder.rmdir()
        except OSError:
            pass


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_a_process_in_a_cgroup_with_a_quota(version):
    if (os.cpu_count() or 1) < 2 or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("a one-core machine: a quota of half a core limits nothing more")
    parent, child = _make_quota_cgroup(version)
    procs = child / "cgroup.procs"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent("""
                from orchestrator.cpus import usable_cpus
                print(open('/proc/self/cgroup').read().strip().replace(chr(10), ' '))
                print(usable_cpus())""")],
            preexec_fn=lambda: procs.write_text(str(os.getpid())), capture_output=True, text=True,
            env=_clean_env(), timeout=60)
    finally:
        _remove(parent)
    assert proc.returncode == 0, proc.stderr
    placed, cpus = proc.stdout.strip().splitlines()
    assert child.name in placed and parent.name in placed, placed
    assert cpus == f"1 (cgroup {version} CPU quota 50000/100000 → 1, set in {parent})", cpus
