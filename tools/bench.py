"""Benchmarks, each printing ratios against a peer measured in the same run.

python -m tools.bench optimizer [--dtype float32 bfloat16] [--device cpu|cuda]   SCALE step vs fused AdamW, state bytes;
                                     in bf16, stochastic rounding's step vs round to nearest
python -m tools.bench model [--cuda]       training tokens/s of model.py vs transformers.LlamaForCausalLM; on CUDA also
                                     MFU, peak memory and compile time at 60M, 350M and 1B (as gpu_check.py)
python -m tools.bench data [--docs 40000]  prepare_c4.py tokens/s for 1 and 2 workers vs a plain loop; loader latency
python -m tools.bench fsdp [--config configs/llama_350m.py] [--key=value ...]   train.py on 1 GPU with FSDP vs without
"""
import argparse
import gzip
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

import tiktoken
import torch
import torch.nn.functional as F

import numpy as np

import prepare_c4
from tools.compare import paper_config
from data import TrainBatches, token_dtype, write_meta, write_shard
from tools.make_corpus import make_c4_source
from model import LLaMA, LLaMAConfig, peak_flops
from scale import SCALE, scale_param_groups
from train import set_param_dtypes, state_bytes


def paper_model(name, vocab_size=32000):
    """The LLaMAConfig of configs/<name>.py, with the paper's 32000-entry vocabulary and seq_len 256."""
    return LLaMAConfig.from_config(vars(paper_config(name)), vocab_size)


LLAMA_60M = paper_model("llama_60m")


# -----------------------------------------------------------------------------
# optimizer: one step of each optimizer on the same model shapes, interleaved so drift hits all alike

def time_in_turn(steps, warmup, n, sync=lambda: None):
    """Median seconds of each step function {name: step(i)}, called in turn so drift hits all alike."""
    times = {name: [] for name in steps}
    for i in range(warmup + n):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step(i)
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def optimizer_step(opt, warmup):
    def step(i):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (1 - i / 1000)  # as a scheduler would
        with torch._dynamo.config.patch(error_on_recompile=i >= warmup):  # lr changes, shapes don't
            opt.step()
    return step


def bench_optimizer(args):
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"{device.type}, {torch.get_num_threads()} threads, LLaMA-60M shapes {LLAMA_60M}, median of {args.steps} "
          f"steps after {args.warmup} warmup (eager SCALE: 5 steps in turn with AdamW alone, apart from the compiled "
          f"step, which its temporaries would slow)")
    for dtype in args.dtype:
        # a fresh compile cache per dtype, as train.py's one process has: 3 roles x (nearest, stochastic) graphs of
        # normalized_update_ in bf16 after fp32's 3 would pass dynamo's cache limit of 8 and run the rest eagerly
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = LLaMA(LLAMA_60M).to(device, getattr(torch, dtype))
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opts = {"AdamW(fused=True)": torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
                "SCALE compiled": SCALE(scale_param_groups(model), lr=1e-3, compile=True)}
        if dtype == "bfloat16":  # stochastic rounding of the bf16 writes (train.py's bf16=stochastic)
            opts["SCALE compiled SR"] = SCALE(scale_param_groups(model), lr=1e-3, compile=True,
                                              bf16_rounding="stochastic")
        times = time_in_turn({name: optimizer_step(opt, args.warmup) for name, opt in opts.items()}, args.warmup,
                             args.steps, sync)
        ratios = {name: t / times["AdamW(fused=True)"] for name, t in times.items()}
        opts["SCALE eager"] = SCALE(scale_param_groups(model), lr=1e-3)
        pair = time_in_turn({name: optimizer_step(opts[name], 1) for name in ("AdamW(fused=True)", "SCALE eager")},
                            1, 5, sync)
        times["SCALE eager"], ratios["SCALE eager"] = (pair["SCALE eager"],
                                                       pair["SCALE eager"] / pair["AdamW(fused=True)"])
        base_bytes = state_bytes([opts["AdamW(fused=True)"]])
        print(f"{dtype}: {sum(p.numel() for p in model.parameters()):,} params")
        for name, opt in opts.items():
            nbytes = state_bytes([opt])
            print(f"  {name:18s} step {1e3 * times[name]:8.2f} ms = {ratios[name]:5.2f}x AdamW   "
                  f"state {nbytes / 1e6:7.1f} MB = {nbytes / base_bytes:6.1%} of AdamW")
        if "SCALE compiled SR" in times:
            print(f"  stochastic rounding: {times['SCALE compiled SR'] / times['SCALE compiled']:.3f}x the compiled "
                  "step with round to nearest (stepped in turn)")
        del model, opts


