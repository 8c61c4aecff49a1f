"""Hostile plugins: an import that calls ``sys.exit()``, raises a ``BaseException`` of its own or
never returns is one broken plugin, reported on one line, not a dead or hung orch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator import registry

from helpers import echo_study, write

LIMIT = 2  # seconds a plugin's import may take in these tests ($ORCH_PLUGIN_IMPORT_TIMEOUT)

#: the hostile cells: module source, and the error orch reports for it
HOSTILE = {
    "quits": ("import sys\nsys.exit(3)\n", "its import called sys.exit(3)"),
    "boom": ("class Boom(BaseException):\n    pass\n\nraise Boom('no cell today')\n",
             "hostile_boom.Boom: no cell today"),
    # logs when its import starts and when it is cut short
    "sleeps": ("import os, time\n"
               "log = open(os.environ['HOSTILE_LOG'], 'a', buffering=1)\n"
               "log.write(f'start {os.getpid()} {time.time()}\\n')\n"
               "try:\n"
               "    time.sleep(3600)\n"
               "finally:\n"
               "    log.write(f'end {os.getpid()} {time.time()}\\n')\n",
               f"its import did not return within {LIMIT} s"),
}
GOOD = "from orch_plugins.cells import LSTMCell as Cell\n"
#: a C call that never returns and that no signal interrupts: only the watchdog ends it
STUCK = """
import ctypes

lock = ctypes.create_string_buffer(64)  # a zeroed pthread_mutex_t: PTHREAD_MUTEX_INITIALIZER
libc = ctypes.CDLL(None)
libc.pthread_mutex_lock(lock)
libc.pthread_mutex_lock(lock)  # the same thread again: it waits forever
"""


def install(fake_dist, tmp_path, names, extra: dict[str, str] | None = None):
    """The distribution ``hostile`` 1.0 with the cell ``good`` and the hostile cells ``names``
    (plus ``extra``: name -> source); returns the environment that finds it."""
    sources = {"hostile_good": GOOD, **{f"hostile_{n}": HOSTILE[n][0] for n in names},
               **{f"hostile_{n}": src for n, src in (extra or {}).items()}}
    points = "".join(f"{m.removeprefix('hostile_')} = {m}:Cell\n" for m in sources)
    root = fake_dist("hostile", f"[orch.cells]\n{points}", sources)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
            "ORCH_CACHE_DIR": str(tmp_path / "cache"), "ORCH_PLUGIN_IMPORT_TIMEOUT": str(LIMIT),
            "HOSTILE_LOG": str(tmp_path / "imports.log"), "COLUMNS": "250"}


def orch(*args, cwd, env, timeout=180) -> subprocess.CompletedProcess:
    """`orch ...` in a process group of its own, checking that no process of that group is left
    behind when it ends."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"orch {' '.join(args)} hung for {timeout} s")
    deadline = time.monotonic() + 5
    while True:  # an orphan of the group could still be exiting: give it a moment
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, f"orch {' '.join(args)} left processes behind"
        time.sleep(0.1)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def imports(tmp_path) -> list[tuple[str, float]]:
    """What the sleeping plugin logged: ``(start|end, time)`` per line."""
    log = tmp_path / "imports.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [(word, float(t)) for word, _, t in (line.split() for line in lines)]


def test_hostile_imports_are_broken_plugins_and_the_others_keep_working(fake_dist, tmp_path, monkeypatch):
    env = install(fake_dist, tmp_path, HOSTILE)
    for name in ("ORCH_CACHE_DIR", "ORCH_PLUGIN_IMPORT_TIMEOUT", "HOSTILE_LOG"):
        monkeypatch.setenv(name, env[name])
    started = time.monotonic()
    cells = registry.discover("cells", refresh=True)
    assert time.monotonic() - started < LIMIT + 5
    for name, (_, error) in HOSTILE.items():
        assert cells[name].status == "broken" and cells[name].error.startswith(error), cells[name].error
        assert "\n" not in cells[name].error
    assert [w for w, _ in imports(tmp_path)] == ["start", "end"]
    (start, t0), (end, t1) = imports(tmp_path)
    assert LIMIT - 0.5 < t1 - t0 < LIMIT + 2  # cut short at the limit
    assert {n for n, p in cells.items() if p.status == "ok"} == {"diy_lstm", "good", "lstm", "rnn"}
    assert registry.get("cells", "good").__name__ == "LSTMCell"
    with pytest.raises(registry.PluginError, match=r"cell plugin 'sleeps' from hostile 1\.0 is broken: its import "
                       rf"did not return within {LIMIT} s.*; available: diy_lstm, good, lstm, rnn"):
        registry.get("cells", "sleeps")
    # a new process (here: the registry's cache emptied) does not wait for the hung plugin again ...
    registry._cache.clear()
    started = time.monotonic()
    again = registry.discover("cells")
    assert time.monotonic() - started < LIMIT and len(imports(tmp_path)) == 2
    assert again["sleeps"].error == cells["sleeps"].error
    # ... until the plugin changes, or it is asked for again with --refresh
    registry._cache.clear()
    (tmp_path / "site" / "hostile_sleeps.py").write_text("from orch_plugins.cells import RNNCell as Cell\n")
    assert registry.discover("cells")["sleeps"].status == "ok"


