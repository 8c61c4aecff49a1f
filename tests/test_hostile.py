"""Hostile and careless input: every bad study file, name and value is refused with exit 2 and one
line, quickly and in bounded memory, and nothing is written; valid files are still accepted.

The corpus goes through the real ``orch study create`` (which checks the whole file without
training): in this process (click's runner, for the time and the Python memory of each refusal)
and, in the slow set, as real processes (their peak memory from the kernel).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import REPO, echo_study, orch, write

SPACE = {"module.lr": {"type": "float", "low": 0.001, "high": 0.01}}


def dump(data) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def base(**study) -> dict:
    study.setdefault("space", dict(SPACE))
    return echo_study(**study)


def with_(path: str, value):
    """The echo study with the dotted ``path`` set to ``value``."""
    data = base()
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return dump(data)


def setting_bomb(levels: int = 9) -> str:
    """A billion laughs as one setting's value (a wrong type: an error message would show it)."""
    items = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def mapping_bomb(levels: int = 9) -> str:
    """The same of mappings, inside a section: every key of every copy has a line to look up."""
    lines = ["  b0: &b0 {" + ", ".join(f"k{j}: 1" for j in range(9)) + "}"]
    lines += [f"  b{i}: &b{i} {{" + ", ".join(f"k{j}: *b{i - 1}" for j in range(9)) + "}" for i in range(1, levels)]
    return dump(base()).replace("trainer:\n", "trainer:\n" + "\n".join(lines) + "\n", 1)


def categorical_explosion() -> str:
    space = {f"cell.x{i}": {"type": "categorical", "choices": [1, 2, 3]} for i in range(12)}
    return dump(base(space=space))