# -----------------------------------------------------------------------------
# model: forward + backward + optimizer step, ours against HF's LlamaForCausalLM

# the GPU runs of bench.py model --cuda and gpu_check.py: (config, batch size per step, with the HF peer)
GPU_RUNS = (("llama_60m", 256, True), ("llama_350m", 128, True), ("llama_1b", 64, False))


def train_step(loss_fn, opt, x, y):
    def step(i):
        loss_fn(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def loss_of(model):
    return lambda x, y: model(x, y)[1]


def build_hf(cfg):
    """transformers.LlamaForCausalLM (sdpa attention, no KV cache) of the same shape as LLaMA(cfg); ImportError
    without transformers."""
    from export_hf import hf_config
    import transformers
    return transformers.LlamaForCausalLM(hf_config(cfg, use_cache=False, attn_implementation="sdpa"))


def hf_loss_of(hf, vocab_size):
    return lambda x, y: F.cross_entropy(hf(input_ids=x).logits.float().view(-1, vocab_size), y.view(-1))


def bench_model_cpu(args):
    torch.manual_seed(0)
    cfg = LLaMAConfig(dim=256, n_layers=4, n_heads=4, ffn_dim=688, vocab_size=32000, max_seq_len=args.seq_len)
    x, y = (torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len)) for _ in range(2))
    print(f"CPU, {torch.get_num_threads()} threads, d={cfg.dim} layers={cfg.n_layers} vocab={cfg.vocab_size} "
          f"batch {args.batch_size}x{args.seq_len}, median of {args.steps} steps after {args.warmup} warmup")
    runs = {}
    try:
        hf = build_hf(cfg)
        runs["HF LlamaForCausalLM (sdpa) + fused AdamW"] = (hf_loss_of(hf, cfg.vocab_size),
                                                            torch.optim.AdamW(hf.parameters(), lr=1e-3, fused=True))
    except ImportError:
        print("note: transformers is not installed (pip install transformers): no HF baseline")
    for compiled in (False, True):
        model = LLaMA(cfg)
        fwd = torch.compile(model, fullgraph=True) if compiled else model
        name = f"ours {'compiled' if compiled else 'eager'} + SCALE{' compiled' if compiled else ''}"
        runs[name] = loss_of(fwd), SCALE(scale_param_groups(model), lr=1e-3, compile=compiled)
    results = time_in_turn({name: train_step(*run, x, y) for name, run in runs.items()}, args.warmup, args.steps)
    base = next((t for k, t in results.items() if k.startswith("HF")), None)
    for name, t in results.items():
        print(f"{name:50s} {args.batch_size * args.seq_len / t:9.0f} tokens/s"
              + (f"  {base / t:.2f}x HF" if base else ""))


OURS, HF = "ours + SCALE", "HF + fused AdamW"


