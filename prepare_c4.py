"""Tokenize C4 (or any json/jsonl(.gz) files with a "text" field) into packed token shards (data.py).

python prepare_c4.py --out_dir data/c4_gpt2          # 1 train + 1 val file of allenai/c4 from the hub
python prepare_c4.py --out_dir data/c4_byte --data_dir /path/to/c4 --tokenizer byte --train_shards 8

Each document is <|endoftext|> + its tokens, cut into shards of --shard_tokens, the same bytes for any --workers.
Shards are staged as *.new, put in place, meta.json last: a failed or interrupted run leaves the output dir as it was.
Exit status: 0 done; 1 any error, bad arguments too (one line on stderr, as train.py's); 130 interrupted."""
import argparse
import contextlib
import fcntl
import functools
import glob
import gzip
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import wait
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor

import numpy as np
import tiktoken

from data import DataError, token_dtype, write_meta, write_shard

C4_FILES = {"train": "en/c4-train.{:05d}-of-01024.json.gz", "val": "en/c4-validation.{:05d}-of-00008.json.gz"}
SHARD = r"(train|val)_\d{6}\.bin(\.new(\.tmp)?)?"  # a shard, staged (.new) or being written (.new.tmp)
OURS = re.compile(rf"\.lock|meta\.json(\.tmp)?|{SHARD}")  # every name prepare_c4.py (and prepare_once) writes
VAL_WORDS = {"val", "valid", "validation"}  # a source file with one of these words in its path is validation data
CHUNK_DOCS = 512  # documents per work item; fixed, so the output does not depend on --workers
PROGRESS_S = 10  # seconds between progress lines (and one at the end of each split)
JSON = json.JSONDecoder(strict=False)  # allows raw control characters (a tab, a NUL) in strings, as scraped text has


@functools.lru_cache
def get_encoding(name):
    """The tiktoken Encoding "byte" (ids 0-255 the UTF-8 bytes, 256 <|endoftext|>) or one of tiktoken's (gpt2, ...)."""
    if name == "byte":
        return tiktoken.Encoding("byte", pat_str=r"[\s\S]+", special_tokens={"<|endoftext|>": 256},
                                 mergeable_ranks={bytes([i]): i for i in range(256)})
    if name not in tiktoken.list_encoding_names():
        raise DataError(f"unknown tokenizer {name!r}; use byte or one of {', '.join(tiktoken.list_encoding_names())}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        raise DataError(f"could not download tiktoken encoding {name!r} ({type(e).__name__}); run once with network "
                        "access, or point TIKTOKEN_CACHE_DIR at a dir holding it (docs/data.md)") from None


def c4_files(train_shards, val_shards):
    return {s: [C4_FILES[s].format(i) for i in range(n or 1)] for s, n in zip(C4_FILES, (train_shards, val_shards))}


def find_sources(data_dir, train_shards, val_shards):
    """-> {split: [paths]}; outside a C4 clone, the files with a VAL_WORDS word in their path are val, else the last."""
    if glob.glob(os.path.join(glob.escape(data_dir), "en", "c4-*.json.gz")):  # a local clone of allenai/c4
        files = {s: [os.path.join(data_dir, f) for f in fs] for s, fs in c4_files(train_shards, val_shards).items()}
        missing = [f for fs in files.values() for f in fs if not os.path.isfile(f)]
        if missing:
            raise DataError(f"{missing[0]} is missing; download it into the clone or lower --train_shards/--val_shards")
        return files
    if not glob.has_magic(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir} does not exist; give a local C4 clone or a dir/glob of json files")
    paths = glob.glob(data_dir if glob.has_magic(data_dir) else os.path.join(data_dir, "*"))
    paths = sorted(p for p in paths if p.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")))
    if len(paths) < 2:
        raise DataError(f"{data_dir} has {len(paths)} .json/.jsonl(.gz) files; need at least 2 (train and val)")
    root = os.path.commonpath(paths)
    val = [p for p in paths if VAL_WORDS & set(re.split(r"[\W_]+", os.path.relpath(p, root).lower()))]
    val = val if 0 < len(val) < len(paths) else paths[-1:]
    train = [p for p in paths if p not in val]
    return {"train": train[:train_shards], "val": val[:val_shards]}


def read_chunks(path):
    """Yield (path, [(line number, line)]) work items of one json-lines file's non-blank lines."""
    chunk = None
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            lines = ((n, line) for n, line in enumerate(f, 1) if line.strip())
            for chunk in iter(lambda: list(itertools.islice(lines, CHUNK_DOCS)), []):
                yield path, chunk
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path} ({e}); re-download it") from None
    if chunk is None:
        raise DataError(f"{path} is empty; remove it or re-download it")


