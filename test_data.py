"""Tests of prepare_c4.py and data.py, offline, on small generated C4-format files (make_corpus.py)."""
import gzip
import json
import multiprocessing
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor

import numpy as np
import pytest
import tiktoken
import torch
from tiktoken_ext.openai_public import r50k_pat_str

import data
import prepare_c4
from tools.make_corpus import make_c4_source, write_c4_file
from data import DataError, TrainBatches, val_batches

SPLIT_FILES = {"train": ["en/c4-train.00000-of-01024.json.gz", "en/c4-train.00001-of-01024.json.gz"],
               "val": ["en/c4-validation.00000-of-00008.json.gz"]}


def open_shard(path, dtype=None):
    """A shard's tokens as a memmap, its header checked as the loader checks it."""
    shard_dtype, n = data.read_header(path, dtype)
    return np.memmap(path, dtype=shard_dtype, mode="r", offset=data.HEADER_BYTES, shape=(n,))


def read_docs(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def split_tokens(data_dir, split):
    meta = data.load_meta(data_dir)
    return np.concatenate([open_shard(os.path.join(data_dir, n)) for n in meta["splits"][split]["shards"]])


def dir_bytes(d):
    return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))}


def prepare(out, src, *extra):
    return prepare_c4.main(["--out_dir", str(out), "--data_dir", str(src), "--tokenizer", "byte", *extra])


def old_style_meta(data_dir):
    """data_dir's meta.json as prepare_c4.py wrote it before it recorded the tokenizer's size and the largest id."""
    meta = data.load_meta(data_dir)
    del meta["tokenizer_vocab_size"]
    for info in meta["splits"].values():
        del info["max_token_id"], info["repaired_documents"]
    return meta


def small_bpe():
    """A small BPE tiktoken.Encoding with GPT-2's split regex and merges, U+FFFD's bytes among them."""
    ranks = {bytes([i]): i for i in range(256)}
    for piece in [b"th", b"the", b" t", b" th", b" the", b"in", b"ing", b"\xef\xbf", b"\xef\xbf\xbd", b"\xf0\x9f"]:
        ranks[piece] = len(ranks)
    return tiktoken.Encoding("small_bpe", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


# ---------------------------------------------------------------- prepare_c4.py


def test_byte_encoding_is_utf8_bytes_plus_eot():
    enc = prepare_c4.get_encoding("byte")
    assert isinstance(enc, tiktoken.Encoding) and enc.n_vocab == 257 and enc.eot_token == 256
    text = "Grüße, 世界!\n  tabs\tand emoji 🙂"
    assert enc.encode_ordinary(text) == list(text.encode("utf-8"))
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.encode("<|endoftext|>", allowed_special="all") == [256]


def test_tokens_equal_direct_encoding(c4_source, byte_data):
    enc = prepare_c4.get_encoding("byte")
    meta = data.load_meta(byte_data)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"], meta["dtype"]) == ("byte", 257, 256, "uint16")
    assert meta["tokenizer_vocab_size"] == 257
    for split, files in SPLIT_FILES.items():
        docs = [d for f in files for d in read_docs(c4_source / f)]
        expected = [t for d in docs for t in [256] + list(d.encode("utf-8"))]
        assert expected == [t for d in docs for t in [enc.eot_token] + enc.encode_ordinary(d)]
        got = split_tokens(byte_data, split)
        assert got.dtype == np.uint16 and got.tolist() == expected
        info = meta["splits"][split]
        assert (info["tokens"], info["documents"]) == (len(expected), len(docs))
        assert (info["repaired_documents"], info["max_token_id"]) == (0, max(expected))
        # eot exactly at each document start
        starts = np.cumsum([0] + [1 + len(d.encode()) for d in docs[:-1]])
        assert np.flatnonzero(got == 256).tolist() == starts.tolist()
        # every shard but the last holds exactly shard_tokens tokens
        sizes = [len(open_shard(os.path.join(byte_data, n))) for n in info["shards"]]
        assert all(s == 40000 for s in sizes[:-1]) and 0 < sizes[-1] <= 40000
    assert meta["splits"]["train"]["shards"] == ["train_000000.bin", "train_000001.bin"]
    assert meta["source"]["files"] == {s: [str(c4_source / f) for f in fs] for s, fs in SPLIT_FILES.items()}


def test_same_bytes_for_any_worker_count(c4_source, byte_data, tmp_path):
    prepare(tmp_path, c4_source, "--train_shards", "2", "--workers", "2", "--shard_tokens", "40000")
    assert dir_bytes(tmp_path) == dir_bytes(byte_data)


def test_rerun_after_kill_gives_same_bytes(c4_source, byte_data, tmp_path, monkeypatch):
    args = ("--train_shards", "2", "--workers", "1", "--shard_tokens", "40000", "--overwrite")
    # killed while tokenizing: staged shards and a half-written temp file lie around
    shutil.copytree(byte_data, tmp_path, dirs_exist_ok=True)
    os.remove(tmp_path / "meta.json")
    os.rename(tmp_path / "val_000000.bin", tmp_path / "val_000000.bin.new")
    (tmp_path / "train_000001.bin.new.tmp").write_bytes(b"half a shard")
    (tmp_path / "train_000005.bin").write_bytes(b"stale shard of a bigger earlier run")
    with open(tmp_path / "train_000000.bin", "r+b") as f:
        f.truncate(1000)
    prepare(tmp_path, c4_source, *args)
    assert dir_bytes(tmp_path) == dir_bytes(byte_data)

    # killed while moving shards into place: no meta.json, so the dataset is refused until a rerun
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        if dst.endswith(".bin"):
            calls.append(dst)
        if len(calls) == 2:  # the second shard moved into place
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(prepare_c4.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, c4_source, *args)
    monkeypatch.undo()
    with pytest.raises(DataError, match="meta.json is missing"):
        data.load_meta(tmp_path)
    prepare(tmp_path, c4_source, *args)
    assert dir_bytes(tmp_path) == dir_bytes(byte_data)


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """A corpus that takes a while to prepare (~4M byte tokens), and it prepared by a run that was not disturbed."""
    root = tmp_path_factory.mktemp("big")
    make_c4_source(root / "src", n_train=(20000,), n_val=50)
    prepare(root / "ref", root / "src", "--shard_tokens", "20000", "--workers", "1")
    return root / "src", root / "ref"


def start_prepare(src, out, workers):
    """prepare_c4.py in its own process group, returned once it has staged a shard."""
    cmd = [sys.executable, "prepare_c4.py", "--data_dir", str(src), "--tokenizer", "byte", "--shard_tokens", "20000",
           "--workers", workers, "--out_dir", str(out), "--overwrite"]
    # SIGINT as a terminal's: pytest run in the background by a shell (`pytest &`) inherits it ignored, and so would
    # prepare_c4.py, as nohup intends
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, cwd=os.path.dirname(__file__), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.read(proc.stderr.fileno(), 1)  # first progress output: tokenization is under way, a shard is staged (one
    # byte from the pipe itself: a buffered read would take more, which communicate() would then not return)
    assert proc.poll() is None and any(n.endswith(".bin.new") for n in os.listdir(out))
    return proc, cmd


@pytest.mark.parametrize("workers", ["1", "2"])
def test_killed_subprocess_then_rerun(big_source, tmp_path, workers):
    src, ref = big_source
    proc, cmd = start_prepare(src, tmp_path, workers)
    proc.kill()
    err = proc.communicate(timeout=30)[1].decode()  # returns once every worker has exited (they hold stderr)
    assert proc.returncode == -signal.SIGKILL and "Traceback" not in err and "Error" not in err
    assert not (tmp_path / "meta.json").exists() and any(n.endswith(".bin.new") for n in os.listdir(tmp_path))
    subprocess.run(cmd, check=True, capture_output=True, cwd=os.path.dirname(__file__))
    assert dir_bytes(tmp_path) == dir_bytes(ref)


@pytest.mark.slow
@pytest.mark.parametrize("workers, sig, to_group", [("1", signal.SIGINT, True), ("2", signal.SIGINT, True),
                                                    ("1", signal.SIGTERM, False), ("2", signal.SIGTERM, False),
                                                    ("2", signal.SIGTERM, True)])
def test_interrupt_removes_the_staged_shards_in_one_line(byte_data, big_source, tmp_path, workers, sig, to_group):
    """Ctrl-C (SIGINT to the process group), kill (SIGTERM to the parent), or SIGTERM to every process (timeout,
    SLURM, systemd): one line, no staged files, the older dataset in the output dir as it was; a rerun finishes."""
    src, ref = big_source
    shutil.copytree(byte_data, tmp_path, dirs_exist_ok=True)
    proc, cmd = start_prepare(src, tmp_path, workers)
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    err = proc.communicate(timeout=30)[1].decode()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.endswith("\ninterrupted: removed this run's staged shards, the output dir is as it was; rerun to "
                        "prepare the data\n")
    assert dir_bytes(tmp_path) == dir_bytes(byte_data)
    subprocess.run(cmd, check=True, capture_output=True, cwd=os.path.dirname(__file__))
    assert dir_bytes(tmp_path) == dir_bytes(ref)


def test_dead_worker_is_a_one_line_error(byte_data, big_source, tmp_path):
    """A worker killed on its own (the OOM killer) stops the run with one line, not a hang."""
    if multiprocessing.get_start_method() != "fork":
        pytest.skip("finds the workers as the children of prepare_c4.py, which they are with fork")
    shutil.copytree(byte_data, tmp_path, dirs_exist_ok=True)
    proc, cmd = start_prepare(big_source[0], tmp_path, "2")
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)
    err = proc.communicate(timeout=30)[1].decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert re.search(r"\nerror: worker process [01] died \(killed by SIGKILL\); the output dir is as it was: rerun, "
                     r"with fewer --workers if it ran out of memory\n$", err), err
    assert dir_bytes(tmp_path) == dir_bytes(byte_data)


