"""The first-party datasets: ``ptb``, ``sum_game`` and ``echo``."""

from __future__ import annotations

import hashlib
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from orch_plugins.datasets.echo import Echo
from orch_plugins.datasets.ptb import PTB, PTB_SHA256, DataError
from orch_plugins.datasets.sum_game import SYMBOLS, SumGame, all_sequences, decode, encode, running_sum

from helpers import NAMES, shared_ptb_dir, write_corpus


# ---- helpers ---------------------------------------------------------------------------------
def reference_tokens(path: Path) -> list[str]:
    """PTB tokens the way TensorFlow's reader makes them."""
    return path.read_text().replace("\n", " <eos> ").split()


def windows(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def check_stream(batches, x_stream: torch.Tensor, y_stream: torch.Tensor, rows: int, bptt: int) -> None:
    """Batch k row r is columns [k*bptt, (k+1)*bptt) of the r-th contiguous slice of the stream."""
    n = len(x_stream) // rows
    assert len(batches) == -(-n // bptt)
    for k, (x, y) in enumerate(batches):
        width = min(bptt, n - k * bptt)
        assert x.shape[:2] == (rows, width) and y.shape == (rows, width)
        for r in range(rows):
            start = r * n + k * bptt
            assert torch.equal(x[r].reshape(width, -1).squeeze(-1), x_stream[start:start + width])
            assert torch.equal(y[r], y_stream[start:start + width])
    # row r of batch k+1 continues row r of batch k
    for k in range(len(batches) - 1):
        (x0, y0), (x1, y1) = batches[k], batches[k + 1]
        for r in range(rows):
            start = r * n + k * bptt
            both = torch.cat([x0[r], x1[r]]).reshape(-1, *x0.shape[2:]).squeeze(-1)
            assert torch.equal(both, x_stream[start:start + len(both)])
            assert torch.equal(torch.cat([y0[r], y1[r]]), y_stream[start:start + len(both)])


@pytest.fixture
def no_data_env(monkeypatch):
    monkeypatch.delenv("ORCH_DATA_DIR", raising=False)


# ---- ptb: batching ---------------------------------------------------------------------------
def test_ptb_windows_are_contiguous_shifted_and_repeat_each_epoch(corpus):
    folder, sums = corpus
    ds = PTB(data_dir=str(folder), batch_size=4, eval_batch_size=3, bptt=7, checksums=sums)
    ds.setup("fit")
    for split, rows, loader in (("train", 4, ds.train_dataloader()), ("valid", 3, ds.val_dataloader()),
                                ("test", 3, ds.test_dataloader())):
        tokens = reference_tokens(folder / f"ptb.{split}.txt")
        ids = torch.tensor([ds.vocab.index(w) for w in tokens])
        assert ds.token_counts[split] == len(tokens)
        first = windows(loader)
        check_stream(first, ids[:-1], ids[1:], rows, 7)
        # y is x shifted by one, inside a window and across the boundary to the next one
        for (x0, y0), (x1, _) in zip(first, first[1:]):
            assert torch.equal(y0[:, :-1], x0[:, 1:])
            assert torch.equal(y0[:, -1], x1[:, 0])
        second = windows(loader)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
        assert len(first) == len(second)


def test_ptb_vocab_is_train_only_by_frequency_then_alphabetical(corpus, tmp_path):
    folder, sums = corpus
    ds = PTB(data_dir=str(folder), checksums=sums, batch_size=2, eval_batch_size=2)
    info = ds.describe()
    counts = Counter(reference_tokens(folder / "ptb.train.txt"))
    assert ds.vocab == sorted(counts, key=lambda w: (-counts[w], w))
    assert info.vocab_size == len(counts) == 33  # 32 words and <eos>
    assert (info.task, info.layout, info.val_sets, info.test_sets) == ("language_model", "stream", ("val",), ("test",))

    # a validation word that training never saw is an error naming the file and the word
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    with open(bad / "ptb.valid.txt", "a") as f:
        f.write(" neverseen \n")
    sums = dict(sums, **{"ptb.valid.txt": hashlib.sha256((bad / "ptb.valid.txt").read_bytes()).hexdigest()})
    with pytest.raises(DataError, match=r"ptb\.valid\.txt.*neverseen"):
        PTB(data_dir=str(bad), checksums=sums).describe()


def test_ptb_real_files():
    folder = shared_ptb_dir()
    if folder is None:
        pytest.skip("the Penn Treebank files are not here (set ORCH_DATA_DIR to a folder with ptb/)")
    ds = PTB(data_dir=str(folder))
    assert ds.describe().vocab_size == 10000
    assert ds.token_counts == {"train": 929589, "valid": 73760, "test": 82430}
    assert ds.vocab[:3] == ["the", "<unk>", "<eos>"]
    x, y = next(iter(ds.train_dataloader()))
    assert x.shape == (20, 35)
    assert [ds.vocab[i] for i in x[0, :3]] == ["aer", "banknote", "berlitz"]
    assert [ds.vocab[i] for i in y[0, :3]] == ["banknote", "berlitz", "calloway"]
    assert len(ds.train_dataloader()) == -(-(929589 - 1) // 20 // 35)


# ---- ptb: files ------------------------------------------------------------------------------
def test_ptb_corrupt_file_names_file_and_checksums(corpus, tmp_path):
    folder, sums = corpus
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    with open(bad / "ptb.valid.txt", "ab") as f:
        f.write(b"x")
    actual = hashlib.sha256((bad / "ptb.valid.txt").read_bytes()).hexdigest()
    with pytest.raises(DataError) as err:
        PTB(data_dir=str(bad), checksums=sums).describe()
    msg = str(err.value)
    assert "ptb.valid.txt" in msg and sums["ptb.valid.txt"] in msg and actual in msg and "delete" in msg


def test_ptb_checks_the_real_checksums_by_default(corpus):
    folder, _ = corpus
    with pytest.raises(DataError) as err:
        PTB(data_dir=str(folder)).describe()
    assert "ptb.train.txt" in str(err.value) and PTB_SHA256["ptb.train.txt"] in str(err.value)


def test_ptb_missing_file_is_named(corpus, tmp_path):
    folder, sums = corpus
    (folder / "ptb.test.txt").unlink()
    with pytest.raises(DataError, match="ptb.test.txt.*is missing.*data_dir"):
        PTB(data_dir=str(folder), checksums=sums).describe()
    with pytest.raises(DataError, match="data_dir"):
        PTB(data_dir=str(tmp_path / "nowhere"), checksums=sums).describe()


def test_ptb_keeps_its_tokenised_corpus_as_tensors_in_the_cache(corpus, tmp_path, monkeypatch):
    import orch_plugins.datasets.ptb as ptb_module

    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / "orch-cache"))
    folder, sums = corpus
    first = PTB(data_dir=str(folder), checksums=sums)
    info = first.describe()
    (kept,) = (tmp_path / "orch-cache" / "tensors").glob("ptb-*.pt")

    def same(other):
        assert other.describe() == info and other.vocab == first.vocab and other.token_counts == first.token_counts
        for split, ids in first._load().items():
            assert torch.equal(other._load()[split], ids)

    real = ptb_module.tokenize

    def refuse(text):
        raise AssertionError("tokenised again although the tensors are in the cache")

    monkeypatch.setattr(ptb_module, "tokenize", refuse)
    same(PTB(data_dir=str(folder), checksums=sums))  # read from the tensors, not tokenised
    # a file cut halfway is only a cache: the corpus is tokenised again and the file rewritten
    whole = kept.read_bytes()
    kept.write_bytes(whole[: len(whole) // 2])
    monkeypatch.setattr(ptb_module, "tokenize", real)
    same(PTB(data_dir=str(folder), checksums=sums))
    assert torch.load(kept, weights_only=True)["vocab"] == first.vocab
    # another corpus (other checksums) has a file of its own
    other = tmp_path / "other"
    other_sums = write_corpus(other, seed=2)
    assert PTB(data_dir=str(other), checksums=other_sums).describe().vocab_size > 0
    assert len(list((tmp_path / "orch-cache" / "tensors").glob("ptb-*.pt"))) == 2


def test_ptb_lookup_order(tmp_path, monkeypatch):
    explicit = tmp_path / "explicit"
    sums = write_corpus(explicit, seed=1)
    root = tmp_path / "root"
    write_corpus(root / "ptb", seed=2)  # a different corpus with different checksums
    source = tmp_path / "source"
    write_corpus(source, seed=1)
    cache = tmp_path / "cache"
    monkeypatch.setenv("ORCH_DATA_DIR", str(root))
    common = dict(checksums=sums, download_url=source.as_uri() + "/", cache_dir=str(cache))

    # data_dir wins over ORCH_DATA_DIR
    assert PTB(data_dir=str(explicit), **common).describe().vocab_size == 33

    # ORCH_DATA_DIR/ptb/ is read (its seed-2 files fail the seed-1 checksums) ...
    with pytest.raises(DataError, match=re.escape(str(root / "ptb" / "ptb.train.txt"))):
        PTB(**common).describe()
    # ... and a file missing there is an error, never a download
    for name in NAMES:
        (root / "ptb" / name).unlink()
    with pytest.raises(DataError, match="ORCH_DATA_DIR"):
        PTB(**common).describe()
    assert not cache.exists()

    # with neither, the cache is used and filled from download_url
    monkeypatch.delenv("ORCH_DATA_DIR")
    assert PTB(**common).describe().vocab_size == 33
    assert sorted(p.name for p in (cache / "ptb").iterdir()) == sorted(NAMES)


def test_ptb_download_into_cache(tmp_path, no_data_env):
    source = tmp_path / "source"
    sums = write_corpus(source)
    cache = tmp_path / "cache"
    ds = PTB(download_url=source.as_uri(), cache_dir=str(cache), checksums=sums, batch_size=2, eval_batch_size=2)
    info = ds.describe()
    for name in NAMES:
        assert (cache / "ptb" / name).read_bytes() == (source / name).read_bytes()
    assert sorted(p.name for p in (cache / "ptb").iterdir()) == sorted(NAMES)
    # later loads read the cache (and verify it) without the source
    shutil.rmtree(source)
    again = PTB(download_url=source.as_uri(), cache_dir=str(cache), checksums=sums)
    assert again.describe() == info and again.vocab == ds.vocab


def test_ptb_failed_download_leaves_no_partial_file(tmp_path, no_data_env):
    source = tmp_path / "source"
    sums = write_corpus(source)
    (source / "ptb.test.txt").unlink()  # train and valid download, test fails
    cache = tmp_path / "cache"
    url = source.as_uri() + "/"
    with pytest.raises(DataError) as err:
        PTB(download_url=url, cache_dir=str(cache), checksums=sums).describe()
    msg = str(err.value)
    assert "ptb.test.txt" in msg and url + "ptb.test.txt" in msg and "data_dir" in msg and "ORCH_DATA_DIR" in msg
    assert sorted(p.name for p in (cache / "ptb").iterdir()) == ["ptb.train.txt", "ptb.valid.txt"]

    # a nonexistent source: nothing at all is left behind
    with pytest.raises(DataError, match="could not download ptb.train.txt"):
        PTB(download_url=(tmp_path / "nowhere").as_uri(), cache_dir=str(tmp_path / "c2"), checksums=sums).describe()
    assert list((tmp_path / "c2" / "ptb").iterdir()) == []


def test_ptb_download_with_wrong_bytes_is_not_kept(tmp_path, no_data_env):
    source = tmp_path / "source"
    sums = write_corpus(source)
    (source / "ptb.train.txt").write_text("tampered\n")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=f"ptb.train.txt.*expected {sums['ptb.train.txt']}"):
        PTB(download_url=source.as_uri(), cache_dir=str(cache), checksums=sums).describe()
    assert list((cache / "ptb").iterdir()) == []


def test_ptb_rejects_bad_settings(corpus):
    _, sums = corpus
    with pytest.raises(ValueError, match="bptt"):
        PTB(bptt=0)
    with pytest.raises(ValueError, match="eval_batch_size"):
        PTB(eval_batch_size=-1)
    with pytest.raises(ValueError, match="ptb.test.txt"):
        PTB(checksums={"ptb.train.txt": sums["ptb.train.txt"]})


# ---- sum game --------------------------------------------------------------------------------
def reference_running_sum(seq: str) -> list[int]:
    total, inverted, out = 0, False, []
    for c in seq:
        if c == "I":
            inverted = not inverted
        elif c in "+-":
            total += (1 if c == "+" else -1) * (-1 if inverted else 1)
        out.append(total)
    return out


def test_sum_game_rules():
    assert running_sum("I++000")[-1] == -2
    assert running_sum("-I--") == [-1, -1, 0, 1]
    assert running_sum("0++000")[-1] == 2
    # the seed's examples
    for seq, total in (("+++", 3), ("+-+-+-", 0), ("------", -6), ("00+", 1), ("I+-", 0), ("II+", 1),
                       ("I0-", 1), ("-I---", 2), ("00-+++", 2)):
        assert running_sum(seq)[-1] == total, seq
    rng = random.Random(0)
    for _ in range(300):
        seq = "".join(rng.choice(SYMBOLS) for _ in range(rng.randint(1, 40)))
        assert running_sum(seq) == reference_running_sum(seq)
        assert decode(encode(seq)) == seq
    assert encode("+-0I").tolist() == torch.eye(4).tolist()
    with pytest.raises(ValueError, match="x"):
        running_sum("+x")


def test_sum_game_split_is_seeded_disjoint_and_complete():
    ds = SumGame()
    ds.setup("fit")
    assert len(all_sequences(6)) == 4096
    train, val = ds.train_ids, ds.val_ids
    assert train.shape == (1024, 6) and val.shape == (3072, 6)
    as_set = lambda ids: {tuple(r) for r in ids.tolist()}  # noqa: E731
    assert len(as_set(train)) == 1024 and as_set(train).isdisjoint(as_set(val))
    assert as_set(train) | as_set(val) == as_set(all_sequences(6))
    again = SumGame()
    assert torch.equal(again.train_ids, train) and torch.equal(again.val_ids, val)
    assert not torch.equal(SumGame(seed=1).train_ids, train)

    # targets are the running sums of the inputs, as floats
    xs, ys = zip(*ds.val_dataloader()[0])
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (3072, 6, 4) and y.dtype == torch.float32
    assert torch.equal(x.argmax(-1), val)
    for i in range(0, 3072, 97):
        assert y[i].tolist() == reference_running_sum(decode(x[i]))


def test_sum_game_training_shuffles_reproducibly():
    def epochs(ds, n=2):
        loader = ds.train_dataloader()
        return [torch.cat([x.argmax(-1) for x, _ in loader]) for _ in range(n)]

    ds = SumGame(batch_size=100)
    first, second = epochs(ds)
    assert first.shape == (1024, 6)
    assert not torch.equal(first, second)  # a new order each epoch ...
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, ds.train_ids.tolist()))
    other = epochs(SumGame(batch_size=100))  # ... the same orders in every run
    assert torch.equal(other[0], first) and torch.equal(other[1], second)
    x, y = next(iter(ds.train_dataloader()))
    assert x.shape == (100, 6, 4) and y.shape == (100, 6)
    assert y.tolist() == [reference_running_sum(decode(s)) for s in x]