def hub_file(name):
    import huggingface_hub  # only needed without --data_dir
    try:
        return huggingface_hub.hf_hub_download("allenai/c4", name, repo_type="dataset")
    except Exception as e:
        raise DataError(f"could not download {name} of allenai/c4 from the hub ({type(e).__name__}); "
                        "check the network or pass --data_dir with a local copy") from None


def parse_line(line):
    try:
        s, repaired = line.decode("utf-8"), False
    except UnicodeDecodeError:
        s, repaired = line.decode("utf-8", "replace"), True
    return JSON.decode(s.removeprefix("\ufeff"))["text"], repaired  # a BOM opening the file is fine


def encode(enc, text):
    """-> (encode_ordinary(text) as a uint32 array, whether text held lone surrogates, which it makes U+FFFD)."""
    try:
        return enc.encode_to_numpy(text, disallowed_special=()), False
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # as encode_ordinary does
        return enc.encode_to_numpy(text, disallowed_special=()), True


def tokenize(tokenizer, chunk):
    enc, (where, items) = get_encoding(tokenizer), chunk
    eot, parts, repaired = np.array([enc.eot_token], dtype=np.uint32), [np.empty(0, dtype=np.uint32)], 0
    for line_number, item in items:
        try:
            text, bad_bytes = parse_line(item)
            tokens, bad_text = encode(enc, text)
        except (ValueError, KeyError, TypeError, RecursionError):
            raise DataError(f"{where} line {line_number}: not a JSON object with a 'text' string; "
                            "fix or remove that file") from None
        parts += [eot, tokens]
        repaired += bad_bytes or bad_text
    return len(items), repaired, np.concatenate(parts).astype(token_dtype(enc.n_vocab))


def tokenize_split(split, chunks, pool, args):
    """Tokenize one split into staged shards <split>_NNNNNN.bin.new -> its meta.json entry."""
    names, buf, n_tokens, n_docs, n_repaired, max_id, t0 = [], [], 0, 0, 0, 0, time.time()

    def flush(tokens):
        names.append(f"{split}_{len(names):06d}.bin")
        write_shard(os.path.join(args.out_dir, names[-1] + ".new"), tokens)

    shown, last_shown = None, t0 - PROGRESS_S  # the first work item is shown

    def show_progress():  # in one write, so that an interrupt cannot come between the line and its newline
        note = f" ({n_repaired:,} repaired: invalid UTF-8 or lone surrogates became U+FFFD)" if n_repaired else ""
        print(f"{split}: {n_docs:,} docs{note}, {n_tokens:,} tokens, {n_tokens / (time.time() - t0):,.0f} tokens/s\n",
              end="", file=sys.stderr, flush=True)

    work = functools.partial(tokenize, args.tokenizer)
    for docs, repaired, tokens in pool_map(pool, work, chunks, 2 * args.workers) if pool else map(work, chunks):
        n_docs, n_repaired, n_tokens = n_docs + docs, n_repaired + repaired, n_tokens + len(tokens)
        max_id = max(max_id, int(tokens.max(initial=0)))
        buf.append(tokens)
        while sum(map(len, buf)) >= args.shard_tokens:
            joined = np.concatenate(buf)
            flush(joined[:args.shard_tokens])
            buf = [joined[args.shard_tokens:]]
        if time.time() - last_shown >= PROGRESS_S:
            show_progress()
            shown, last_shown = n_docs, time.time()
    if shown != n_docs:
        show_progress()
    if sum(map(len, buf)):
        flush(np.concatenate(buf))
    return {"shards": names, "tokens": n_tokens, "documents": n_docs, "repaired_documents": n_repaired,
            "max_token_id": max_id}


