"""
Pretrain LLaMA on C4 with SCALE, AdamW, Muon or SGD. The same file runs one CPU process or many GPUs:

    python train.py configs/tiny.py
    python train.py configs/llama_60m.py --optimizer=adamw --lr=1e-3
    torchrun --standalone --nproc_per_node=8 train.py configs/llama_1b.py

The config is DEFAULTS below (the paper's shared recipe), then each config file, then each --key=value.
Checkpoints go to out_dir/ckpt.pt. resume=True continues from there, or starts from scratch if there is
none yet (so one command can be re-run after any crash). The batches are a function of (seed, step), so a
resumed run sees the data an uninterrupted one would; on CPU in float32 it ends bit for bit the same.
"""
import ast
import difflib
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import TrainBatches, val_batches, write_atomic
from model import LLaMA, LLaMAConfig, peak_flops
from prepare_c4 import prepare_once
from scale import SCALE, scale_param_groups, state_bytes

# -----------------------------------------------------------------------------
# default config: the recipe the SCALE paper shares across model sizes (shape and schedule: LLaMA-60M)
DEFAULTS = dict(
    # model; the vocabulary size comes from data_dir/meta.json
    dim=512, n_layers=8, n_heads=8, ffn_dim=1376,
    # optimizer
    optimizer="scale",        # scale | adamw | muon | sgd
    lr=1e-3,                  # peak learning rate (for Muon: of both its parts)
    adam_lr=0.0,              # SCALE's AdamW lr for 1-D params; 0 = lr
    momentum=0.9,             # SCALE's and SGD's momentum (Muon keeps its own 0.95)
    momentum_roles="output",  # SCALE ablation: the roles with momentum, e.g. "output,matrix,embedding"
    weight_decay=0.0,
    grad_clip=0.0,            # max global gradient norm; 0 = off
    # schedule: linear warmup, then cosine decay to min_lr_ratio * lr at max_steps
    max_steps=11000, warmup_steps=1100, min_lr_ratio=0.1,
    # batch: total_batch_size sequences per optimizer step over all ranks, batch_size per rank per micro-step
    seq_len=256, total_batch_size=512, batch_size=64,
    # evaluation, logging, checkpoints
    eval_every=1000, eval_tokens=10_000_000, log_every=10, ckpt_every=1000,
    data_dir="data/c4", out_dir="out", wandb_project="",  # empty wandb_project: no wandb
    data_source="",  # json files to prepare data_dir from (byte tokenizer) if it has no meta.json; "" = none
    # system
    dtype="bfloat16",  # float32 | bfloat16 (params and optimizer state) | mixed (bf16 autocast, fp32 params)
    compile=True, seed=0, resume=False,
)
CHOICES = {"optimizer": ("scale", "adamw", "muon", "sgd"), "dtype": ("float32", "bfloat16", "mixed")}
POSITIVE = ("max_steps", "seq_len", "total_batch_size", "batch_size", "eval_every", "eval_tokens", "log_every",
            "ckpt_every")
SHAPE = ("dim", "n_layers", "n_heads", "ffn_dim")


def did_you_mean(word, options):
    close = difflib.get_close_matches(word, options)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def load_config(argv):
    """DEFAULTS, updated by each config file in argv and each --key=value, in order -> namespace."""
    cfg = dict(DEFAULTS)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ValueError(f"options are written --key=value, got {arg!r}")
            set_key(cfg, key, parse_value(key, text), arg)
        else:
            for key, value in read_config_file(arg).items():
                set_key(cfg, key, value, arg)
    for key in POSITIVE:
        if cfg[key] <= 0:
            raise ValueError(f"{key} must be positive, got {cfg[key]}")
    return SimpleNamespace(**cfg)


def read_config_file(path):
    ns = {}
    try:
        with open(path) as f:
            exec(f.read(), ns)
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
    except Exception as e:  # a config file is Python: any error in it is a bad config
        raise ValueError(f"config file {path} fails: {type(e).__name__}: {e}") from None
    return {k: v for k, v in ns.items() if not k.startswith("_")}


def parse_value(key, text):
    """A command-line value: as given for string keys, else a Python literal (1e-3, 512, True)."""
    if isinstance(DEFAULTS.get(key), str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # set_key reports the wrong type


def set_key(cfg, key, value, source):
    if key not in DEFAULTS:
        raise ValueError(f"unknown config key {key!r} in {source}{did_you_mean(key, DEFAULTS)}")
    want = type(DEFAULTS[key])
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        raise ValueError(f"{key} must be of type {want.__name__}, got {value!r} in {source}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ValueError(f"{key} must be one of {', '.join(CHOICES[key])}, got {value!r} in {source}"
                         f"{did_you_mean(value, CHOICES[key])}")
    cfg[key] = value


# -----------------------------------------------------------------------------
# optimizers and schedule

def make_optimizers(model, cfg):
    """The run's torch optimizers; each group keeps its peak lr in group["initial_lr"] for the schedule."""
    if cfg.optimizer == "scale":
        roles = tuple(role for role in cfg.momentum_roles.split(",") if role)
        optimizers = [SCALE(scale_param_groups(model), lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay, adam_lr=cfg.adam_lr or None, momentum_roles=roles,
                            compile=cfg.compile)]
    elif cfg.optimizer == "adamw":
        optimizers = [adamw(model.parameters(), cfg)]
    elif cfg.optimizer == "muon":
        # Muon on the blocks' hidden matrices, AdamW on the rest; match_rms_adamw scales Muon's update to
        # AdamW's RMS, so one lr serves both
        hidden = [p for p in model.layers.parameters() if p.ndim == 2]
        hidden_ids = {id(p) for p in hidden}
        rest = [p for p in model.parameters() if id(p) not in hidden_ids]
        optimizers = [torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                       adjust_lr_fn="match_rms_adamw"), adamw(rest, cfg)]
    else:
        optimizers = [torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                      weight_decay=cfg.weight_decay)]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def adamw(params, cfg):
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, fused=True)