#: name -> (file text, words the one line must hold); "before plugins": refused before any plugin is imported
CORPUS: dict[str, tuple[str, str]] = {
    # limits
    "alias bomb of mappings in a section": (mapping_bomb(), "refused: more than"),
    "alias bomb in a setting": (dump(base()).replace("lr: 0.01", "lr: " + setting_bomb()), "refused: more than"),
    "self-referencing alias": (dump(base()) + "x: &x [1, *x]\n", "holds itself"),
    "deep nesting": (dump(base()) + "deep: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than"),
    "deep block nesting": (dump(base()) + "".join(" " * i + f"k{i}:\n" for i in range(60)) + " " * 60 + "v: 1\n",
                           "nested more than"),
    "big file": (dump(base()) + "# " + "x" * (2 << 20) + "\n", "KiB"),
    "file just over the cap": (dump(base()) + "".join(f"# {i:08}\n" for i in range(4000)), "KiB"),
    "many values just under the cap": (dump(base()) + "x:\n" + "- 1\n" * 7000, "unknown key"),
    "twelve categoricals of three": (categorical_explosion(), "unknown setting cell.x0"),
    "huge int grid": (dump(base(sampler={"type": "grid"}, space={"cell.hidden_size": {
        "type": "int", "low": 1, "high": 3_000_000_000}})), "over 100,000 points"),
    "tiny float grid step": (dump(base(sampler={"type": "grid"}, space={"module.lr": {
        "type": "float", "low": 0.001, "high": 0.5, "step": 1e-12}})), "over 100,000 points"),
    "too many choices": (dump(base(space={"cell.hidden_size": {"type": "categorical",
                                                               "choices": list(range(1, 1000))}})), "at most 256"),
    "a key of 300 characters": (dump(base()) + "? " + "k" * 300 + "\n: 1\n", "characters"),
    # duplicate keys and syntax
    "duplicate key": (dump(base()) + "seed: 3\n", "given twice (lines 2 and"),
    "yaml syntax error": (dump(base()) + "bad: [1, 2\n", "not valid YAML"),
    "tab indentation": (dump(base()) + "x:\n\ty: 1\n", "not valid YAML"),
    "control character": (dump(base()).replace("tiny", "ti\x07ny"), "control character"),
    "not a mapping": ("- 1\n- 2\n", "expected a mapping"),
    # values by their meaning
    "seed -1": (with_("seed", -1), "seed"),
    "seed 2**70": (with_("seed", 2**70), "seed"),
    "seed true": (with_("seed", True), "seed"),
    "sampler seed -1": (with_("study.sampler.seed", -1), "study.sampler.seed"),
    "forget_bias nan": (with_("cell.forget_bias", float("nan")), "finite"),
    "forget_bias inf": (with_("cell.forget_bias", float("inf")), "finite"),
    "lr inf": (with_("module.lr", float("inf")), "finite"),
    "lr 1e308": (with_("module.lr", 1e308), "module.lr"),
    "space bound inf": (dump(base(space={"module.lr": {"type": "float", "low": 0.001, "high": float("inf")}})),
                        "finite"),
    "hidden_size 1e7": (with_("cell.hidden_size", 10_000_000), "GiB"),
    "metric never logged": (with_("study.metric", "val_bleu"), "not a metric that module"),
    "trainer.logger true": (with_("trainer.logger", True), "trainer.logger cannot be set"),
    "trainer.callbacks": (with_("trainer.callbacks", []), "trainer.callbacks cannot be set"),
    "n_startup_trials -5": (dump(base(pruner={"type": "median", "n_startup_trials": -5})), ">= 0"),
    "heartbeat interval 1e20": (with_("study.heartbeat", {"interval": 10**20, "grace_period": 10**21}),
                                "study.heartbeat.interval"),
    "trials 1e12": (with_("study.trials", 10**12), "study.trials"),
    # names
    "name with a newline": (with_("study.name", "a\nb"), "study.name"),
    "name with control characters": (with_("study.name", "a\x1b[31mb"), "study.name"),
    "name ../victim": (with_("study.name", "../victim"), "study.name"),
    "absolute name": (with_("study.name", "/tmp/victim"), "study.name"),
    "name with an apostrophe": (with_("study.name", "it's"), "study.name"),
    "name of 100,000 characters": (with_("study.name", "n" * 100_000), "KiB"),
    "name of 101 characters": (with_("study.name", "n" * 101), "study.name"),
    "name with markup": (with_("study.name", "x[/y]"), "study.name"),
    "run name ../x": (with_("name", "../x"), "name"),
}
#: entries refused only once the plugins are imported (a few seconds at most, not one)
NEEDS_PLUGINS = {"twelve categoricals of three", "forget_bias nan", "forget_bias inf", "lr inf", "lr 1e308",
                 "hidden_size 1e7", "metric never logged", "trainer.logger true", "trainer.callbacks",
                 "run name ../x"}


def create_in_process(folder: Path, *args: str):
    """``orch study create ARGS`` in this process, in ``folder``: (exit code, stderr, seconds, peak MB)."""
    from orchestrator.cli import main

    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        t = time.perf_counter()
        result = runner.invoke(main, ["study", "create", *args], catch_exceptions=True)
        seconds = time.perf_counter() - t
        if result.exit_code != 2:
            return result, seconds, 0.0
        tracemalloc.start()  # again, for the memory (tracemalloc slows Python down several times)
        try:
            runner.invoke(main, ["study", "create", *args], catch_exceptions=True)
            peak = tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()
    finally:
        os.chdir(cwd)
    return result, seconds, peak


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """Plugins imported and checked once, by a valid file's check (as any orch process that judges a
    file against them has done by then)."""
    from orchestrator.cli.options import checked_study

    checked_study(write(tmp_path_factory.mktemp("warm") / "valid.yaml", base()))


