"""Token shards on disk and the batch loader that reads them.

A shard is a header of four little-endian int64 (magic, format version, bytes per token, token count), then the
tokens as uint16 (vocab <= 65536) or uint32. prepare_c4.py writes a data dir of train_000000.bin, ...,
val_000000.bin, ... and meta.json.
"""
import bisect
import functools
import itertools
import json
import os
import resource

import numpy as np

MAGIC = 0x53434C45_44415441  # "SCLEDATA"
VERSION = 1
HEADER_BYTES = 4 * 8
DTYPES = {2: np.uint16, 4: np.uint32}
SPLITS = ("train", "val")
BUNDLED = {"kjv_byte": "assets/kjv"}  # data dir name: the sample in this repository (assets/kjv/SOURCE.md)


class DataError(ValueError):
    """Bad data on disk or bad loader arguments; the message says what to do."""


def token_dtype(vocab_size):
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def bundled_source(data_dir):
    """The bundled sample (an absolute path) that a data dir of this name (data/kjv_byte) is prepared from, or None."""
    name = BUNDLED.get(os.path.basename(os.path.normpath(data_dir)))
    return name and os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def prepare_command(data_dir, whole=True):
    """The prepare_c4.py command that prepares data_dir (again); unless whole, only 'prepare_c4.py' (the user's
    own command) for a data dir not named after a bundled sample."""
    source = BUNDLED.get(os.path.basename(os.path.normpath(data_dir)))
    if not (whole or source):
        return "prepare_c4.py"
    return (f"prepare_c4.py --out_dir {data_dir}" + (f" --data_dir {source} --tokenizer byte" if source else "")
            + (" --overwrite" if os.path.exists(os.path.join(data_dir, "meta.json")) else ""))


def write_atomic(path, write, previous=None):
    """write(f) into path + '.tmp', fsync, then rename over path; with previous, the file at path (if any) is
    first renamed to previous, so it is kept."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if previous and os.path.exists(path):
        os.replace(path, previous)
    os.replace(tmp, path)


def write_shard(path, tokens):
    """tokens: a 1-D uint16 or uint32 array."""
    header = np.array([MAGIC, VERSION, tokens.dtype.itemsize, len(tokens)], dtype="<i8")
    write_atomic(path, lambda f: f.writelines([header, np.ascontiguousarray(tokens, tokens.dtype.newbyteorder("<"))]))


def read_header(path, dtype=None):
    """-> (dtype, n_tokens), checking magic, version, file size and, if given (meta.json's), the token dtype."""
    redo = f"re-run {prepare_command(os.path.dirname(path), whole=False)}"
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"cannot read shard {path}: {e.strerror}; {redo}") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"shard {path} is truncated ({size} bytes, no full header); {redo}")
    magic, version, itemsize, n = np.frombuffer(raw, dtype="<i8").tolist()
    if magic != MAGIC or version != VERSION or itemsize not in DTYPES:
        raise DataError(f"{path} is not a token shard of format version {VERSION} (magic, version or token size "
                        f"differ); {redo}")
    if size != HEADER_BYTES + n * itemsize:
        raise DataError(f"shard {path} is truncated or corrupt: {size} bytes, header says "
                        f"{HEADER_BYTES + n * itemsize}; {redo}")
    if dtype is not None and np.dtype(dtype) != DTYPES[itemsize]:
        raise DataError(f"shard {path} holds {np.dtype(DTYPES[itemsize])} tokens but meta.json says "
                        f"{np.dtype(dtype)}; the shard and meta.json come from different runs: {redo}")
    return np.dtype(DTYPES[itemsize]), n


