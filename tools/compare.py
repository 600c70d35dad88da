"""
Compare optimizers on one config, and print the paper's memory table.

    python -m tools.compare configs/tiny.py --optimizers scale,adamw,muon --lr adamw=3e-3 -- --max_steps=200
    python -m tools.compare configs/tiny.py --optimizers scale,adamw --seeds 0,1,2
    python -m tools.compare --memory
    python -m tools.compare --memory --gpus 8 --dtype mixed

Each optimizer runs `train.py` as its own process, in sequence, into out_dir/<optimizer> (with --seeds, one
run per seed into out_dir/<optimizer>/seed<s>); then a markdown table (results.md) and, if matplotlib is
installed, two plots are written to out_dir: val loss against tokens, and perplexity against model +
optimizer memory (the paper's Figure 1). Arguments after `--` go to every train.py run unchanged (use
--launcher for torchrun). Every run's config and data are checked before the first one starts.
"""
import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys

import torch

import train
from config import KEYS, load_config
from data import write_atomic
from model import LLaMA, LLaMAConfig
from scale import scale_param_groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIGS = ("llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b")  # configs/<name>.py


def paper_config(name):
    """The run config of configs/<name>.py, e.g. "llama_60m" (a namespace)."""
    return load_config([os.path.join(ROOT, "configs", f"{name}.py")])


# -----------------------------------------------------------------------------
# memory: the paper's estimate, 2 bytes x (parameters + optimizer-state elements), decimal GB; and per GPU of a
# run on several, DDP against FSDP

def state_numel(model, optimizer):
    """Optimizer-state elements of each optimizer as train.py runs it (scalar step counters aside)."""
    numel = {"matrix": 0, "embedding": 0, "output": 0, "vector": 0}
    for group in scale_param_groups(model):
        numel[group["role"]] += sum(p.numel() for p in group["params"])
    total = sum(numel.values())
    if optimizer == "scale":  # momentum on the output layer, AdamW moments on 1-D params
        return numel["output"] + 2 * numel["vector"]
    if optimizer == "adamw":
        return 2 * total
    if optimizer == "muon":  # momentum on hidden matrices, AdamW on embedding, output and 1-D params
        return numel["matrix"] + 2 * (total - numel["matrix"])
    if optimizer == "sgd":  # one momentum buffer per parameter
        return total
    raise ValueError(f"unknown optimizer {optimizer!r}: use scale, adamw, muon or sgd")


def meta_model(cfg, vocab_size):
    """The model of a run config (a namespace from config.load_config), on the meta device."""
    with torch.device("meta"):
        return LLaMA(LLaMAConfig.from_config(vars(cfg), vocab_size))


def memory_gb(cfg, optimizer, vocab_size=32000, bytes_per_element=2, grads=False, shards=1):
    """Decimal GB of a run config's params and optimizer state (state_numel), and with grads=True its gradients,
    at bytes_per_element each, over `shards` (FSDP on N GPUs holds 1/N on each; DDP and one GPU hold all: 1).
    The defaults are the paper's estimate: 2 bytes x (params + state), no gradients."""
    model = meta_model(cfg, vocab_size)
    n = model.num_params()
    return bytes_per_element * (n + state_numel(model, optimizer) + (n if grads else 0)) / shards / 1e9


# The paper's figures (GB). With a 32000 vocab (its models') we match all but AdamW at 130M and 1B, which come
# out 0.01 lower (0.805, 8.034); with 32100 (its T5 tokenizer's length) all nine match.
PAPER_GB = {"scale": dict(llama_60m=0.15, llama_130m=0.32, llama_350m=0.80, llama_1b=2.81, llama_7b=13.74),
            "adamw": dict(llama_60m=0.35, llama_130m=0.81, llama_350m=2.21, llama_1b=8.04)}


