"""Data pipeline speed: prepare_c4.py tokens/s for 1 and N workers against a plain encode_ordinary loop,
and the loader's batch latency.

python bench_data.py [--docs 40000] [--workers 1 2] [--tokenizer auto|byte|gpt2|...]
"""
import argparse
import gzip
import json
import os
import pathlib
import statistics
import tempfile
import time
from unittest import mock

import tiktoken

import prepare_c4
from conftest import make_c4_source
from data import TrainBatches


def pick_tokenizer(name):
    """'auto' -> gpt2 if tiktoken has it cached (never downloads), else byte."""
    if name != "auto":
        return name
    with mock.patch("tiktoken.load.read_file", side_effect=OSError("no downloads in the benchmark")):
        try:
            tiktoken.get_encoding("gpt2")
            return "gpt2"
        except Exception:
            return "byte"


def plain_loop(files, tokenizer):
    """The baseline: one process, read each json line, encode_ordinary, count tokens."""
    enc, n = prepare_c4.get_encoding(tokenizer), 0
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                n += 1 + len(enc.encode_ordinary(json.loads(line)["text"]))
    return n


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def loader_latency(data_dir, batch_size, seq_len, n=200):
    tb = TrainBatches(data_dir, seq_len, batch_size, batch_size)
    tb.get(0, 0)  # builds the epoch permutation once
    times = []
    for step in range(1, n + 1):
        t0 = time.perf_counter()
        tb.get(step, 0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=40000, help="documents in the generated train file")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizer", default="auto")
    args = p.parse_args(argv)
    tokenizer = pick_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "c4")
        make_c4_source(pathlib.Path(src), n_train=(args.docs,), n_val=args.docs // 10)
        files = [os.path.join(src, f) for fs in prepare_c4.c4_files(1, 1).values() for f in fs]
        print(f"tokenizer {tokenizer}, {args.docs} + {args.docs // 10} generated documents, {os.cpu_count()} cores")
        n_tokens, t_plain = timed(plain_loop, files, tokenizer)
        print(f"plain encode_ordinary loop  : {n_tokens:>10,} tokens {t_plain:6.2f} s "
              f"{n_tokens / t_plain:>12,.0f} tokens/s")
        for w in args.workers:
            out = os.path.join(tmp, f"out{w}")
            meta, t = timed(prepare_c4.main, ["--out_dir", out, "--data_dir", src, "--tokenizer", tokenizer,
                                              "--workers", str(w)])
            n = sum(s["tokens"] for s in meta["splits"].values())
            assert n == n_tokens, (n, n_tokens)
            print(f"prepare_c4.py --workers {w:<3}: {n:>10,} tokens {t:6.2f} s {n / t:>12,.0f} tokens/s "
                  f"= {t_plain / t:.2f}x the plain loop")
        med, worst = loader_latency(out, batch_size=8, seq_len=1024)
        print(f"loader batch B=8 T=1024: median {med * 1e6:.0f} us, max {worst * 1e6:.0f} us (200 batches)")


if __name__ == "__main__":
    main()