def _left(folder: Path, keep: str) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != keep)


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_every_hostile_file_is_refused_in_a_second_with_one_line_and_nothing_written(tmp_path, case, warm):
    text, words = CORPUS[case]
    path = tmp_path / "hostile.yaml"
    path.write_text(text, encoding="utf-8")
    result, seconds, peak = create_in_process(tmp_path, str(path))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (case, result.stderr[-2000:], result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr[:2000])
    assert words in lines[0], (case, lines[0])
    assert len(lines[0]) < 1200, (case, len(lines[0]))
    assert seconds < (5 if case in NEEDS_PLUGINS else 1), (case, seconds)
    assert peak < 100, (case, f"{peak:.0f} MB")
    assert _left(tmp_path, "hostile.yaml") == [], case


@pytest.mark.parametrize("option", [
    ["--set", ".".join(["k"] * 5000) + "=1"],
    ["--set", "study.name=../victim"],
    ["--set", "seed=-3"],
    ["--set", "x=" + "y" * 20_000],
    ["--set", "study.space.module.lr.high=.inf"],
    ["--set", "cell.hidden_size=&a [*a]"],
    ["--storage", "journal:/dev/zero"],
])
def test_hostile_options_are_refused_with_one_line(tmp_path, option, warm):
    path = write(tmp_path / "tiny.yaml", base())
    result, seconds, _ = create_in_process(tmp_path, path, *option)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, (option[1][:80], result.stderr[:2000], result.exception)
    assert seconds < 5, seconds
    assert _left(tmp_path, "tiny.yaml") == []


def test_valid_files_with_a_bom_crlf_and_a_unicode_name_are_accepted(tmp_path, warm):
    text = dump(base(name="étude_σ-1.0")).replace("\n", "\r\n")
    path = tmp_path / "valid.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    result, seconds, _ = create_in_process(tmp_path, str(path))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["study"] == "étude_σ-1.0"
    assert (tmp_path / "mlruns" / "optuna" / "étude_σ-1.0.journal").is_file()


@pytest.mark.parametrize("shipped", ["echo", "sum_game", "ptb_small", "ptb"])
def test_the_shipped_study_files_still_pass_the_file_checks(shipped):
    from orchestrator.spec.study import load_study

    study = load_study(REPO / "studies" / f"{shipped}.yaml")
    assert study.name and study.section.metric