def memory_table(vocab_size=32000, optimizers=("scale", "adamw", "muon", "sgd")):
    rows = ["| model | params | " + " | ".join(optimizers) + " |", "|---" * (len(optimizers) + 2) + "|"]
    for name in PAPER_CONFIGS:
        cfg = paper_config(name)
        n = meta_model(cfg, vocab_size).num_params()
        cells = []
        for o in optimizers:
            paper = PAPER_GB.get(o, {}).get(name)
            ours = f"{memory_gb(cfg, o, vocab_size):.2f}"
            cells.append(f"{ours} GB" + (f" (paper: {paper:.2f})" if paper and f"{paper:.2f}" != ours else ""))
        rows.append(f"| {name} | {n / 1e6:,.1f}M | {' | '.join(cells)} |")
    return "\n".join(rows)


BYTES_PER_ELEMENT = {"bfloat16": 2, "mixed": 4, "float32": 4}  # params, grads and state, by train.py's dtype


def memory_per_gpu_table(gpus, dtype, vocab_size=32000, optimizers=("scale", "adamw")):
    """Per-GPU GB of params + grads + optimizer state of each paper size on `gpus` GPUs, DDP (all on each) against
    FSDP (1/gpus on each), from memory_gb. Activations, FSDP's all-gathered copy of the block in use and the
    unsharded gradients FSDP holds between micro-steps (grad_accum > 1) are not counted."""
    heads = [f"{o} {kind}" for o in optimizers for kind in ("DDP", "FSDP")]
    rows = [f"| model ({dtype}, {gpus} GPUs) | params | " + " | ".join(heads) + " |", "|---" * (len(heads) + 2) + "|"]
    for name in PAPER_CONFIGS:
        cfg = paper_config(name)
        gb = [memory_gb(cfg, o, vocab_size, BYTES_PER_ELEMENT[dtype], grads=True, shards=shards)
              for o in optimizers for shards in (1, gpus)]
        rows.append(f"| {name} | {meta_model(cfg, vocab_size).num_params() / 1e6:,.1f}M | "
                    + " | ".join(f"{x:.2f} GB" for x in gb) + " |")
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# runs

def run_args(args, optimizer, lr, seed):
    """The train.py arguments of one run: the config, the optimizer, its out_dir, lr and seed, then `--` args."""
    out_dir = os.path.join(args.out_dir, optimizer, *([f"seed{seed}"] if args.seeds else []))
    return ([args.config, f"--optimizer={optimizer}", f"--out_dir={out_dir}"] + ([f"--lr={lr}"] if lr else [])
            + ([f"--seed={seed}"] if args.seeds else []) + args.train_args), out_dir


def check_runs(args, lrs):
    """Every run's config and data, checked before the first one starts (as train.py would, on one process)."""
    if set(lrs) - set(args.optimizers):
        raise ValueError(f"--lr names {', '.join(sorted(set(lrs) - set(args.optimizers)))}, which --optimizers "
                         f"does not run; give an lr for one of {', '.join(args.optimizers)}")
    for optimizer in args.optimizers:
        for seed in args.seeds or [None]:
            cfg = load_config(run_args(args, optimizer, lrs.get(optimizer), seed)[0])
            train.check_inputs(cfg)
            if not (cfg.resume or cfg.overwrite) and os.path.exists(os.path.join(cfg.out_dir, "log.jsonl")):
                raise ValueError(f"{cfg.out_dir} holds a run already; pass -- --resume=True to continue the runs, or "
                                 "-- --overwrite=True to start them over")


def claim_out_dir(path, tool):
    """Make the directory path this tool's output (path/.written_by names it) before anything is written there;
    a file, or a directory holding files another tool or the user wrote, is refused in one line."""
    mark = os.path.join(path, ".written_by")
    owner = open(mark).read() if os.path.isfile(mark) else None
    if os.path.lexists(path) and not (os.path.isdir(path) and (owner == tool or not os.listdir(path))):
        what = ("is not a directory" if not os.path.isdir(path) else f"holds {owner}'s output" if owner
                else f"holds files {tool} did not write")
        raise ValueError(f"--out_dir {path} {what}; give a new or empty directory")
    try:
        os.makedirs(path, exist_ok=True)
        write_atomic(mark, lambda f: f.write(tool.encode()))
    except OSError as e:
        raise ValueError(f"--out_dir {path}: {e.strerror}; give a new or empty directory") from None