POOL = None  # test_a_worker_killed_while_sending_its_result_is_a_one_line_error's, which its (forked) workers see


def die_sending_a_result(item):
    """In a worker: the first bytes of a 1 MiB result, then death (as by the OOM killer)."""
    os.write(POOL._result_queue._writer.fileno(), (1 << 20).to_bytes(4, "big") + b"cut off")
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_while_sending_its_result_is_a_one_line_error():
    """The pool's reader of results then waits for the rest of it forever: the run must notice the death itself."""
    global POOL
    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the workers see POOL as the test set it only with fork")
    POOL, t0 = ProcessPoolExecutor(2, initializer=prepare_c4.start_worker), time.time()
    with pytest.raises(BrokenProcessPool):
        list(prepare_c4.pool_map(POOL, die_sending_a_result, range(1), 4))
    error = prepare_c4.dead_worker(POOL)
    prepare_c4.stop(POOL)
    assert re.fullmatch(r"worker process [01] died \(killed by SIGKILL\); the output dir is as it was: rerun, with "
                        r"fewer --workers if it ran out of memory", str(error))
    assert time.time() - t0 < 10


def test_a_dataset_is_replaced_only_with_overwrite(c4_source, byte_data, tmp_path):
    """Replaced silently, a run trained on it would resume and evaluate on other data."""
    shutil.copytree(byte_data, tmp_path, dirs_exist_ok=True)
    with pytest.raises(DataError) as e:
        prepare(tmp_path, c4_source, "--workers", "1")
    assert str(e.value) == (f"--out_dir {tmp_path} holds a prepared dataset; pass --overwrite to replace it (runs "
                            "trained on it then refuse to resume on it), or another --out_dir")
    assert dir_bytes(tmp_path) == dir_bytes(byte_data)
    prepare(tmp_path, c4_source, "--workers", "1", "--overwrite")  # 1 train file, not 2; one shard per split
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "train_000000.bin", "val_000000.bin"]
    assert data.load_meta(tmp_path)["splits"]["train"]["tokens"] == 31404