def write_meta(data_dir, meta):
    path = os.path.join(data_dir, "meta.json")
    write_atomic(path, lambda f: f.write((json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()))


def load_meta(data_dir):
    """-> data_dir/meta.json as a dict, its vocab_size checked against the tokenizer's and the largest token id
    (where recorded: older meta.json lack them), so that a wrong one is refused before any model is built."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise DataError(f"data dir {data_dir} does not exist; run {prepare_command(data_dir)} first")
    try:
        with open(path) as f:
            meta = json.load(f)
        vocab, dtype = meta["vocab_size"], np.dtype(meta["dtype"])
        for split in SPLITS:
            s = meta["splits"][split]
            s["tokens"], s["documents"], list(s["shards"])  # KeyError/TypeError if malformed
        n_vocab = meta.get("tokenizer_vocab_size", vocab)
        split = max(SPLITS, key=lambda s: meta["splits"][s].get("max_token_id", -1))  # absent in older meta.json
        max_id = meta["splits"][split].get("max_token_id", -1)
        if not all(type(v) is int for v in (vocab, n_vocab, max_id)):
            raise TypeError("vocab_size, tokenizer_vocab_size and max_token_id must be integers")
    except FileNotFoundError:
        raise DataError(f"{path} is missing (preparation never finished?); run {prepare_command(data_dir)}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is corrupt ({type(e).__name__}: {e}); re-run {prepare_command(data_dir)}") from None
    redo = f"re-run {prepare_command(data_dir, whole=False)}"
    if vocab <= max_id:
        raise DataError(f"{path}: vocab_size {vocab} is too small for the {split} shards' token id {max_id}; "
                        f"set vocab_size back to {n_vocab} or {redo}")
    if vocab != n_vocab:
        raise DataError(f"{path}: vocab_size {vocab} is not the {meta.get('tokenizer')} tokenizer's {n_vocab}, so the "
                        f"model would be a different size; set vocab_size back to {n_vocab} or {redo}")
    if dtype != token_dtype(vocab):
        raise DataError(f"{path}: vocab_size {vocab} needs {token_dtype(vocab)} tokens, not {dtype}; {redo}")
    return meta


def data_identity(meta):
    """What a checkpoint records of the data it was trained on (a meta.json): tokenizer, vocabulary, token counts
    and source file names (not paths: the data may move)."""
    return {"tokenizer": meta["tokenizer"], "vocab_size": meta["vocab_size"],
            **{f"{s} tokens": meta["splits"][s]["tokens"] for s in SPLITS},
            "source": {s: [os.path.basename(f) for f in fs] for s, fs in meta["source"]["files"].items()}}


def check_same_data(saved, data_dir, ckpt_path):
    """Raise DataError unless data_dir holds the data whose data_identity the checkpoint at ckpt_path saved (None,
    in a checkpoint older than that record, passes)."""
    if not saved:
        return
    now = data_identity(load_meta(data_dir))
    changed = [key for key in saved if saved[key] != now.get(key)]
    if changed:
        raise DataError(f"{data_dir} is not the data {ckpt_path} was trained on (its {', '.join(changed)} differ); "
                        "use that data: prepare_c4.py with the same arguments makes it again")


class Windows:
    """Window i of a split is stream[i*seq_len : i*seq_len + seq_len + 1], its shards read end to end as one stream.
    Shards stay open for os.preadv, the open-file limit first raised to 4 per shard if it can be; at a quarter of
    the limit all are closed and reopened as read, so any number of shards fits."""

    def __init__(self, data_dir, meta, split, seq_len):
        self.fds = {}  # shard index -> open file descriptor
        self.redo = f"re-run {prepare_command(data_dir, whole=False)}"
        info = meta["splits"][split]
        if not info["shards"]:
            raise DataError(f"{data_dir} has no {split} shards; {self.redo}")
        self.paths = [os.path.join(data_dir, name) for name in info["shards"]]
        # start[s]: the stream position of shard s's first token
        self.start = [0, *itertools.accumulate(read_header(p, meta["dtype"])[1] for p in self.paths)]
        self.dtype, self.n_tokens, self.seq_len = np.dtype(meta["dtype"]), self.start[-1], seq_len
        if self.n_tokens != info["tokens"]:
            raise DataError(f"{split} shards in {data_dir} hold {self.n_tokens} tokens, meta.json says "
                            f"{info['tokens']}; {self.redo}")
        self.count = max(self.n_tokens - 1, 0) // seq_len
        if self.count == 0:
            raise DataError(f"the {split} split of {data_dir} has {self.n_tokens} tokens, fewer than one window of "
                            f"seq_len+1 = {seq_len + 1}; prepare more data or lower seq_len")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < 4 * len(self.paths):
            soft = 4 * len(self.paths) if hard == resource.RLIM_INFINITY else min(4 * len(self.paths), hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        self.max_open = len(self.paths) if soft == resource.RLIM_INFINITY else max(soft // 4, 1)

    def close(self):  # when max_open shards are open, and when garbage collected
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    __del__ = close

    def read(self, pos, out):
        """Fill out (a 1-D array of the shards' dtype) with the stream's tokens from position pos on."""
        s, done = bisect.bisect_right(self.start, pos) - 1, 0
        while done < len(out):
            n = min(len(out) - done, self.start[s + 1] - pos - done)  # tokens to take from shard s
            offset = HEADER_BYTES + (pos + done - self.start[s]) * self.dtype.itemsize
            try:
                if s not in self.fds:
                    if len(self.fds) >= self.max_open:
                        self.close()
                    self.fds[s] = os.open(self.paths[s], os.O_RDONLY)
                got = os.preadv(self.fds[s], [out[done:done + n]], offset)
            except OSError as e:
                raise DataError(f"cannot read shard {self.paths[s]}: {e.strerror}; {self.redo}") from None
            if got != n * self.dtype.itemsize:
                raise DataError(f"shard {self.paths[s]} is shorter than its header says; {self.redo}")
            s, done = s + 1, done + n

    def batch(self, indices):
        """Windows at these indices -> x, y int64 tensors of shape (len(indices), seq_len)."""
        import torch  # imported here so prepare_c4.py's workers do not pay for it

        buf = np.empty((len(indices), self.seq_len + 1), dtype=self.dtype)
        for row, i in zip(buf, indices):
            self.read(int(i) * self.seq_len, row)
        return torch.from_numpy(buf[:, :-1].astype(np.int64)), torch.from_numpy(buf[:, 1:].astype(np.int64))


class TrainBatches:
    """Training batches, a function of (seed, step, micro_step, rank) only."""

    def __init__(self, data_dir, seq_len, batch_size, total_batch_size, rank=0, world_size=1, seed=0):
        if total_batch_size % (batch_size * world_size):
            raise DataError(f"total_batch_size {total_batch_size} is not divisible by batch_size*world_size = "
                            f"{batch_size}*{world_size}; change total_batch_size or batch_size")
        self.meta = load_meta(data_dir)
        self.vocab_size = self.meta["vocab_size"]
        self.windows = Windows(data_dir, self.meta, "train", seq_len)
        self.B, self.TB, self.rank, self.world_size, self.seed = batch_size, total_batch_size, rank, world_size, seed
        self.grad_accum = total_batch_size // (batch_size * world_size)

    @functools.lru_cache(maxsize=4)
    def permutation(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(self.windows.count)

    def get(self, step, micro_step):
        """Position p of the endless sequence of epoch permutations is window permutation(p // N)[p % N]."""
        start, N = step * self.TB + (micro_step * self.world_size + self.rank) * self.B, self.windows.count
        return self.windows.batch([self.permutation(p // N)[p % N] for p in range(start, start + self.B)])


def val_batches(data_dir, seq_len, batch_size, eval_tokens, rank=0, world_size=1, split="val"):
    """The first ceil(eval_tokens/seq_len) windows of a split; rank r takes windows r, r+W, ... in batches. Checks
    its input when called, before the first batch is asked for."""
    windows = Windows(data_dir, load_meta(data_dir), split, seq_len)
    n = -(-eval_tokens // seq_len)
    if n > windows.count:
        raise DataError(f"eval_tokens={eval_tokens} needs {n} {split} windows of {seq_len + 1} tokens but the {split} "
                        f"split of {data_dir} has {windows.n_tokens} tokens ({windows.count} windows); "
                        f"lower eval_tokens or prepare more {split} data")
    mine = np.arange(rank, n, world_size)
    return (windows.batch(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size))