def test_a_keyboard_interrupt_in_a_plugin_import_still_stops_the_command(fake_dist, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / "cache"))
    install(fake_dist, tmp_path, [], {"interrupted": "raise KeyboardInterrupt\n"})
    with pytest.raises(KeyboardInterrupt):
        registry.discover("cells", refresh=True)


def test_a_limit_that_is_not_a_number_of_seconds_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("ORCH_PLUGIN_IMPORT_TIMEOUT", "soon")
    with pytest.raises(registry.PluginError, match="ORCH_PLUGIN_IMPORT_TIMEOUT='soon' is not a number of seconds"):
        registry.discover("cells", refresh=True)


def test_plugins_list_in_a_real_process_reports_each_hostile_plugin_on_one_line(fake_dist, tmp_path):
    env = install(fake_dist, tmp_path, HOSTILE)
    proc = orch("plugins", "list", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("│")[2].strip(): line for line in proc.stdout.splitlines() if line.count("│") == 6}
    for name, (_, error) in HOSTILE.items():
        assert f"broken: {error}" in rows[name], proc.stdout
    assert all(rows[name].split("│")[5].strip() == "ok" for name in ("good", "lstm", "echo", "language_model"))
    (start, t0), (end, t1) = imports(tmp_path)
    assert LIMIT - 0.5 < t1 - t0 < LIMIT + 2  # the hanging import was cut short at the limit


@pytest.mark.slow  # four real orch commands per hostile plugin, 35 to 65 s each on 2 busy cores
@pytest.mark.parametrize("name", HOSTILE)
def test_every_command_survives_a_hostile_plugin(fake_dist, tmp_path, name):
    env = install(fake_dist, tmp_path, [name])
    error = HOSTILE[name][1]
    proc = orch("plugins", "list", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows[name]["status"] == "broken" and rows[name]["error"].startswith(error)
    assert rows["good"]["status"] == rows["lstm"]["status"] == rows["echo"]["status"] == "ok"

    proc = orch("doctor", "--json", cwd=tmp_path, env=env)
    assert proc.returncode in (0, 1), proc.stderr  # 1: the main job's data may not be on this machine
    findings = {(f["section"], f["name"]): f for f in json.loads(proc.stdout)["findings"]}
    assert findings[("plugins", f"cell {name}")]["status"] == "warn"
    assert findings[("plugins", f"cell {name}")]["value"].startswith(f"broken: {error}")
    assert findings[("plugins", "cell lstm")]["status"] == "ok"

    good = write(tmp_path / "good.yaml", echo_study())
    proc = orch("study", "create", good, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr

    study = echo_study(name="bad")
    study["cell"] = {"plugin": name, "hidden_size": 8}
    proc = orch("study", "create", write(tmp_path / "bad.yaml", study), cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"cell plugin '{name}' from hostile 1.0 is broken: {error}" in proc.stderr
    if name == "sleeps":  # waited for once, by the first command; the others knew it hangs
        assert [w for w, _ in imports(tmp_path)] == ["start", "end"]


@pytest.mark.slow  # three real orch commands, about 40 s on 2 busy cores
def test_an_import_stuck_in_c_code_ends_one_command_with_one_line_and_is_then_skipped(fake_dist, tmp_path):
    env = install(fake_dist, tmp_path, [], {"stuck": STUCK})
    good = write(tmp_path / "good.yaml", echo_study())
    proc = orch("study", "create", good, cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: cell plugin 'stuck' (hostile 1.0): its import did not return within {LIMIT} s and could not be "
        "interrupted; run the command again (the plugin is now reported as broken without being imported), or "
        "uninstall hostile"]
    proc = orch("study", "create", good, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    proc = orch("plugins", "list", "--json", cwd=tmp_path, env=env)
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["stuck"]["status"] == "broken" and rows["good"]["status"] == "ok"
    assert rows["stuck"]["error"].startswith(f"its import did not return within {LIMIT} s")