@pytest.mark.parametrize("name", ["notes.txt", "train_notes.bin", "val_000000.bin.bak"])
def test_an_out_dir_holding_what_prepare_c4_did_not_write_is_refused(c4_source, byte_data, tmp_path, name):
    out = tmp_path / "out"
    shutil.copytree(byte_data, out)
    (out / name).write_text("mine")
    before = dir_bytes(out)
    for extra in ((), ("--overwrite",)):
        with pytest.raises(DataError) as e:
            prepare(out, c4_source, "--workers", "1", *extra)
        assert str(e.value) == (f"{out} holds {name}, which prepare_c4.py does not write, so it is not a dataset; "
                                "move it away or use another dir")
        assert dir_bytes(out) == before


def test_check_same_data_names_what_differs(c4_source, byte_data, tmp_path):
    saved = data.data_identity(data.load_meta(byte_data))
    assert saved == {"tokenizer": "byte", "vocab_size": 257, "train tokens": 62885, "val tokens": 15655,
                     "source": {s: [os.path.basename(f) for f in fs] for s, fs in SPLIT_FILES.items()}}
    moved = tmp_path / "moved"
    shutil.copytree(byte_data, moved)
    data.check_same_data(saved, moved, "out/ckpt.pt")  # the same data, elsewhere
    data.check_same_data(None, moved, "out/ckpt.pt")  # a checkpoint from before data_identity
    prepare(moved, c4_source, "--workers", "1", "--overwrite")  # 1 train file, not 2
    with pytest.raises(DataError) as e:
        data.check_same_data(saved, moved, "out/ckpt.pt")
    assert str(e.value) == (f"{moved} is not the data out/ckpt.pt was trained on (its train tokens, source differ); "
                            "use that data: prepare_c4.py with the same arguments makes it again")