def lr_factor(step, warmup_steps, max_steps, min_lr_ratio):
    """The lr of optimizer step `step` (0-based) over the peak lr: linear warmup (step+1)/warmup_steps as in
    nanoGPT (no step is wasted at lr 0), peak 1 at step warmup_steps, cosine down to min_lr_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# checkpoints: plain tensors and python values only, so they load with weights_only=True

def rng_states():
    name, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": [name, keys.tolist(), *rest], "python": random.getstate()}


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(states["python"])


def save_checkpoint(path, model, optimizers, step, cfg, vocab_size):
    ckpt = dict(model=model.state_dict(), optimizers=[opt.state_dict() for opt in optimizers], step=step,
                config=vars(cfg), vocab_size=vocab_size, rng=rng_states())
    write_atomic(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, model, optimizers, cfg, vocab_size):
    """Restore model, optimizers and RNGs from path -> the step to continue from."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for key in SHAPE + ("optimizer",):
        if ckpt["config"][key] != getattr(cfg, key):
            raise ValueError(f"{path} was saved with {key}={ckpt['config'][key]!r}, the config says "
                             f"{getattr(cfg, key)!r}; resume with the same {key} or set resume=False")
    if ckpt["vocab_size"] != vocab_size:
        raise ValueError(f"{path} has a vocabulary of {ckpt['vocab_size']} but {cfg.data_dir} has {vocab_size}; "
                         "resume on the data it was trained on or set resume=False")
    model.load_state_dict(ckpt["model"])
    for opt, state in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(state)
    set_rng_states(ckpt["rng"])
    return ckpt["step"]


# -----------------------------------------------------------------------------
# training

class Log:
    """Rank 0's console lines, out_dir/log.jsonl records and, if wandb_project is set, wandb; silent elsewhere.
    A resumed run first drops the records written after its checkpoint, so the log reads as one run."""

    def __init__(self, cfg, master, resumed_step):
        self.master, self.path, self.wandb = master, os.path.join(cfg.out_dir, "log.jsonl"), None
        if not master:
            return
        keep = []
        if resumed_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                # a line without its newline is one a kill cut short
                keep = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= resumed_step]
        write_atomic(self.path, lambda f: f.write("".join(keep).encode()))
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                print("wandb_project is set but wandb is not installed (pip install wandb): logging to log.jsonl only")
            else:
                self.wandb = wandb.init(project=cfg.wandb_project, name=os.path.basename(cfg.out_dir), config=vars(cfg))

    def __call__(self, text, **record):
        if not self.master:
            return
        print(text, flush=True)
        if record:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb and record.get("event") in ("train", "eval"):
            event = record["event"]
            self.wandb.log({f"{event}/{k}": v for k, v in record.items() if k != "event"}, step=record["step"])


def init_distributed():
    """-> (rank, local_rank, world_size); a process group only when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()


def train_step(model, batches, step, device, autocast, distributed):
    """Forward and backward over grad_accum micro-batches -> the step's mean loss over all ranks (a tensor)."""
    loss_sum = torch.zeros((), device=device)
    for micro in range(batches.grad_accum):
        x, y = (t.to(device) for t in batches.get(step, micro))
        # DDP all-reduces gradients during backward: only the last micro-step needs to
        with model.no_sync() if distributed and micro < batches.grad_accum - 1 else nullcontext():
            with autocast:
                _, loss = model(x, y)
            (loss / batches.grad_accum).backward()
        loss_sum += loss.detach()
    if distributed:
        dist.all_reduce(loss_sum)
    return loss_sum / (batches.grad_accum * batches.world_size)


@torch.no_grad()
def evaluate(model, cfg, rank, world_size, device, autocast):
    """-> mean per-token loss over the first eval_tokens val tokens (split over ranks; the same for any world
    size) and perplexity."""
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of token losses, tokens
    for x, y in val_batches(cfg.data_dir, cfg.seq_len, cfg.batch_size, cfg.eval_tokens, rank, world_size):
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    if world_size > 1:
        dist.all_reduce(total)
    loss = total[0] / total[1]
    return loss.item(), loss.exp().item()