def test_sum_game_long_sets():
    ds = SumGame(long_lengths=(50, 100), long_count=70, batch_size=32, bptt=25)
    info = ds.describe()
    assert (info.task, info.layout, info.input_size, info.bptt) == ("step_regression", "sequences", 4, 25)
    assert info.val_sets == ("val", "long") and info.test_sets == ("test", "test_long")
    val, long = ds.val_dataloader()
    batches = list(long)
    assert [x.shape[:2] for x, _ in batches] == [(32, 50), (32, 50), (6, 50), (32, 100), (32, 100), (6, 100)]
    for x, y in batches:
        for seq, target in zip(x, y):
            assert target.tolist() == reference_running_sum(decode(seq))
    test, test_long = ds.test_dataloader()
    assert torch.equal(torch.cat([x for x, _ in test]), torch.cat([x for x, _ in val]))
    assert not torch.equal(next(iter(test_long))[0], batches[0][0])  # a fresh draw
    assert torch.equal(next(iter(SumGame(long_count=70).val_dataloader()[1]))[0], batches[0][0])

    none = SumGame(long_lengths=())
    assert none.describe().val_sets == ("val",) and len(none.val_dataloader()) == 1


def test_sum_game_rejects_bad_settings():
    for kwargs, word in ((dict(length=0), "length"), (dict(length=11), "length"),
                         (dict(train_fraction=1.0), "train_fraction"), (dict(length=1, train_fraction=0.1), "both"),
                         (dict(long_lengths=(50, 0)), "long_lengths"), (dict(batch_size=0), "batch_size"),
                         (dict(bptt=0), "bptt")):
        with pytest.raises(ValueError, match=word):
            SumGame(**kwargs)