def test_plain_directory_and_glob(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    (d / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third", "extra": 1}\n')
    write_c4_file(d / "a.json.gz", ["first"])
    (d / "notes.txt").write_text("ignored")
    (d / "z.jsonl").write_text('{"text": "held out"}\n')
    meta = prepare(tmp_path / "o1", d, "--workers", "1")  # no file named *val*: the last file is val
    assert meta["source"]["files"] == {"train": [str(d / "a.json.gz"), str(d / "b.jsonl")], "val": [str(d / "z.jsonl")]}
    assert split_tokens(tmp_path / "o1", "train").tolist() == [256, *b"first", 256, *b"second", 256, *b"third"]
    assert split_tokens(tmp_path / "o1", "val").tolist() == [256, *b"held out"]
    (d / "my_val.jsonl").write_text('{"text": "v"}\n')  # a file named *val* is the val split
    meta = prepare(tmp_path / "o2", str(d / "*.json*"), "--workers", "1")
    assert [os.path.basename(f) for f in meta["source"]["files"]["val"]] == ["my_val.jsonl"]
    assert split_tokens(tmp_path / "o2", "train").tolist()[-9:] == [256, *b"held out"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_line_number_is_the_files_across_blank_lines_and_work_items(tmp_path, monkeypatch, workers):
    """As an editor or sed -n 'Np' shows it: blank lines count, and a work item may start anywhere in the file."""
    monkeypatch.setattr(prepare_c4, "CHUNK_DOCS", 3)
    d = tmp_path / "src"
    d.mkdir()
    (d / "train.jsonl").write_text('{"text": "a"}\n\n' * 7 + "not json\n" + '{"text": "a"}\n')
    (d / "val.jsonl").write_text('{"text": "v"}\n')
    with pytest.raises(DataError) as e:
        prepare(tmp_path / "out", d, "--workers", workers)
    assert str(e.value) == f"{d / 'train.jsonl'} line 15: not a JSON object with a 'text' string; fix or remove that " \
                           "file"


def test_the_hub_files_are_downloaded_and_read_as_local_files(tmp_path, monkeypatch):
    """A line number is then one of the file named, and the data that of a local clone of the same files."""
    import huggingface_hub
    src = tmp_path / "src"
    make_c4_source(src, n_train=(5, 5), n_val=3)
    (src / SPLIT_FILES["train"][1]).write_bytes(gzip.compress(b'{"text": "a"}\n{"text": null}\n'))
    downloads = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, repo_type:
                        downloads.append((repo, name, repo_type)) or str(src / name))
    args = ["--tokenizer", "byte", "--train_shards", "2", "--workers", "1"]
    with pytest.raises(DataError) as e:
        prepare_c4.main(["--out_dir", str(tmp_path / "hub"), *args])
    assert str(e.value) == (f"{src / SPLIT_FILES['train'][1]} line 2: not a JSON object with a 'text' string; fix or "
                            "remove that file")
    assert downloads == [("allenai/c4", name, "dataset") for name in SPLIT_FILES["train"]]
    (src / SPLIT_FILES["train"][1]).write_bytes(gzip.compress(b'{"text": "a"}\n{"text": "b"}\n'))
    meta = prepare_c4.main(["--out_dir", str(tmp_path / "hub"), *args])
    assert meta["source"] == {"hub": "allenai/c4", "files": SPLIT_FILES}
    prepare(tmp_path / "local", src, *args)
    assert {k: v for k, v in dir_bytes(tmp_path / "hub").items() if k != "meta.json"} == \
        {k: v for k, v in dir_bytes(tmp_path / "local").items() if k != "meta.json"}


@pytest.mark.parametrize("names, source, val", [
    (["interval.jsonl", "train.jsonl", "z.jsonl"], "", ["z.jsonl"]),  # interval is no validation file
    (["interval.jsonl", "train.jsonl", "val.jsonl"], "", ["val.jsonl"]),
    (["c4-train.00000-of-01024.json.gz", "c4-train.00001-of-01024.json.gz", "c4-validation.00000-of-00008.json.gz"],
     "", ["c4-validation.00000-of-00008.json.gz"]),
    (["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl", "valid-00000-of-00001.jsonl"], "",
     ["valid-00000-of-00001.jsonl"]),
    (["a_val.jsonl", "b.json", "evaluate.json"], "", ["a_val.jsonl"]),
    (["train/0.jsonl", "train/1.jsonl", "validation/0.jsonl"], "*/*.jsonl", ["validation/0.jsonl"]),
    (["val/train.jsonl", "val/val.jsonl"], "val", ["val/val.jsonl"]),  # the name of the dir given says nothing
])
def test_which_source_file_is_validation(tmp_path, names, source, val):
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "en").mkdir(exist_ok=True)  # an en/ without C4's files: not a clone of C4
    files = prepare_c4.find_sources(str(tmp_path / source), None, None)
    assert files == {"train": [str(tmp_path / n) for n in names if n not in val],
                     "val": [str(tmp_path / n) for n in val]}


@pytest.mark.parametrize("enc", [prepare_c4.get_encoding("byte"), small_bpe()], ids=["byte", "small_bpe"])
def test_encode_is_encode_ordinary_for_any_text(enc):
    texts = ["half an emoji: \ud83d, then more", "\ude00 a low one first", "reversed \ude00\ud83d", "the thing",
             "a pair as two code points \ud83d" + "\ude00", "NUL \x00, bell \x07, \x1b[0m, \x7f",
             "\ufeffBOM and \ufffd",
             "CRLF\r\nthe end\u2028", "<|endoftext|> is ordinary text here", ""]
    for text in texts:
        tokens, repaired = prepare_c4.encode(enc, text)
        assert tokens.dtype == np.uint32 and tokens.tolist() == enc.encode_ordinary(text)
        assert repaired == any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    assert enc.decode(prepare_c4.encode(enc, "x\ud83dy")[0].tolist()) == "x\ufffdy"


UNCLEAN = [  # a json line as a file may hold it -> its text as prepared
    (b'\xef\xbb\xbf{"text": "a BOM opens the file"}\r\n', "a BOM opens the file"),
    (b'{"text": "half an emoji: \\ud83d, then more"}\r\n', "half an emoji: \ufffd, then more"),  # repaired
    (b'{"text": "raw tab\tNUL\x00 bell\x07"}\n', "raw tab\tNUL\x00 bell\x07"),  # raw control chars: not strict JSON
    (b'{"text": "escaped \\u0000 NUL, \\r\\n CRLF, \\ufeff BOM"}\n', "escaped \x00 NUL, \r\n CRLF, \ufeff BOM"),
    (b'{"text": "bad bytes \xff\xfe, cut short \xe2\x82"}\n', "bad bytes \ufffd\ufffd, cut short \ufffd"),  # repaired
    (b'{"text": "caf\xe9 in Latin-1"}\n', "caf\ufffd in Latin-1"),  # repaired
    (b'{"text": "a pair: \\ud83d\\ude00"}\n', "a pair: \U0001f600"),
]


def test_progress_is_a_line_every_few_seconds_and_one_at_the_end_of_each_split(tmp_path, capsys, monkeypatch):
    d = tmp_path / "src"
    d.mkdir()
    n = 2 * prepare_c4.CHUNK_DOCS + 5  # 3 work items
    (d / "train.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(n)))
    (d / "val.jsonl").write_text('{"text": "v"}\n')
    progress = lambda counts: [f"train: {docs:,} docs, {tokens:,} tokens, " for docs, tokens in counts]
    chunk_tokens = lambda docs: sum(1 + len(f"doc {i}") for i in range(docs))  # an eot and the text's bytes
    counts = [(k, chunk_tokens(k)) for k in (prepare_c4.CHUNK_DOCS, 2 * prepare_c4.CHUNK_DOCS, n)]
    for progress_s, shown in ((3600, [counts[0], counts[2]]), (0, counts)):  # the first and the last, or each
        monkeypatch.setattr(prepare_c4, "PROGRESS_S", progress_s)
        prepare(tmp_path / f"out{progress_s}", d)
        *lines, rest = capsys.readouterr().err.split("\n")
        assert rest == "" and lines[-1].startswith("val: 1 docs, 2 tokens, ")
        assert len(lines) == len(shown) + 1 and all(line.endswith(" tokens/s") for line in lines)
        assert [line[:len(q)] for line, q in zip(lines, progress(shown))] == progress(shown)


def test_unclean_text_is_repaired_and_counted_the_same_for_any_workers(tmp_path, capsys):
    d = tmp_path / "src"
    d.mkdir()
    (d / "train.jsonl").write_bytes(b"".join(line for line, _ in UNCLEAN))
    (d / "val.jsonl").write_bytes(UNCLEAN[1][0] + UNCLEAN[0][0])  # a BOM on a later line (files joined with cat)
    meta = prepare(tmp_path / "w1", d, "--workers", "1")
    assert "train: 7 docs (3 repaired: invalid UTF-8 or lone surrogates became U+FFFD)," in capsys.readouterr().err
    expected = [t for _, text in UNCLEAN for t in [256, *text.encode("utf-8")]]
    assert split_tokens(tmp_path / "w1", "train").tolist() == expected
    assert split_tokens(tmp_path / "w1", "val").tolist() == [256, *UNCLEAN[1][1].encode(), 256, *UNCLEAN[0][1].encode()]
    assert [meta["splits"][s]["repaired_documents"] for s in ("train", "val")] == [3, 1]
    prepare(tmp_path / "w2", d, "--workers", "2")
    assert dir_bytes(tmp_path / "w1") == dir_bytes(tmp_path / "w2")


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "--data_dir {d}/missing does not exist; give a local C4 clone or a dir/glob of json files"),
    (lambda d: (d / "missing").mkdir() or (d / "missing" / "x.txt").write_text("hi"),
     "{d}/missing has 0 .json/.jsonl(.gz) files; need at least 2 (train and val)"),
])
def test_bad_source_dir(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DataError) as e:
        prepare(tmp_path / "out", tmp_path / "missing")
    assert str(e.value) == message.format(d=tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"", "{f} is empty; remove it or re-download it"),
    (b'{"text": "ok"}\nnot json\n', "{f} line 2: not a JSON object with a 'text' string; fix or remove that file"),
    (b'{"text": "ok"}\n{"url": "x"}\n', "{f} line 2: not a JSON object with a 'text' string; fix or remove that file"),
    (b'\n{"text": "ok"}\n\n \r\n{"url": "x"}\n',
     "{f} line 5: not a JSON object with a 'text' string; fix or remove that file"),  # blank lines count
    (b'{"text": 3}\n', "{f} line 1: not a JSON object with a 'text' string; fix or remove that file"),
    (b'{"text": null}\n', "{f} line 1: not a JSON object with a 'text' string; fix or remove that file"),
    (b'{"text": "ok"}\n{"text": ' + b"[" * 100_000 + b"\n",
     "{f} line 2: not a JSON object with a 'text' string; fix or remove that file"),  # deeper than Python recurses
    ('{"text": "UTF-16"}\n'.encode("utf-16"),
     "{f} line 1: not a JSON object with a 'text' string; fix or remove that file"),
    (b"garbage", "cannot read {f} (Not a gzipped file (b'ga')); re-download it"),
])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_file_leaves_existing_data_intact(byte_data, tmp_path, content, message, workers):
    out = tmp_path / "out"
    shutil.copytree(byte_data, out)
    src = tmp_path / "src"
    make_c4_source(src, n_train=(20,), n_val=5)
    bad = src / "en/c4-validation.00000-of-00008.json.gz"
    bad.write_bytes(content if content == b"garbage" else gzip.compress(content))
    with pytest.raises(DataError) as e:
        prepare(out, src, "--workers", workers, "--overwrite")
    assert str(e.value) == message.format(f=bad)
    assert dir_bytes(out) == dir_bytes(byte_data)