def diverged(what, step, saved, ckpt_path):
    kept = "no checkpoint was written" if saved is None else f"{ckpt_path} (step {saved}) is the last good checkpoint"
    return FloatingPointError(f"{what} at step {step}: training diverged, stopped; {kept}. Lower lr or set grad_clip")


def train(cfg):
    rank, local_rank, world_size = init_distributed()
    master = rank == 0
    if master:
        print("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in vars(cfg).items()), flush=True)
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "mixed" else nullcontext()
    if cfg.data_source:  # prepared on first use; safe for all ranks (or runs) at once
        prepare_once(cfg.data_dir, cfg.data_source)
    batches = TrainBatches(cfg.data_dir, cfg.seq_len, cfg.batch_size, cfg.total_batch_size, rank, world_size, cfg.seed)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    with device:
        model = LLaMA(LLaMAConfig(**{k: getattr(cfg, k) for k in SHAPE}, vocab_size=batches.vocab_size,
                                  max_seq_len=cfg.seq_len))
    if cfg.dtype == "bfloat16":
        model.to(torch.bfloat16)
    optimizers = make_optimizers(model, cfg)

    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    os.makedirs(cfg.out_dir, exist_ok=True)
    resumed = cfg.resume and os.path.exists(ckpt_path)
    start_step = load_checkpoint(ckpt_path, model, optimizers, cfg, batches.vocab_size) if resumed else 0
    log = Log(cfg, master, start_step if resumed else None)
    if cfg.resume:
        log(f"resuming from {ckpt_path} at step {start_step}" if resumed else
            f"resume=True but there is no {ckpt_path} yet: starting from scratch")
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    log(f"{model.num_params():,} parameters ({param_bytes / 2**20:,.1f} MiB), vocab {batches.vocab_size}, {device}; "
        f"total_batch_size {cfg.total_batch_size} = grad_accum {batches.grad_accum} x batch_size {cfg.batch_size} "
        f"x world_size {world_size}")

    train_model = torch.compile(model) if cfg.compile else model
    if world_size > 1:
        train_model = DDP(train_model, device_ids=[local_rank] if device.type == "cuda" else None)
    tokens_per_step = cfg.total_batch_size * cfg.seq_len
    flops_per_token = model.flops_per_token(cfg.seq_len)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    step, saved = start_step, start_step if resumed else None
    while True:
        done = step >= cfg.max_steps
        if step > start_step or step == 0:  # a resumed run's first step was evaluated and saved before
            if step % cfg.eval_every == 0 or done:
                # the eager model: no recompiles for no_grad or the shorter last batch
                val_loss, val_ppl = evaluate(model, cfg, rank, world_size, device, autocast)
                log(f"step {step} | val loss {val_loss:.4f} | val ppl {val_ppl:.2f}", event="eval", step=step,
                    tokens=step * tokens_per_step, val_loss=val_loss, val_ppl=val_ppl)
            if step > 0 and (step % cfg.ckpt_every == 0 or done):
                if not all(torch.isfinite(p).all() for p in model.parameters()):  # a finite loss, inf gradients
                    raise diverged("the weights are not finite", step, saved, ckpt_path)
                if master:
                    save_checkpoint(ckpt_path, model, optimizers, step, cfg, batches.vocab_size)
                saved = step
        if done:
            break

        t0 = time.time()
        lr_mult = lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_mult
        loss = train_step(train_model, batches, step, device, autocast, world_size > 1)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss = loss.item()  # waits for the step to finish
        dt = time.time() - t0
        step += 1
        if not math.isfinite(loss):  # every rank sees the same all-reduced loss, so all stop here
            raise diverged(f"loss is {loss}", step, saved, ckpt_path)

        if step == start_step + 1:  # the optimizer state exists now
            opt_bytes = state_bytes(optimizers)
            log(f"optimizer state: {opt_bytes:,} bytes (AdamW's: {2 * param_bytes:,})", event="start",
                step=start_step, config=vars(cfg), params=model.num_params(), opt_state_bytes=opt_bytes,
                adamw_state_bytes=2 * param_bytes, world_size=world_size)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            tokens_per_s = tokens_per_step / dt
            mfu = flops_per_token * tokens_per_s / (peak * world_size) if peak else None
            peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            text = f"step {step} | loss {loss:.4f} | lr {cfg.lr * lr_mult:.2e} | {tokens_per_s:,.0f} tok/s"
            text += f" | mfu {mfu:.1%}" if mfu else ""
            text += f" | peak mem {peak_mem / 2**30:.2f} GiB" if peak_mem else ""
            log(text, event="train", step=step, tokens=step * tokens_per_step, loss=loss, lr=cfg.lr * lr_mult,
                tokens_per_s=tokens_per_s, mfu=mfu, peak_mem_bytes=peak_mem)


def main(argv):
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\nkeys and defaults:\n" + "\n".join(f"  --{k}={v!r}" for k, v in DEFAULTS.items()))
        return
    try:
        train(load_config(argv))
    except (ValueError, FloatingPointError) as e:  # bad input (DataError is a ValueError) or divergence
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