def test_traversal_names_are_refused_at_every_entry_point(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    os.environ.pop("ORCH_STORAGE", None)
    for args in (["study", "show", "../victim"], ["study", "best", "../victim"],
                 ["study", "report", "../victim", "--out", str(tmp_path / "out")],
                 ["study", "worker", "../victim", "--storage", f"sqlite:///{tmp_path}/x.db"],
                 ["study", "copy", "../victim", "--from", f"sqlite:///{tmp_path}/a.db", "--to", f"sqlite:///{tmp_path}/b.db"]):
        proc = orch(*args, cwd=tmp_path)
        assert proc.returncode == 2 and "is not valid" in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    assert (victim / "keep.txt").read_text() == "keep"
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.db").exists()


def test_a_name_written_into_a_shared_storage_by_another_process_is_refused(tmp_path):
    """Another process (or user) rewrites the study file stored with a study: its name ``../victim``
    would steer where every worker writes and deletes. Workers refuse it before any trial."""
    import optuna

    from orchestrator import schema

    storage = f"sqlite:///{tmp_path}/shared.db"
    proc = orch("study", "create", write(tmp_path / "tiny.yaml", base()), "--storage", storage, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ostudy = optuna.load_study(study_name="tiny", storage=storage)
    stored = yaml.safe_load(ostudy.user_attrs[schema.SPEC])
    stored["study"]["name"] = "../victim"
    ostudy.set_user_attr(schema.SPEC, dump(stored))
    before = {t.number for t in ostudy.get_trials()}
    proc = orch("study", "worker", "tiny", "--storage", storage, cwd=tmp_path)
    assert proc.returncode == 2 and "study.name" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert {t.number for t in optuna.load_study(study_name="tiny", storage=storage).get_trials()} == before
    assert not (tmp_path / "victim").exists() and not (tmp_path.parent / "victim").exists()


def test_a_tracking_store_that_cannot_be_used_is_refused_before_the_study_is_created(tmp_path, databases):
    missing = databases.make().rsplit("/", 1)[0] + "/orch_no_such_db"
    cases = {"unreachable server in the file": ({"tracking_uri": "http://127.0.0.1:9"}, [], "cannot reach"),
             "missing PostgreSQL database": ({}, ["--tracking-uri", missing], "cannot use the MLflow tracking store")}
    for case, (extra, args, words) in cases.items():
        proc = orch("study", "create", write(tmp_path / "tiny.yaml", {**base(), **extra}), *args, cwd=tmp_path)
        assert proc.returncode == 2 and words in proc.stderr, (case, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (case, proc.stderr)
        assert not (tmp_path / "mlruns" / "optuna" / "tiny.journal").exists(), case


# ---- property-based: mutations of the shipped study files ----------------------------------------
JUNK = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=5).map(lambda s: "../" + s),
    st.lists(st.integers(), max_size=4), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def _leaves(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*prefix, k))
    yield prefix


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutations_of_the_shipped_files_are_accepted_or_refused_with_one_line(data, warm):
    """Any shipped study file with any setting replaced by junk (or removed): checked in bounded
    time, and either valid or refused with one :class:`UsageError` line, never another exception."""
    from orchestrator.cli.options import preflight
    from orchestrator.errors import UsageError
    from orchestrator.spec.files import yaml_source
    from orchestrator.spec.study import study_from

    shipped = data.draw(st.sampled_from(["echo", "sum_game", "ptb_small"]))
    original = yaml.safe_load((REPO / "studies" / f"{shipped}.yaml").read_text())
    paths = [p for p in _leaves(original) if p]
    path = data.draw(st.sampled_from(paths))
    node = original
    for part in path[:-1]:
        node = node[part]
    if data.draw(st.booleans()):
        node[path[-1]] = data.draw(JUNK)
    else:
        node.pop(path[-1])
    t = time.perf_counter()
    try:
        study = study_from(*yaml_source(dump(original), f"{shipped}.yaml"))
        if shipped != "ptb_small":  # ptb needs its data, which a machine may not have
            preflight(study.base, f"{shipped}.yaml", study)
    except UsageError as exc:  # a message of bounded size (the command line prints it on one line)
        assert len(str(exc)) < 2000, str(exc)[:300]
    assert time.perf_counter() - t < 10


# ---- real processes: peak memory and time of each refusal -------------------------------------
@pytest.mark.slow
def test_the_corpus_as_real_processes_in_bounded_memory_and_time(tmp_path):
    """Each corpus file through a real ``orch study create``: exit 2, one line, nothing written, and
    a peak resident size no larger than importing the plugins takes (a valid file's check)."""
    path = write(tmp_path / "valid.yaml", base())
    valid = _measure(tmp_path, ["study", "create", path, "--storage", f"sqlite:///{tmp_path}/valid.db"])
    assert valid[0] == 0, valid
    for case, (text, _) in sorted(CORPUS.items()):
        folder = tmp_path / case.replace(" ", "_").replace("/", "_")[:40]
        folder.mkdir()
        (folder / "hostile.yaml").write_text(text, encoding="utf-8")
        code, stderr, seconds, rss = _measure(folder, ["study", "create", "hostile.yaml"])
        assert code == 2 and len(stderr.strip().splitlines()) == 1, (case, stderr[:1000])
        assert rss < max(1.2 * valid[3], valid[3] + 100), (case, rss, valid[3])
        assert seconds < valid[2] + 5, (case, seconds, valid[2])
        assert _left(folder, "hostile.yaml") == [], case


def _measure(cwd: Path, args: list[str]) -> tuple[int, str, float, float]:
    """Exit code, stderr, seconds and peak resident MB of ``orch ARGS`` (from the kernel: wait4)."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, stderr, time.perf_counter() - t, usage.ru_maxrss / 1024