# ---- echo ------------------------------------------------------------------------------------
def test_echo_describe():
    info = Echo().describe()
    assert (info.task, info.layout, info.input_size, info.num_classes) == ("step_classification", "stream", 1, 2)
    assert (info.val_sets, info.test_sets) == (("val",), ("test",))


def test_echo_target_is_delayed_input_across_windows():
    ds = Echo(length=1003, echo_step=3, batch_size=5, bptt=15, val_length=200, seed=7)
    ds.setup("fit")
    x_full, y_full = ds.series("train")
    assert set(x_full.tolist()) == {0, 1}
    assert torch.equal(y_full[3:], x_full[:-3]) and y_full[:3].tolist() == [0, 0, 0]
    first = windows(ds.train_dataloader())
    x0, y0 = first[0]
    assert x0.dtype == torch.float32 and x0.shape == (5, 15, 1) and y0.dtype == torch.long and y0.shape == (5, 15)
    check_stream(first, x_full.float(), y_full, 5, 15)
    # the delay runs across window boundaries: the first targets of a window are inputs of the last one
    for (xa, _), (_, yb) in zip(first, first[1:]):
        assert torch.equal(yb[:, :3], xa[:, -3:, 0].long())
    # rows are slices of the one delayed series, so a row's first targets come from the row above
    n = 1003 // 5
    for r in range(1, 5):
        assert torch.equal(y0[r, :3], x_full[r * n - 3:r * n])
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, windows(ds.train_dataloader())))


def test_echo_splits_are_seeded_series():
    ds = Echo(length=2000, val_length=500, seed=3)
    (xt, _), (xv, yv), (xs, _) = ds.series("train"), ds.series("val"), ds.series("test")
    assert (len(xt), len(xv), len(xs)) == (2000, 500, 500)
    assert not torch.equal(xv, xs) and not torch.equal(xt[:500], xv)
    assert torch.equal(Echo(length=2000, val_length=500, seed=3).series("val")[0], xv)
    check_stream(windows(ds.val_dataloader()), xv.float(), yv, 5, 15)
    assert 0.4 < xt.float().mean() < 0.6
    with pytest.raises(ValueError, match="val_length"):
        Echo(val_length=3, batch_size=5)
    with pytest.raises(ValueError, match="echo_step"):
        Echo(echo_step=-1)