def pool_map(pool, fn, items, ahead):
    """fn(item) for each item, in order, by pool's workers, with at most `ahead` items in flight."""
    items, futures = iter(items), []
    while True:
        futures.extend(pool.submit(fn, item) for item in itertools.islice(items, ahead - len(futures)))
        if not futures:
            return
        while not wait([futures[0]], timeout=1).done:  # a worker that died sending its result leaves the pool
            if any(p.exitcode is not None for p in pool._processes.values()):  # waiting for the rest of it
                raise BrokenProcessPool
        yield futures.pop(0).result()


def start_worker():
    """Leave Ctrl-C and SIGTERM (a terminal, timeout or SLURM signals every process) to the parent; exit with it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()


def exit_with_parent(parent):
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def dead_worker(pool):
    """The DataError for a pool broken by a worker's death: which worker, and how it died."""
    procs, deadline = list(pool._processes.values()), time.time() + 10  # in start order
    while not any(p.exitcode for p in procs):  # exitcode polls; the others may exit 0 once the pool breaks
        if time.time() > deadline:  # broken with every worker alive: a result that could not be passed back
            return DataError("the worker pool broke with every worker alive; the output dir is as it was: rerun with "
                             "--workers 1")
        time.sleep(0.01)
    k, code = next((k, p.exitcode) for k, p in enumerate(procs) if p.exitcode)
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    return DataError(f"worker process {k} died ({how}); the output dir is as it was: rerun, with fewer --workers if it "
                     "ran out of memory")


def stop(pool):
    """Kill pool's workers (kill_workers from Python 3.14 on) and shut it down."""
    if pool:
        for p in list(pool._processes.values()):
            p.kill()
        pool._result_queue._writer.close()  # the last writer of results: one cut off by a death now ends (EOF)
        pool.shutdown(cancel_futures=True)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one-line error instead of usage + exit
        raise DataError(f"{message}; see python prepare_c4.py --help")


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace the dataset that --out_dir holds")
    p.add_argument("--data_dir", help="local C4 clone, or dir/glob of json/jsonl(.gz) files (default: the hub)")
    p.add_argument("--tokenizer", default="gpt2", help="a tiktoken encoding name, or byte")
    p.add_argument("--train_shards", type=int, help="source files for train (default: 1 of C4, else all)")
    p.add_argument("--val_shards", type=int, help="source files for val (default: 1 of C4, else all)")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per output shard")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    if args.workers < 1 or args.shard_tokens < 1 or min(args.train_shards or 1, args.val_shards or 1) < 1:
        raise DataError("--workers, --shard_tokens, --train_shards and --val_shards must be positive")
    names = os.listdir(args.out_dir) if os.path.isdir(args.out_dir) else []
    foreign = [name for name in sorted(names) if not OURS.fullmatch(name)]
    if foreign:
        raise DataError(f"{args.out_dir} holds {foreign[0]}, which prepare_c4.py does not write, so it is not a "
                        "dataset; move it away or use another dir")
    if "meta.json" in names and not args.overwrite:
        raise DataError(f"--out_dir {args.out_dir} holds a prepared dataset; pass --overwrite to replace it (runs "
                        "trained on it then refuse to resume on it), or another --out_dir")
    try:
        enc = get_encoding(args.tokenizer)
    except DataError as e:
        raise DataError(f"{e}; or prepare with --tokenizer byte, which needs no download") from None
    if args.data_dir:
        files = find_sources(args.data_dir, args.train_shards, args.val_shards)
        source = {"files": {s: [os.path.abspath(f) for f in fs] for s, fs in files.items()}}
    else:
        source = {"hub": "allenai/c4", "files": c4_files(args.train_shards, args.val_shards)}
        files = {s: map(hub_file, fs) for s, fs in source["files"].items()}  # each downloaded when it is read
    chunks = {s: (c for f in fs for c in read_chunks(f)) for s, fs in files.items()}
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:  # a file of that name, a parent that is a file, no permission
        raise DataError(f"cannot use --out_dir {args.out_dir}: {e.strerror}; pass another --out_dir") from None
    meta = {"tokenizer": args.tokenizer, "vocab_size": enc.n_vocab, "tokenizer_vocab_size": enc.n_vocab,
            "eot_id": enc.eot_token, "source": source, "dtype": token_dtype(enc.n_vocab).name,
            "shard_tokens": args.shard_tokens, "splits": {}}
    pool = None
    try:
        if args.workers > 1:
            pool = ProcessPoolExecutor(args.workers, initializer=start_worker)
        for split in ("train", "val"):
            meta["splits"][split] = tokenize_split(split, chunks[split], pool, args)
    except BaseException as e:  # an error, Ctrl-C or SIGTERM: remove our staged files, an older dataset stays intact
        with uninterruptible():
            error = dead_worker(pool) if isinstance(e, BrokenProcessPool) else e
            stop(pool)
            remove(args.out_dir, r"(train|val)_\d{6}\.bin\.new(\.tmp)?")
        raise error
    with uninterruptible():  # a moment; SIGKILL here leaves no meta.json, so the data is refused until a rerun
        stop(pool)
        install(args.out_dir, meta)
    return meta