def measure_training(cfg, batch_size, device, peer=True, compile=True, warmup=2, steps=8):
    """Training steps (forward, backward, optimizer step) on one random batch of (batch_size, cfg.max_seq_len)
    token ids, in bf16: model.py with SCALE as train.py runs dtype=bfloat16 (model and update torch.compile'd when
    compile), and with peer transformers.LlamaForCausalLM (sdpa) with fused AdamW (eager), on the same batch,
    stepped in turn with ours (time_in_turn).
    -> ({OURS: row, HF: row}, notes), row = dict(batch_size, tokens_per_s, mfu, peak_bytes, first_step_s):
    tokens/s of the median step; MFU against model.peak_flops (None off a GPU it knows); peak memory (bytes, None
    off CUDA) of one step after the first, less what was allocated before the model was built, so each model's own;
    first_step_s, the first step's seconds, compilation included. notes: lines to print (no transformers)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch._dynamo.reset()  # compile as a fresh process would: static shapes, and clear of the recompile limit
    torch.manual_seed(0)
    x, y = (torch.randint(0, cfg.vocab_size, (batch_size, cfg.max_seq_len), device=device) for _ in range(2))
    steps_of, rows, notes = {}, {}, []

    def start(name, build):  # build the model and optimizer, take 3 steps: the first timed, the third's peak memory
        base = torch.cuda.memory_allocated(device) if cuda else 0
        step = train_step(*build(), x, y)
        sync()
        t0 = time.perf_counter()
        step(0)
        sync()
        first = time.perf_counter() - t0
        step(1)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step(2)
        sync()
        peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
        steps_of[name], rows[name] = step, dict(batch_size=batch_size, peak_bytes=peak, first_step_s=first)

    def ours():  # as train.py runs its default dtype=bfloat16, bf16=stochastic
        with device:
            model = set_param_dtypes(LLaMA(cfg), "bfloat16", "stochastic")
        fwd = torch.compile(model, fullgraph=True) if compile else model
        return loss_of(fwd), SCALE(scale_param_groups(model), lr=1e-3, compile=compile, bf16_rounding="stochastic")

    def hf():
        with device:
            model = build_hf(cfg)
        model.to(torch.bfloat16)
        return hf_loss_of(model, cfg.vocab_size), torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    start(OURS, ours)
    if peer:
        try:
            start(HF, hf)
        except ImportError:
            notes.append("transformers is not installed (pip install transformers): no HF peer")
    times = time_in_turn(steps_of, warmup, steps, sync)
    peak_flops_s = peak_flops(torch.cuda.get_device_name(device)) if cuda else None
    with torch.device("meta"):
        flops_per_token = LLaMA(cfg).flops_per_token(cfg.max_seq_len)
    for name, t in times.items():
        tokens_per_s = batch_size * cfg.max_seq_len / t
        rows[name].update(tokens_per_s=tokens_per_s,
                          mfu=flops_per_token * tokens_per_s / peak_flops_s if peak_flops_s else None)
    return rows, notes


MODEL_TABLE_HEAD = ["| model | run | batch x seq_len | tokens/s | MFU | peak memory | first step (compile) | vs HF |",
                    "|---|---|---|---|---|---|---|---|"]


def model_table_rows(name, rows, seq_len):
    """measure_training's rows of one model -> markdown lines under MODEL_TABLE_HEAD."""
    hf = rows.get(HF)
    lines = []
    for run, r in rows.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r["peak_bytes"] is not None else "n/a"
        vs = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "n/a"
        lines.append(f"| {name} | {run} | {r['batch_size']} x {seq_len} | {r['tokens_per_s']:,.0f} | {mfu} | {peak} | "
                     f"{r['first_step_s']:.1f} s | {vs} |")
    return lines


def bench_model_cuda(args):
    name = torch.cuda.get_device_name()
    print(f"{name}, bf16 params, torch.compile'd model and SCALE step, median of {args.steps} steps in turn after "
          f"{args.warmup} (and 3 of each alone); peak {peak_flops(name) or 'unknown'} FLOP/s for MFU")
    print("\n".join(MODEL_TABLE_HEAD), flush=True)
    for label, batch, peer in GPU_RUNS:
        cfg = paper_model(label)
        rows, notes = measure_training(cfg, batch, "cuda", peer, warmup=args.warmup, steps=args.steps)
        print("\n".join(model_table_rows(label, rows, cfg.max_seq_len) + notes), flush=True)
        del rows
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# data: preparation throughput and loader latency

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


def loader_latency(data_dir, batch_size, seq_len, n=200):
    batches = TrainBatches(data_dir, seq_len, batch_size, batch_size)
    batches.get(0, 0)  # builds the epoch permutation once
    times = []
    for step in range(1, n + 1):
        t0 = time.perf_counter()
        batches.get(step, 0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times)