def run_one(args, optimizer, lr, seed):
    argv, out_dir = run_args(args, optimizer, lr, seed)
    cmd = shlex.split(args.launcher) + [os.path.join(ROOT, "train.py"), *argv]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)  # from the caller's directory, like running train.py by hand
    return read_log(os.path.join(out_dir, "log.jsonl"))


def read_log(path):
    records = [json.loads(line) for line in open(path)]
    return {event: [r for r in records if r["event"] == event] for event in ("start", "train", "eval")}


def summarize(optimizer, logs):
    """One optimizer's runs (one log per seed) -> its table row. tokens/s is the median over the runs' log
    intervals (each the tokens between two log lines over the training time between them), the first interval
    of each run (compilation, warmup) aside when it has more."""
    finals = [log["eval"][-1]["val_loss"] for log in logs]
    speeds = sorted(r["tokens_per_s"] for log in logs for r in log["train"][1:] or log["train"])
    peaks = [r["peak_mem_bytes"] for log in logs for r in log["train"] if r["peak_mem_bytes"] is not None]
    start, state_bytes = logs[0]["start"][-1], logs[0]["train"][-1]["opt_state_bytes"]
    mean = statistics.mean(finals)
    return dict(optimizer=optimizer, lr=start["config"]["lr"], val_loss=mean, val_ppl=math.exp(mean), val_losses=finals,
                val_loss_std=statistics.stdev(finals) if len(finals) > 1 else None,
                tokens_per_s=statistics.median(speeds), state_bytes=state_bytes,
                memory_bytes=start["param_bytes"] + state_bytes, peak_mem_bytes=max(peaks) if peaks else None)