@contextlib.contextmanager
def uninterruptible():
    """Ignore Ctrl-C and SIGTERM for a step that must finish once begun (main thread only)."""
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def remove(out_dir, pattern, keep=()):
    for name in os.listdir(out_dir):
        if re.fullmatch(pattern, name) and name not in keep:
            os.remove(os.path.join(out_dir, name))


def install(out_dir, meta):
    """Move the staged shards into place, drop shards of earlier runs, then write meta.json."""
    remove(out_dir, r"meta\.json")
    keep = [name for s in meta["splits"].values() for name in s["shards"]]
    for name in keep:
        os.replace(os.path.join(out_dir, name + ".new"), os.path.join(out_dir, name))
    remove(out_dir, SHARD, keep)
    write_meta(out_dir, meta)


def prepare_once(out_dir, source):
    """train.py's first use of a bundled sample's data dir (data.BUNDLED): prepare source into out_dir with the byte
    tokenizer unless it holds meta.json -> whether this call did. Runs at once take turns on out_dir/.lock."""
    if os.path.exists(os.path.join(out_dir, "meta.json")):  # prepared: no lock needed, so it may be read-only
        return False
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, ".lock"), "a")
        fcntl.flock(lock, fcntl.LOCK_EX)  # until the run preparing it (if any) is done
    except OSError as e:  # a file of that name, a parent that is a file, no permission, no locks on its filesystem
        raise DataError(f"cannot use {out_dir}: {e.strerror}; use another data dir") from None
    with lock:
        if os.path.exists(os.path.join(out_dir, "meta.json")):
            return False
        if not glob.has_magic(source) and not os.path.exists(source):
            raise DataError(f"data source {source} does not exist in {os.getcwd()}; run from the directory it is "
                            "relative to or give its absolute path")
        shown = source.removeprefix(os.path.dirname(os.path.abspath(__file__)) + os.sep)  # the bundled: as in the repo
        print(f"preparing {out_dir} from {shown} with the byte tokenizer (first run)", flush=True)
        main(["--out_dir", out_dir, "--data_dir", source, "--tokenizer", "byte", "--workers", "1"])
    return True


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    try:
        main()
    except (ValueError, OSError) as e:  # bad input (DataError is a ValueError), an --out_dir it cannot write
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted: removed this run's staged shards, the output dir is as it was; rerun to prepare the data",
              file=sys.stderr)
        sys.exit(130)