def test_missing_c4_file(c4_source, tmp_path):
    with pytest.raises(DataError, match=r"c4-train.00002-of-01024.json.gz is missing; download it into the clone "
                                        r"or lower --train_shards/--val_shards"):
        prepare(tmp_path, c4_source, "--train_shards", "3")


def test_unknown_tokenizer_and_download_failure(monkeypatch):
    with pytest.raises(DataError, match=r"^unknown tokenizer 'gpt3'; use byte or one of gpt2, .*cl100k_base"):
        prepare_c4.get_encoding("gpt3")

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError) as e:
        prepare_c4.get_encoding("gpt2")
    message = ("could not download tiktoken encoding 'gpt2' (ConnectionError); run once with network access, or point "
               "TIKTOKEN_CACHE_DIR at a dir holding it (docs/data.md)")
    assert str(e.value) == message
    with pytest.raises(DataError) as e:  # prepare_c4.py also names the tokenizer that needs no download
        prepare_c4.main(["--out_dir", "unused", "--tokenizer", "gpt2"])
    assert str(e.value) == message + "; or prepare with --tokenizer byte, which needs no download"


@pytest.mark.parametrize("args, message", [
    (["--workers", "x"], "error: argument --workers: invalid int value: 'x'; see python prepare_c4.py --help"),
    (["--data_dir", "/nonexistent/c4", "--tokenizer", "byte"],
     "error: --data_dir /nonexistent/c4 does not exist; give a local C4 clone or a dir/glob of json files"),
    (["--tokenizer", "byte", "--workers", "0"],
     "error: --workers, --shard_tokens, --train_shards and --val_shards must be positive"),
])
def test_cli_prints_one_error_line(tmp_path, args, message):
    r = subprocess.run([sys.executable, "prepare_c4.py", "--out_dir", str(tmp_path / "o"), *args],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 1 and r.stdout == "" and r.stderr == message + "\n"


def test_every_error_exits_1_in_one_line_usage_errors_too(c4_source, byte_data, tmp_path):
    (tmp_path / "file").write_text("")
    for args, message in [
        ([], "the following arguments are required: --out_dir; see python prepare_c4.py --help"),
        (["--out_dir", str(byte_data)], f"--out_dir {byte_data} holds a prepared dataset; pass --overwrite to replace "
                                        "it (runs trained on it then refuse to resume on it), or another --out_dir"),
        (["--out_dir", str(tmp_path / "file" / "o")], f"cannot use --out_dir {tmp_path / 'file' / 'o'}: Not a "
                                                     "directory; pass another --out_dir"),
        (["--out_dir", str(tmp_path / "file")], f"cannot use --out_dir {tmp_path / 'file'}: File exists; pass another "
                                                "--out_dir"),
    ]:
        r = subprocess.run([sys.executable, "prepare_c4.py", "--data_dir", str(c4_source), "--tokenizer", "byte",
                            *args], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        assert (r.returncode, r.stdout, r.stderr) == (1, "", f"error: {message}\n")


# ---------------------------------------------------------------- shard format


def test_shard_round_trip_and_dtypes(tmp_path):
    for dtype in (np.uint16, np.uint32):
        tokens = np.array([0, 1, 256, np.iinfo(dtype).max], dtype=dtype)
        data.write_shard(str(tmp_path / "s.bin"), tokens)
        got = open_shard(str(tmp_path / "s.bin"), dtype)
        assert got.dtype == dtype and got.tolist() == tokens.tolist()
        assert os.path.getsize(tmp_path / "s.bin") == 32 + 4 * np.dtype(dtype).itemsize
    assert sorted(os.listdir(tmp_path)) == ["s.bin"]
    assert data.token_dtype(257) == np.uint16 and data.token_dtype(65536) == np.uint16
    assert data.token_dtype(65537) == np.uint32 and data.token_dtype(100277) == np.uint32


def test_shard_header_errors(tmp_path):
    path = str(tmp_path / "s.bin")
    data.write_shard(path, np.arange(100, dtype=np.uint16))
    good = open(path, "rb").read()

    def check(raw, message, dtype=None):
        open(path, "wb").write(raw)
        with pytest.raises(DataError) as e:
            open_shard(path, dtype)
        assert str(e.value) == message.format(p=path)

    check(good[:-2], "shard {p} is truncated or corrupt: 230 bytes, header says 232; re-run prepare_c4.py")
    check(good + b"xx", "shard {p} is truncated or corrupt: 234 bytes, header says 232; re-run prepare_c4.py")
    check(good[:10], "shard {p} is truncated (10 bytes, no full header); re-run prepare_c4.py")
    not_a_shard = "{p} is not a token shard of format version 1 (magic, version or token size differ); re-run " \
                  "prepare_c4.py"
    check(b"x" * 8 + good[8:], not_a_shard)
    check(good[:8] + np.int64(7).tobytes() + good[16:], not_a_shard)
    check(good[:16] + np.int64(3).tobytes() + good[24:], not_a_shard)
    check(good, "shard {p} holds uint16 tokens but meta.json says uint32; the shard and meta.json come from "
                "different runs: re-run prepare_c4.py", np.uint32)


def test_meta_errors(byte_data, tmp_path):
    with pytest.raises(DataError, match=f"data dir {tmp_path}/nope does not exist; run prepare_c4.py"):
        data.load_meta(str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"meta.json is missing \(preparation never finished\?\)"):
        data.load_meta(str(tmp_path))
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta.json is corrupt \(JSONDecodeError: .*re-run prepare_c4.py"):
        data.load_meta(str(tmp_path))
    meta = data.load_meta(byte_data)
    del meta["splits"]["val"]
    data.write_meta(str(tmp_path), meta)
    with pytest.raises(DataError, match=r"meta.json is corrupt \(KeyError: 'val'\)"):
        data.load_meta(str(tmp_path))


def test_advice_to_prepare_is_a_command_that_works(byte_data, tmp_path):
    """For the bundled sample's dir (eval.py on data/kjv_byte before any train.py run), the whole command: C4 with
    GPT-2's tokenizer is not what it holds. With a dataset there, it needs --overwrite."""
    d = tmp_path / "kjv_byte"
    command = f"prepare_c4.py --out_dir {d} --data_dir assets/kjv --tokenizer byte"
    for damage, message in [
        (lambda: None, f"data dir {d} does not exist; run {command} first"),
        (lambda: open(d / "train_000000.bin", "r+b").truncate(1000),
         f"shard {d}/train_000000.bin is truncated or corrupt: 1000 bytes, header says 7903810; re-run {command} "
         "--overwrite"),
        (lambda: (d / "meta.json").write_text("{"), f"{d}/meta.json is corrupt (JSONDecodeError: Expecting property "
                                                    f"name enclosed in double quotes: line 1 column 2 (char 1)); "
                                                    f"re-run {command} --overwrite"),
    ]:
        damage()
        with pytest.raises(DataError) as e:
            TrainBatches(str(d), 64, 2, 2)
        assert str(e.value) == message
        advice = message.split("run ")[-1].removesuffix(" first")
        subprocess.run([sys.executable, *shlex.split(advice)], check=True, capture_output=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
        assert TrainBatches(str(d), 64, 2, 2).meta["splits"]["train"]["tokens"] == 3951889
    other = tmp_path / "mine"  # not a bundled sample: the user's command, with --overwrite once it made meta.json
    shutil.copytree(byte_data, other)
    (other / "meta.json").write_text("{")
    with pytest.raises(DataError, match=rf"\(char 1\)\); re-run prepare_c4.py --out_dir {other} --overwrite$"):
        data.load_meta(other)


def test_vocab_mismatch_between_meta_and_shards(byte_data, tmp_path):
    shutil.copytree(byte_data, tmp_path, dirs_exist_ok=True)
    meta = old_style_meta(byte_data)
    meta["vocab_size"] = 100277
    data.write_meta(str(tmp_path), meta)
    with pytest.raises(DataError, match=r"meta.json: vocab_size 100277 needs uint32 tokens, not uint16"):
        TrainBatches(str(tmp_path), 16, 2, 2)
    meta["dtype"] = "uint32"
    data.write_meta(str(tmp_path), meta)
    with pytest.raises(DataError, match=r"train_000000.bin holds uint16 tokens but meta.json says uint32"):
        TrainBatches(str(tmp_path), 16, 2, 2)
    meta = data.load_meta(byte_data)
    meta["splits"]["train"]["tokens"] += 1
    data.write_meta(str(tmp_path), meta)
    with pytest.raises(DataError, match=r"train shards in .* hold 62885 tokens, meta.json says 62886; re-run"):
        TrainBatches(str(tmp_path), 16, 2, 2)


# ---------------------------------------------------------------- loader


def reference_windows(data_dir, split, T):
    """All (T+1)-token windows at stride T of a split's shards read as one stream (independent of data.py's
    index math): windows cross shard boundaries."""
    toks = split_tokens(data_dir, split).astype(np.int64)
    return np.stack([toks[i:i + T + 1] for i in range(0, len(toks) - T, T)])


def test_train_batches_match_reference(byte_data):
    T, B, TB, seed = 64, 4, 16, 3
    ref = reference_windows(byte_data, "train", T)
    tb = TrainBatches(str(byte_data), T, B, TB, seed=seed)
    assert tb.vocab_size == 257 and tb.grad_accum == 4 and tb.meta["tokenizer"] == "byte"
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(len(ref)) for e in range(3)])
    n_steps = 2 * len(ref) // TB + 1  # crosses two epoch boundaries
    for step in list(range(3)) + [n_steps - 2, n_steps - 1]:
        for k in range(4):
            x, y = tb.get(step, k)
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
            assert x.is_contiguous() and y.is_contiguous()
            want = ref[order[step * TB + k * B: step * TB + (k + 1) * B]]
            assert np.array_equal(x.numpy(), want[:, :-1]) and np.array_equal(y.numpy(), want[:, 1:])


def test_train_batches_deterministic_and_resumable(byte_data):
    a = TrainBatches(str(byte_data), 32, 2, 8, seed=1)
    first = [a.get(s, k)[0] for s in range(5) for k in range(4)]
    b = TrainBatches(str(byte_data), 32, 2, 8, seed=1)  # a resumed run starting at step 3
    assert all(torch.equal(b.get(s, k)[0], first[s * 4 + k]) for s in (3, 4) for k in range(4))
    c = TrainBatches(str(byte_data), 32, 2, 8, seed=2)
    assert not torch.equal(c.get(0, 0)[0], first[0])


def test_ranks_disjoint_and_accumulation_equals_ranks(byte_data):
    T, B, TB = 32, 2, 12
    one = TrainBatches(str(byte_data), T, B, TB)
    ranks = [TrainBatches(str(byte_data), T, B, TB, rank=r, world_size=3) for r in range(3)]
    assert one.grad_accum == 6 and ranks[0].grad_accum == 2
    for step in (0, 7):
        seen = [ranks[r].get(step, k)[0] for k in range(2) for r in range(3)]  # ordered like the 1-process micro-steps
        assert all(torch.equal(seen[m], one.get(step, m)[0]) for m in range(6))
        rows = {tuple(row.tolist()) for x in seen for row in x}
        assert len(rows) == TB  # no window read twice in a step


def test_val_windows_same_for_any_world_size(byte_data):
    T, eval_tokens = 64, 3000
    ref = reference_windows(byte_data, "val", T)[:-(-eval_tokens // T)]
    for W in (1, 2, 3):
        got = {}
        for r in range(W):
            rows = [row for x, y in val_batches(str(byte_data), T, 4, eval_tokens, rank=r, world_size=W)
                    for row in torch.cat([x, y[:, -1:]], 1).numpy()]
            got.update({r + W * i: row for i, row in enumerate(rows)})
        assert sorted(got) == list(range(len(ref))) and all(np.array_equal(got[i], ref[i]) for i in got)


def test_windows_cross_shard_boundaries(c4_source, byte_data, tmp_path):
    """Shards shorter than a window: the split is still one token stream, and every window of it is reachable."""
    prepare(tmp_path, c4_source, "--train_shards", "2", "--workers", "1", "--shard_tokens", "100")
    assert len(data.load_meta(tmp_path)["splits"]["train"]["shards"]) == 629
    for T in (128, 64):
        ref = reference_windows(byte_data, "train", T)
        short, long = TrainBatches(str(tmp_path), T, 4, 16, seed=5), TrainBatches(str(byte_data), T, 4, 16, seed=5)
        assert short.windows.count == long.windows.count == len(ref) == (62885 - 1) // T  # only a partial window lost
        order = np.random.default_rng([5, 0]).permutation(len(ref))
        for step, k in [(0, 0), (3, 2), (len(ref) // 16 - 1, 3)]:
            x, y = short.get(step, k)
            want = ref[order[step * 16 + k * 4: step * 16 + (k + 1) * 4]]
            assert np.array_equal(x.numpy(), want[:, :-1]) and np.array_equal(y.numpy(), want[:, 1:])
            assert all(torch.equal(a, b) for a, b in zip((x, y), long.get(step, k)))
        val = [torch.cat(b) for b in val_batches(str(tmp_path), T, 4, 3000)]
        assert all(torch.equal(a, torch.cat(b)) for a, b in zip(val, val_batches(str(byte_data), T, 4, 3000)))


LOW_LIMIT_CHILD = """
import resource, sys
import numpy as np
from data import TrainBatches, val_batches
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # the hard limit too: nothing can raise it
tb = TrainBatches(sys.argv[1], 32, 8, 16, seed=2)
assert tb.windows.max_open == 16
x = np.stack([tb.get(step, k)[0].numpy() for step in range(20) for k in range(2)])
assert 0 < len(tb.windows.fds) <= 16
v = np.concatenate([x.numpy() for x, y in val_batches(sys.argv[1], 32, 8, 3000)])
np.save(sys.argv[2], x)
np.save(sys.argv[3], v)
try:
    [np.memmap(p, mode="r") for p in tb.windows.paths]
except OSError as e:
    print("memmaps:", e.strerror)
"""


def test_more_shards_than_the_open_file_limit(c4_source, byte_data, tmp_path):
    out = tmp_path / "many"
    prepare(out, c4_source, "--train_shards", "2", "--workers", "1", "--shard_tokens", "300")
    assert len(data.load_meta(out)["splits"]["train"]["shards"]) == 210
    x_path, v_path = tmp_path / "x.npy", tmp_path / "v.npy"
    p = subprocess.run([sys.executable, "-c", LOW_LIMIT_CHILD, str(out), str(x_path), str(v_path)],
                       capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert p.returncode == 0 and p.stdout == "memmaps: Too many open files\n", p.stderr  # one memmap per shard fails
    tb = TrainBatches(str(byte_data), 32, 8, 16, seed=2)  # the same token stream in 2 shards
    assert np.array_equal(np.load(x_path), np.stack([tb.get(s, k)[0].numpy() for s in range(20) for k in range(2)]))
    val = val_batches(str(byte_data), 32, 8, 3000)
    assert np.array_equal(np.load(v_path), np.concatenate([x.numpy() for x, y in val]))


RAISED_LIMIT_CHILD = """
import resource, sys
from data import TrainBatches
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096))  # a hard limit above what 210 shards want
tb = TrainBatches(sys.argv[1], 32, 8, 16)
print(resource.getrlimit(resource.RLIMIT_NOFILE), tb.windows.max_open)
"""


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 4096, reason="needs a hard open-file limit of 4096")
def test_the_soft_open_file_limit_is_raised_to_keep_every_shard_open(c4_source, tmp_path):
    out = tmp_path / "many"
    prepare(out, c4_source, "--train_shards", "2", "--workers", "1", "--shard_tokens", "300")
    p = subprocess.run([sys.executable, "-c", RAISED_LIMIT_CHILD, str(out)], capture_output=True, text=True,
                       cwd=os.path.dirname(__file__))
    assert p.returncode == 0 and p.stdout == "(840, 4096) 210\n", p.stderr  # 210 train shards, 4 descriptors each


def test_shard_removed_or_cut_short_while_training(byte_data, tmp_path):
    for d, damage, message in [
        (tmp_path / "a", lambda d: os.remove(d / "train_000000.bin"),
         "cannot read shard {d}/train_000000.bin: No such file or directory; re-run prepare_c4.py"),
        (tmp_path / "b", lambda d: open(d / "train_000001.bin", "r+b").truncate(1000),
         "shard {d}/train_000001.bin is shorter than its header says; re-run prepare_c4.py"),
    ]:
        shutil.copytree(byte_data, d)
        tb = TrainBatches(str(d), 64, 256, 256)  # headers checked; 256 of the 982 windows reach both shards
        damage(d)
        with pytest.raises(DataError) as e:
            tb.get(0, 0)
        assert str(e.value) == message.format(d=d)


def test_vocab_size_must_be_the_tokenizers(byte_data, tmp_path):
    """A meta.json vocab_size below the largest token id (an IndexError in the embedding) or unlike the tokenizer's
    (a silently larger model) is refused in one line by the loader, before any model is built."""
    shutil.copytree(byte_data, tmp_path, dirs_exist_ok=True)
    meta, path = data.load_meta(byte_data), tmp_path / "meta.json"
    assert meta["tokenizer_vocab_size"] == 257 and meta["splits"]["train"]["max_token_id"] == 256
    for vocab, message in [
        (200, f"{path}: vocab_size 200 is too small for the train shards' token id 256; set vocab_size back to 257 or "
              "re-run prepare_c4.py"),
        (256, f"{path}: vocab_size 256 is too small for the train shards' token id 256; set vocab_size back to 257 or "
              "re-run prepare_c4.py"),
        (300, f"{path}: vocab_size 300 is not the byte tokenizer's 257, so the model would be a different size; set "
              "vocab_size back to 257 or re-run prepare_c4.py"),
    ]:
        data.write_meta(str(tmp_path), dict(meta, vocab_size=vocab))
        for load in (lambda: TrainBatches(str(tmp_path), 16, 2, 2), lambda: val_batches(str(tmp_path), 16, 2, 32)):
            with pytest.raises(DataError) as e:
                load()
            assert str(e.value) == message
    data.write_meta(str(tmp_path), dict(meta, vocab_size="257"))
    with pytest.raises(DataError, match=r"meta.json is corrupt \(TypeError: vocab_size, tokenizer_vocab_size and "
                                        r"max_token_id must be integers\); re-run prepare_c4.py"):
        data.load_meta(tmp_path)
    data.write_meta(str(tmp_path), old_style_meta(byte_data))  # before these were recorded: the old checks only
    assert TrainBatches(str(tmp_path), 16, 2, 2).vocab_size == 257


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=4, total_batch_size=10, world_size=2),
     "total_batch_size 10 is not divisible by batch_size*world_size = 4*2; change total_batch_size or batch_size"),
    (dict(seq_len=10**6), "the train split of {d} has 62885 tokens, fewer than one window of seq_len+1 = 1000001;"
                          " prepare more data or lower seq_len"),
])
def test_train_batches_bad_input(byte_data, kwargs, message):
    args = dict(data_dir=str(byte_data), seq_len=16, batch_size=2, total_batch_size=4) | kwargs
    with pytest.raises(DataError) as e:
        TrainBatches(**args)
    assert str(e.value) == message.format(d=byte_data)


def test_no_shards(byte_data, tmp_path):
    meta = data.load_meta(byte_data)
    meta["splits"]["train"] = {"shards": [], "tokens": 0, "documents": 0}
    data.write_meta(str(tmp_path), meta)
    with pytest.raises(DataError, match=f"^{tmp_path} has no train shards; re-run prepare_c4.py$"):
        TrainBatches(str(tmp_path), 16, 2, 2)


def test_val_too_few_tokens(byte_data):
    with pytest.raises(DataError) as e:
        val_batches(str(byte_data), 1024, 4, 16 * 1024)
    assert str(e.value) == (f"eval_tokens=16384 needs 16 val windows of 1025 tokens but the val split of {byte_data} "
                            "has 15655 tokens (15 windows); lower eval_tokens or prepare more val data")


def test_make_corpus_cli_writes_a_c4_layout_and_refuses_to_overwrite(tmp_path):
    cmd = [sys.executable, "-m", "tools.make_corpus", "--out_dir", str(tmp_path), "--train_docs", "7",
           "--val_docs", "3"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert p.returncode == 0, p.stderr
    names = {"c4-train.00000-of-01024.json.gz": 7, "c4-validation.00000-of-00008.json.gz": 3}
    assert sorted(os.listdir(tmp_path / "en")) == sorted(names)
    for name, n in names.items():
        with gzip.open(tmp_path / "en" / name, "rt") as f:
            lines = [json.loads(line) for line in f]
        assert len(lines) == n and all(isinstance(r["text"], str) and r["text"] for r in lines)
    before = (tmp_path / "en" / "c4-train.00000-of-01024.json.gz").read_bytes()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert p.returncode == 1
    assert p.stderr == f"error: {tmp_path / 'en'} exists already; give another --out_dir or remove it\n"
    assert (tmp_path / "en" / "c4-train.00000-of-01024.json.gz").read_bytes() == before
    p = subprocess.run(cmd + ["--train_docs", "x"], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert (p.returncode, p.stderr) == (1, "error: argument --train_docs: invalid int value: 'x'; see python -m "
                                           "tools.make_corpus --help\n")


def test_seq_len_beyond_the_val_data_asks_for_a_shorter_seq_len(byte_data):
    """One window is needed: lowering eval_tokens cannot help, so the advice is seq_len or more data."""
    with pytest.raises(DataError) as e:
        val_batches(str(byte_data), 20000, 4, 1)
    assert str(e.value) == (f"the val split of {byte_data} has 15655 tokens, fewer than one window of seq_len+1 = "
                            "20001; prepare more data or lower seq_len")