def markdown(rows):
    seeds = len(rows[0]["val_losses"])
    loss_head = f"val loss (mean ± std, {seeds} seeds)" if seeds > 1 else "val loss"
    lines = [f"| optimizer | lr | {loss_head} | val ppl | tokens/s | optimizer state | params + state | peak memory |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_mem_bytes'] / 2**20:,.0f} MiB" if r["peak_mem_bytes"] else "n/a"
        loss = f"{r['val_loss']:.4f}" + (f" ± {r['val_loss_std']:.4f}" if r["val_loss_std"] is not None else "")
        lines.append(f"| {r['optimizer']} | {r['lr']:g} | {loss} | {r['val_ppl']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['state_bytes'] / 2**20:,.2f} MiB | "
                     f"{r['memory_bytes'] / 2**20:,.2f} MiB | {peak} |")
    return "\n".join(lines)


def seed_noise(rows):
    """Lines comparing the best optimizer (lowest mean val loss) with each other one: the difference of the mean
    final val losses, and whether it is within seed noise, i.e. under 2 standard errors of that difference
    (sqrt(s_a^2/n_a + s_b^2/n_b), from the seeds' sample standard deviations)."""
    if len(rows[0]["val_losses"]) < 2:
        return ["One seed per optimizer: run with --seeds 0,1,2 to tell a difference from seed noise."]
    best, *others = sorted(rows, key=lambda r: r["val_loss"])
    lines = []
    for r in others:
        diff = r["val_loss"] - best["val_loss"]
        se = math.sqrt(sum(x["val_loss_std"] ** 2 / len(x["val_losses"]) for x in (best, r)))
        verdict = "within seed noise" if diff < 2 * se else "beyond seed noise"
        lines.append(f"{best['optimizer']} is {diff:.4f} below {r['optimizer']} in val loss, {verdict} "
                     f"(2 standard errors: {2 * se:.4f})")
    return lines


def plot(logs, rows, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install matplotlib)")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for optimizer, runs in logs.items():  # the mean over seeds, and a band of one standard deviation
        tokens = [r["tokens"] for r in runs[0]["eval"]]
        losses = list(zip(*([r["val_loss"] for r in log["eval"]] for log in runs)))
        mean = [statistics.mean(ls) for ls in losses]
        ax1.plot(tokens, mean, marker=".", label=optimizer)
        if len(runs) > 1:
            std = [statistics.stdev(ls) for ls in losses]
            ax1.fill_between(tokens, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25)
    ax1.set(xlabel="tokens", ylabel="val loss", title="validation loss")
    for r in rows:
        ax2.scatter(r["memory_bytes"] / 2**20, r["val_ppl"], s=60)
        ax2.annotate(r["optimizer"], (r["memory_bytes"] / 2**20, r["val_ppl"]), textcoords="offset points",
                     xytext=(6, 4))
    ax2.set(xlabel="parameters + optimizer state (MiB)", ylabel="val perplexity", title="perplexity vs memory")
    ax1.legend()
    fig.tight_layout()
    write_atomic(os.path.join(out_dir, "compare.png"), lambda f: fig.savefig(f, format="png", dpi=110))
    print(f"wrote {os.path.join(out_dir, 'compare.png')}")


def parse_lrs(pairs):
    """["adamw=3e-3", ...] -> {"adamw": 0.003, ...}; train.py checks each value's range."""
    lrs = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            lrs[name] = float(value)
        except ValueError:
            raise ValueError(f"--lr takes optimizer=value, e.g. adamw=3e-3, got {pair!r}") from None
    return lrs


def parse_list(text, what, convert=str):
    try:
        items = [convert(item) for item in text.split(",")]
    except ValueError:
        items = []
    if not items or len(set(items)) < len(items):
        raise ValueError(f"{what} takes a comma-separated list without repeats, got {text!r}")
    return items


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser("python -m tools.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="a config file, e.g. configs/tiny.py")
    p.add_argument("--optimizers", default="scale,adamw,muon")
    p.add_argument("--lr", nargs="*", default=[], help="per-optimizer lr, e.g. adamw=3e-3 muon=0.02")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2: each optimizer runs once per seed "
                                   "(default: once, with the config's seed)")
    p.add_argument("--out_dir", default="out/compare")
    p.add_argument("--launcher", default=sys.executable, help='e.g. "torchrun --standalone --nproc_per_node=8"')
    p.add_argument("--memory", action="store_true", help="print the paper's memory table and exit")
    p.add_argument("--vocab_size", type=int, default=32000, help="vocabulary for --memory")
    p.add_argument("--gpus", type=int, help="with --memory: per-GPU params + grads + state on this many GPUs, "
                                            "DDP against FSDP")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(BYTES_PER_ELEMENT), help="train.py's dtype, for --gpus")
    args = p.parse_args(argv)
    args.train_args = train_args
    if args.memory:
        if args.gpus is not None and args.gpus < 1:
            raise ValueError(f"--gpus must be 1 or more, got {args.gpus}")
        print(memory_table(args.vocab_size) if args.gpus is None else memory_per_gpu_table(args.gpus, args.dtype,
                                                                                          args.vocab_size))
        return
    if not args.config:
        raise ValueError("give a config file (e.g. configs/tiny.py) or --memory")
    args.optimizers = parse_list(args.optimizers, "--optimizers")
    for optimizer in args.optimizers:
        if optimizer not in KEYS["optimizer"][1]:
            raise ValueError(f"unknown optimizer {optimizer!r} in --optimizers; use {', '.join(KEYS['optimizer'][1])}")
    args.seeds = parse_list(args.seeds, "--seeds", int) if args.seeds else None
    lrs = parse_lrs(args.lr)
    check_runs(args, lrs)
    claim_out_dir(args.out_dir, "tools.compare")
    logs = {o: [run_one(args, o, lrs.get(o), seed) for seed in args.seeds or [None]] for o in args.optimizers}
    rows = [summarize(o, logs[o]) for o in args.optimizers]
    report = markdown(rows) + "\n\n" + "\n".join(seed_noise(rows))
    write_atomic(os.path.join(args.out_dir, "results.md"), lambda f: f.write((report + "\n").encode()))
    print(report)
    plot(logs, rows, args.out_dir)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: a training run failed (exit {e.returncode}): {' '.join(e.cmd)}")