def bench_data(args):
    tokenizer = pick_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "c4")
        make_c4_source(pathlib.Path(src), n_train=(args.docs,), n_val=args.docs // 10)
        files = [os.path.join(src, f) for fs in prepare_c4.c4_files(1, 1).values() for f in fs]
        print(f"tokenizer {tokenizer}, {args.docs} + {args.docs // 10} generated documents, {os.cpu_count()} cores")
        t0 = time.perf_counter()
        n_tokens = plain_loop(files, tokenizer)
        t_plain = time.perf_counter() - t0
        print(f"plain encode_ordinary loop  : {n_tokens:>10,} tokens {t_plain:6.2f} s "
              f"{n_tokens / t_plain:>12,.0f} tokens/s")
        for w in args.workers:
            out = os.path.join(tmp, f"out{w}")
            t0 = time.perf_counter()
            meta = prepare_c4.main(["--out_dir", out, "--data_dir", src, "--tokenizer", tokenizer, "--workers", str(w)])
            t = time.perf_counter() - t0
            n = sum(s["tokens"] for s in meta["splits"].values())
            assert n == n_tokens, (n, n_tokens)
            print(f"prepare_c4.py --workers {w:<3}: {n:>10,} tokens {t:6.2f} s {n / t:>12,.0f} tokens/s "
                  f"= {t_plain / t:.2f}x the plain loop")
        med, worst = loader_latency(out, batch_size=8, seq_len=1024)
        print(f"loader batch B=8 T=1024: median {med * 1e6:.0f} us, max {worst * 1e6:.0f} us (200 batches)")


# -----------------------------------------------------------------------------
# fsdp: train.py on one GPU without and with FSDP (a process group of one, NCCL): what FSDP's code path costs

def random_token_data(data_dir, vocab_size, n_tokens, seed=0):
    """A data_dir of uniformly random tokens (train and val splits), for speed and memory measurements only."""
    os.makedirs(data_dir)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_tokens), ("val", n_tokens // 10)):
        tokens = rng.integers(0, vocab_size, n).astype(token_dtype(vocab_size))
        write_shard(os.path.join(data_dir, f"{split}_000000.bin"), tokens)
        splits[split] = dict(documents=1, shards=[f"{split}_000000.bin"], tokens=n)
    write_meta(data_dir, dict(dtype=str(token_dtype(vocab_size)), eot_id=vocab_size - 1, splits=splits,
                              tokenizer="random tokens", vocab_size=vocab_size))


def bench_fsdp(args, train_args):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        random_token_data(data, 32000, 4_000_000)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no peak memory)"
        print(f"{args.config} on {device}, vocab 32000 (random tokens), {args.steps} steps, "
              f"{' '.join(train_args)}; the first log interval (compilation) aside")
        rows = {}
        for fsdp in (False, True, False, True):  # in turn, twice: drift hits both alike
            out = os.path.join(tmp, f"run{len(rows)}")
            cmd = [sys.executable, os.path.join(here, "train.py"), args.config, f"--fsdp={fsdp}", f"--data_dir={data}",
                   f"--out_dir={out}", f"--max_steps={args.steps}", f"--log_every={args.log_every}",
                   "--eval_every=1000000000", "--ckpt_every=1000000000", "--eval_tokens=65536",
                   *train_args]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
            train = [r for r in records if r["event"] == "train"][1:]
            (memory,) = [r for r in records if r["event"] == "memory"]
            rows.setdefault(fsdp, []).append(dict(tokens_per_s=statistics.median(r["tokens_per_s"] for r in train),
                                                  peak=max(r["peak_mem_bytes"] or 0 for r in train), **memory))
            shutil.rmtree(out)
        base = statistics.median(r["tokens_per_s"] for r in rows[False])
        for fsdp, runs in rows.items():
            tps = statistics.median(r["tokens_per_s"] for r in runs)
            m = runs[-1]
            peak = max(r["peak"] for r in runs)
            print(f"{'FSDP (1 rank)' if fsdp else 'no FSDP      '}: {tps:>10,.0f} tokens/s "
                  f"({tps / base:.2f}x), peak mem "
                  f"{f'{peak / 2**30:.2f} GiB' if peak else 'n/a'}; held: params {m['rank_param_bytes'] / 2**30:.2f}, "
                  f"grads {m['rank_grad_bytes'] / 2**30:.2f}, optimizer state {m['rank_state_bytes'] / 2**30:.2f} GiB")


def main(argv=None):
    p = argparse.ArgumentParser("python -m tools.bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("optimizer", help="SCALE step time and state bytes vs fused AdamW")
    o.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    o.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    o.add_argument("--warmup", type=int, default=3)
    o.add_argument("--steps", type=int, default=20)
    m = sub.add_parser("model", help="training tokens/s vs LlamaForCausalLM (CPU) or MFU (--cuda)")
    m.add_argument("--cuda", action="store_true")
    m.add_argument("--batch_size", type=int, default=8)
    m.add_argument("--seq_len", type=int, default=256)
    m.add_argument("--warmup", type=int, default=3)
    m.add_argument("--steps", type=int, default=8)
    d = sub.add_parser("data", help="prepare_c4.py tokens/s and loader latency")
    d.add_argument("--docs", type=int, default=40000, help="documents in the generated train file")
    d.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    d.add_argument("--tokenizer", default="auto")
    f = sub.add_parser("fsdp", help="train.py on 1 GPU without and with FSDP: tokens/s and peak memory; other "
                                    "--key=value arguments go to train.py")
    f.add_argument("--config", default="configs/llama_350m.py")
    f.add_argument("--steps", type=int, default=30)
    f.add_argument("--log_every", type=int, default=5)
    args, train_args = p.parse_known_args(argv)
    if train_args and args.what != "fsdp":
        p.error(f"unrecognized arguments: {' '.join(train_args)}")
    if args.what == "fsdp":
        bench_fsdp(args, train_args)
    elif args.what == "optimizer":
        bench_optimizer(args)
    elif args.what == "model" and args.cuda and not torch.cuda.is_available():
        sys.exit("error: --cuda needs a CUDA GPU and none is available")
    elif args.what == "model":
        bench_model_cuda(args) if args.cuda else bench_model_cpu(args)
    else:
        bench_data(args)


if __name__ == "__main__":
    sys.exit(main())
