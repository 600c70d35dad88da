"""Tests for the first run on the bundled sample: assets/kjv is the King James Bible by chapter, and
configs/tiny.py reads data/kjv_byte, which train.py prepares from it on first use (prepare_c4.prepare_once), once,
safely for runs at once and killed runs. CPU, offline."""
import errno
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import data
import prepare_c4
import train
from data import DataError, load_meta

HERE = os.path.dirname(os.path.abspath(__file__))
KJV = os.path.join(HERE, "assets", "kjv")
FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "val": "en/c4-validation.00000-of-00008.json.gz"}
SHORT = ["--max_steps=3", "--warmup_steps=1", "--eval_every=3", "--eval_tokens=1024", "--log_every=1", "--ckpt_every=3"]
FINAL_EVAL = re.compile(r"^step 3 \| val loss (\d+\.\d+)", re.M)


def open_shard(path, dtype=None):
    """A shard's tokens as a memmap, its header checked as the loader checks it."""
    shard_dtype, n = data.read_header(path, dtype)
    return np.memmap(path, dtype=shard_dtype, mode="r", offset=data.HEADER_BYTES, shape=(n,))


def documents(split):
    with gzip.open(os.path.join(KJV, FILES[split]), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def byte_tokens(docs):
    """The reference tokenization: per document <|endoftext|> (256), then its UTF-8 bytes."""
    return np.concatenate([np.concatenate([[256], np.frombuffer(d.encode(), np.uint8)]) for d in docs])


def split_tokens(data_dir, split):
    meta = load_meta(data_dir)
    return np.concatenate([open_shard(os.path.join(data_dir, n)) for n in meta["splits"][split]["shards"]])


def dir_bytes(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def prepared_once(reference):
    """What prepare_once leaves: prepare_c4.py's files and the (empty) .lock that runs take turns on."""
    return {**dir_bytes(reference), ".lock": b""}


def tiny(*args):
    return [sys.executable, "train.py", "configs/tiny.py", *SHORT, *args]


def run_tiny(*args, cwd=HERE):
    return subprocess.run(tiny(*args), cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def kjv_reference(tmp_path_factory):
    """assets/kjv prepared the ordinary way, by prepare_c4.py."""
    out = tmp_path_factory.mktemp("kjv_reference")
    prepare_c4.main(["--out_dir", str(out), "--data_dir", KJV, "--tokenizer", "byte"])
    return out


def test_the_sample_is_the_kjv_by_chapter_with_every_20th_chapter_held_out():
    docs, val = documents("train"), documents("val")
    assert (len(docs), len(val)) == (1130, 59)
    for i, doc in enumerate(val):
        docs.insert(20 * (i + 1) - 1, doc)  # back into canonical order: val is chapters 20, 40, ...
    headings = [doc.split("\n", 1)[0].rsplit(" ", 1) for doc in docs]
    books = list(dict.fromkeys(book for book, _ in headings))
    assert (len(books), books[0], books[18], books[-1]) == (66, "Genesis", "Psalms", "Revelation")
    for book in books:
        numbers = [int(n) for b, n in headings if b == book]
        assert numbers == list(range(1, len(numbers) + 1)), book
    assert [int(n) for b, n in headings if b == "Psalms"][-1] == 150
    assert sum(doc.count("\n") for doc in docs) == 31102  # verses: one line each after the heading
    assert docs[0].split("\n")[:2] == ["Genesis 1", "In the beginning God created the heaven and the earth."]


def test_source_md_records_the_files_sha256():
    with open(os.path.join(KJV, "SOURCE.md")) as f:
        text = f.read()
    for name in FILES.values():
        with open(os.path.join(KJV, name), "rb") as f:
            assert f"{hashlib.sha256(f.read()).hexdigest()}  {name}" in text


@pytest.mark.slow
def test_first_run_from_a_clean_copy_prepares_then_trains_and_a_second_run_reuses_it(tmp_path):
    repo = tmp_path / "repo"  # what a fresh clone has: the code, configs/ and assets/, no data/ or out/
    shutil.copytree(os.path.join(HERE, "configs"), repo / "configs")
    shutil.copytree(KJV, repo / "assets" / "kjv")
    for name in os.listdir(HERE):
        if name.endswith(".py"):
            shutil.copy(os.path.join(HERE, name), repo / name)
    first = run_tiny(cwd=repo)
    assert first.returncode == 0, first.stderr
    assert "preparing data/kjv_byte from assets/kjv with the byte tokenizer (first run)\n" in first.stdout
    data = repo / "data" / "kjv_byte"
    assert os.listdir(repo / "data") == ["kjv_byte"]
    assert sorted(os.listdir(data)) == [".lock", "meta.json", "train_000000.bin", "val_000000.bin"]
    assert (load_meta(data)["tokenizer"], load_meta(data)["vocab_size"]) == ("byte", 257)
    for split in ("train", "val"):
        np.testing.assert_array_equal(split_tokens(data, split), byte_tokens(documents(split)))
    assert os.path.exists(repo / "out" / "tiny" / "ckpt.pt")

    mtimes = {name: os.stat(data / name).st_mtime_ns for name in os.listdir(data)}
    second = run_tiny("--out_dir=out/second", cwd=repo)
    assert second.returncode == 0, second.stderr
    assert "preparing" not in second.stdout
    assert {name: os.stat(data / name).st_mtime_ns for name in os.listdir(data)} == mtimes
    assert FINAL_EVAL.findall(second.stdout) == FINAL_EVAL.findall(first.stdout) != []  # same data, same seed


@pytest.mark.slow
def test_two_first_runs_at_once_both_train_on_what_prepare_c4_writes(tmp_path, kjv_reference):
    data = tmp_path / "kjv_byte"
    procs = [subprocess.Popen(tiny(f"--data_dir={data}", f"--out_dir={tmp_path / f'out{i}'}"), cwd=HERE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert FINAL_EVAL.search(out)
        outs.append(out)
    assert sum("preparing" in out for out in outs) == 1  # the other waited for it, or came after
    assert sorted(os.listdir(tmp_path)) == ["kjv_byte", "out0", "out1"]
    assert dir_bytes(data) == prepared_once(kjv_reference)


def test_prepare_once_waits_while_another_run_prepares_and_then_finds_its_data(tmp_path, kjv_reference):
    out, returned = tmp_path / "kjv_byte", []
    out.mkdir()
    with open(out / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run, preparing
        waiter = threading.Thread(target=lambda: returned.append(prepare_c4.prepare_once(str(out), KJV)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and returned == []
        shutil.copytree(kjv_reference, out, dirs_exist_ok=True)  # what that run prepared
    waiter.join(60)
    assert returned == [False] and dir_bytes(out) == prepared_once(kjv_reference)
    assert prepare_c4.prepare_once(str(out), KJV) is False  # prepared already: nothing to do
    assert prepare_c4.prepare_once(str(tmp_path / "new"), KJV) is True
    assert dir_bytes(tmp_path / "new") == prepared_once(kjv_reference)


def test_a_prepared_data_dir_is_used_without_a_write_so_it_may_be_read_only(tmp_path, kjv_reference):
    out = tmp_path / "kjv_byte"
    shutil.copytree(kjv_reference, out)
    assert prepare_c4.prepare_once(str(out), KJV) is False
    assert dir_bytes(out) == dir_bytes(kjv_reference)  # no .lock either


def test_a_dir_holding_another_file_or_a_file_in_its_place_is_a_one_line_error_and_left_alone(tmp_path):
    out = tmp_path / "kjv_byte"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError) as e:
        prepare_c4.prepare_once(str(out), KJV)
    assert str(e.value) == (f"{out} holds notes.txt, which prepare_c4.py does not write, so it is not a dataset; move "
                            "it away or use another dir")
    assert dir_bytes(out) == {".lock": b"", "notes.txt": b"mine"}  # only the lock added
    (tmp_path / "file").write_text("mine")
    with pytest.raises(DataError) as e:
        prepare_c4.prepare_once(str(tmp_path / "file"), KJV)
    assert str(e.value) == f"cannot use {tmp_path / 'file'}: File exists; use another data dir"
    assert (tmp_path / "file").read_text() == "mine"



def test_a_filesystem_without_locks_is_a_one_line_error(tmp_path, monkeypatch):
    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(prepare_c4.fcntl, "flock", no_locks)
    with pytest.raises(DataError) as e:
        prepare_c4.prepare_once(str(tmp_path / "kjv_byte"), KJV)
    assert str(e.value) == f"cannot use {tmp_path / 'kjv_byte'}: No locks available; use another data dir"

@pytest.mark.parametrize("name", ["mine", "kjv_bytes", "kjv"])
def test_a_data_dir_not_named_after_a_bundled_sample_is_never_prepared(tmp_path, name):
    data = tmp_path / name  # e.g. a typo in --data_dir: the usual error, not a copy of the sample
    with pytest.raises(SystemExit) as e:
        train.main([os.path.join(HERE, "configs", "tiny.py"), f"--data_dir={data}"])
    assert e.value.code == f"error: data dir {data} does not exist; run prepare_c4.py --out_dir {data} first"
    assert os.listdir(tmp_path) == []


def test_only_the_bundled_names_have_a_source():
    assert data.bundled_source("data/kjv_byte") == data.bundled_source("/x/kjv_byte/") == KJV
    assert data.bundled_source("data/c4") is None and data.bundled_source("kjv") is None


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe (POSIX)")
def test_a_first_run_killed_while_preparing_leaves_no_dataset_and_the_next_run_prepares_it(tmp_path):
    # the val file is a named pipe: the run tokenizes train, stages its shard, then blocks opening val until killed
    source = tmp_path / "source"
    source.mkdir()
    os.symlink(os.path.join(KJV, FILES["train"]), source / "kjv_train.json.gz")
    os.mkfifo(source / "kjv_val.json.gz")
    data = tmp_path / "data" / "kjv_byte"
    # train.py with the bundled sample's source replaced by this one
    patched = [sys.executable, "-c", "import sys, data, train; data.BUNDLED['kjv_byte'] = sys.argv[1]; "
               "train.main(sys.argv[2:])", str(source)] + tiny()[2:]
    args = [f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}"]
    proc = subprocess.Popen(patched + args, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = data / "train_000000.bin.new"
    try:
        deadline = time.time() + 120
        while not staged.exists():
            assert proc.poll() is None and time.time() < deadline, "the run did not reach its val split"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with pytest.raises(DataError, match="meta.json is missing"):  # nothing that looks like a dataset
        load_meta(data)
    (data / "val_000003.bin.new").write_bytes(b"staged")  # as a killed run with more data would leave

    os.remove(source / "kjv_val.json.gz")
    os.symlink(os.path.join(KJV, FILES["val"]), source / "kjv_val.json.gz")
    rerun = subprocess.run(patched + args, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"preparing {data} from {source}" in rerun.stdout
    assert sorted(os.listdir(data)) == [".lock", "meta.json", "train_000000.bin", "val_000000.bin"]  # nothing stale
    for split in ("train", "val"):
        np.testing.assert_array_equal(split_tokens(data, split), byte_tokens(documents(split)))
