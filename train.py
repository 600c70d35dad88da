"""
Pretrain LLaMA on C4 with SCALE, AdamW, Muon or SGD. The same file runs one CPU process or many GPUs:

    python train.py configs/tiny.py
    python train.py configs/llama_60m.py --optimizer=adamw --lr=1e-3
    torchrun --standalone --nproc_per_node=8 train.py configs/llama_1b.py
    torchrun --standalone --nproc_per_node=8 train.py configs/llama_7b.py --fsdp=True --dtype=mixed
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT train.py ... --fsdp=True

The config is config.py's DEFAULTS (the paper's shared recipe), then each config file, then each --key=value
(python train.py --help lists every key; python train.py CONFIG --help, the values CONFIG gives them).
Many processes run DDP (a full copy of the model on each), or with fsdp=True FSDP2 (params, grads and optimizer
state sharded over the ranks). Checkpoints go to out_dir/ckpt.pt, the same for any number of ranks, DDP or FSDP:
a run may resume on other hardware. resume=True continues from there, or starts from scratch if there is
none yet (so one command can be re-run after any crash). The batches are a function of (seed, step), so a
resumed run sees the data an uninterrupted one would; on CPU in float32 it ends bit for bit the same.
"""
import fcntl
import gc
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from config import DEFAULTS, help_text, load_config
from data import TrainBatches, val_batches, write_atomic
from model import SHAPE, LLaMA, LLaMAConfig, peak_flops
from prepare_c4 import bundled_source, prepare_once
from scale import SCALE, local_shards, scale_param_groups, state_bytes, state_tensors


# -----------------------------------------------------------------------------
# optimizers and schedule

def make_optimizers(model, cfg):
    """The run's torch optimizers; each group keeps its peak lr in group["initial_lr"] for the schedule."""
    if cfg.optimizer == "scale":
        roles = tuple(role for role in cfg.momentum_roles.split(",") if role)
        stochastic = cfg.dtype == "bfloat16" and cfg.bf16 == "stochastic"
        optimizers = [SCALE(scale_param_groups(model), lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay, adam_lr=cfg.adam_lr or None, momentum_roles=roles,
                            compile=cfg.compile, bf16_rounding="stochastic" if stochastic else "nearest",
                            seed=cfg.seed)]
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


def set_param_dtypes(model, dtype, bf16):
    """The params in a run's dtypes, in place: for dtype="bfloat16" the model in bf16 (its rotary tables too), then,
    unless bf16="paper", its 1-D params (the norm gains) back in fp32 (keep_vectors_fp32); float32 and mixed keep
    fp32. -> model."""
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
        if bf16 != "paper":
            keep_vectors_fp32(model)
    return model


def keep_vectors_fp32(model):
    """The 1-D params (norm gains, biases) in fp32, in place: about 0.01% of a LLaMA's params, whose updates
    (AdamW's, at lr 1e-3 or less) are below bf16's spacing at 1.0 (2^-7), so in bf16 they would never move. The
    optimizers then keep their state in fp32 too (zeros_like(p)); model.py casts the gains to the activations'
    dtype at use."""
    for p in model.parameters():
        if p.ndim < 2:
            p.data = p.data.float()


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
# checkpoints: plain tensors and python values only, so they load with weights_only=True. The weights and optimizer
# states are full (unsharded) state dicts, keyed by parameter name (torch.distributed.checkpoint.state_dict's format):
# the same file for 1 process, DDP and FSDP on any number of ranks. Under FSDP rank 0 gathers them in CPU memory.

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


CKPT, PREV_CKPT, LOG = "ckpt.pt", "ckpt_prev.pt", "log.jsonl"  # in out_dir
CKPT_KEYS = ("step", "config", "model", "optimizers", "rng")  # what every checkpoint holds (save_checkpoint)
# a resumed run keeps these from its checkpoint (a different value is an error); it takes every other key from
# its command line (lr, schedule, batch_size, eval, logging and checkpoint settings, compile, data_dir, ...)
KEPT_ON_RESUME = SHAPE + ("optimizer", "momentum_roles", "dtype", "bf16", "seq_len", "total_batch_size", "seed")


def save_checkpoint(out_dir, model, optimizers, step, cfg, batches, master):
    """Write out_dir/ckpt.pt: everything a resume, sample.py or an export needs (weights, optimizer states, step,
    config, the data's vocabulary and tokenizer, the RNG states). Every rank calls it (under FSDP the full state
    is gathered from all), rank 0 (master) writes. Atomic: the new file is complete before it replaces ckpt.pt, and
    the checkpoint it replaces is kept as ckpt_prev.pt (so at most two, plus one being written)."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # on rank 0's CPU, one tensor at a time
    weights = get_model_state_dict(model, options=full)
    # torch.distributed.checkpoint needs a state tensor to place the state on; an optimizer with none (SGD without
    # momentum) is saved as it is, keyed by param index
    states = [get_optimizer_state_dict(model, opt, options=full) if has_tensors(opt.state) else opt.state_dict()
              for opt in optimizers]
    if not master:
        return
    ckpt = dict(model=weights, optimizers=states, step=step, config=vars(cfg), vocab_size=batches.vocab_size,
                tokenizer=batches.meta["tokenizer"], eot_id=batches.meta["eot_id"], rng=rng_states())
    path = os.path.join(out_dir, CKPT)
    write_atomic(path, lambda f: torch.save(ckpt, f), previous=os.path.join(out_dir, PREV_CKPT))


def latest_checkpoint(out_dir):
    """out_dir/ckpt.pt, or ckpt_prev.pt if a save was cut off between its two renames, or None."""
    return next((p for p in (os.path.join(out_dir, n) for n in (CKPT, PREV_CKPT)) if os.path.exists(p)), None)


def read_checkpoint(path, resuming=True):
    """torch.load a checkpoint (memory-mapped, weights only) -> dict; a file that cannot be read is a one-line
    ValueError that names it, says whether it is damaged (a torch.save file that cannot be read, or empty) or not
    a checkpoint (another kind of file, or a torch.save file without a checkpoint's keys), and says how to resume
    from the previous checkpoint (resuming=False: that the previous checkpoint can be used instead, for sample.py,
    eval.py and export_hf.py)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, empty, not a checkpoint: torch raises several kinds
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":  # a zip archive, as torch.save writes
            error = str(e).splitlines()[0] if str(e) else ""
            what, why = "is damaged and cannot be read", f"cut short or corrupted; {type(e).__name__}: {error}"
        elif not head:
            what, why = "is damaged and cannot be read", "it is empty"
        else:
            what, why = "is not a train.py checkpoint", "not a file torch.save writes"
    else:
        missing = [key for key in CKPT_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
        if not missing:
            return ckpt
        what, why = "is not a train.py checkpoint", f"it has no {', '.join(map(repr, missing))}"
    prev = os.path.join(os.path.dirname(path), PREV_CKPT)
    if os.path.basename(path) == CKPT and os.path.exists(prev):  # the run's own, which keeps the one before
        advice = (f"move it away and re-run to resume from the previous checkpoint, {prev}" if resuming else
                  f"use the previous checkpoint, {prev}, instead")
    elif not resuming and os.path.basename(path) not in (CKPT, PREV_CKPT):
        advice = "pass a train.py checkpoint: a run's ckpt.pt, or its out_dir"
    elif not resuming:
        advice = "no earlier checkpoint is kept next to it: pass another one"
    else:
        advice = "no earlier checkpoint is kept: start over with --overwrite=True or another --out_dir"
    raise ValueError(f"{path} {what}; {advice}\n  {why}")


def check_resume(ckpt, path, cfg, vocab_size):
    """Refuse a resume that would change what KEPT_ON_RESUME fixes -> {key: (saved, now)} of the other keys
    the command line changes, which the resumed run applies."""
    # a key added since the checkpoint was written: its default, but bf16: a run from before it was pure bf16
    saved = {**DEFAULTS, "bf16": "paper", **ckpt["config"]}
    for key in KEPT_ON_RESUME:
        if key == "bf16" and cfg.dtype != "bfloat16":
            continue  # read only with dtype=bfloat16
        if saved[key] != getattr(cfg, key):
            raise ValueError(f"{path} was saved with {key}={saved[key]!r}, the config says {getattr(cfg, key)!r}; "
                             f"a resumed run keeps {key}: resume with --{key}={saved[key]!r}, or start a new run "
                             "with another --out_dir (or --overwrite=True, which deletes this one)")
    if ckpt["vocab_size"] != vocab_size:
        raise ValueError(f"{path} has a vocabulary of {ckpt['vocab_size']} but {cfg.data_dir} has {vocab_size}; "
                         "resume on the data it was trained on, or start a new run with another --out_dir")
    if ckpt["step"] > cfg.max_steps:
        raise ValueError(f"{path} is at step {ckpt['step']}, beyond max_steps={cfg.max_steps}; "
                         f"resume with --max_steps={ckpt['step']} or more")
    return {k: (saved[k], v) for k, v in vars(cfg).items() if k != "resume" and saved[k] != v}


def load_checkpoint(ckpt, path, model, optimizers):
    """Restore the weights, optimizer states and RNGs of a checkpoint, keeping each param group's
    hyperparameters as the current config set them (load_state_dict would bring back the saved ones). Every rank
    calls it with the full checkpoint; under FSDP each keeps its own shards."""
    full = StateDictOptions(full_state_dict=True, strict=False)  # strict=False: SCALE keeps no state for matrices
    try:
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            current = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
            if has_tensors(state["state"]):
                init_state(opt)
                set_optimizer_state_dict(model, opt, state, options=full)
            else:
                opt.load_state_dict(state)
            for group, hyper in zip(opt.param_groups, current):
                group.update(hyper)
        set_model_state_dict(model, ckpt["model"], options=full)  # after init_state's step
    except (RuntimeError, KeyError, ValueError) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ValueError(f"{path} does not fit this model.py and train.py; resume with the code it was written "
                         f"by\n  {why}") from None
    set_rng_states(ckpt["rng"])


def has_tensors(state):
    """Whether an optimizer's state ({param: {name: value}}) holds a tensor of 1+ dims."""
    return any(torch.is_tensor(v) and v.ndim > 0 for s in state.values() for v in s.values())


def init_state(opt):
    """Give an optimizer without state its state, as torch.distributed.checkpoint would before loading into it: one
    step on zero grads. Done here with step(), which every optimizer takes (torch passes closure=None); the step's
    change to the weights is undone by loading them after."""
    if not opt.state:
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# training

def record_step(line):
    """The step of a log.jsonl line, or None for a line a kill cut short (no newline) or damaged."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else None
    except (ValueError, KeyError, TypeError):
        return None


class Log:
    """Rank 0's console lines, out_dir/log.jsonl records and, if wandb_project is set, wandb; silent elsewhere.
    A resumed run first drops the records written after its checkpoint, so the log reads as one run."""

    def __init__(self, cfg, master, resumed_step):
        self.master, self.path, self.wandb = master, os.path.join(cfg.out_dir, LOG), None
        if not master:
            return
        keep = []
        if resumed_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                keep = [line for line in f if record_step(line) is not None and record_step(line) <= resumed_step]
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


def init_distributed(fsdp=False):
    """-> (rank, local_rank, world_size); a process group when launched by torchrun, or for FSDP (which needs one)
    a process group of this one process."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:
        if fsdp:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return 0, 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    return dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()


def shard_model(model, cfg):
    """FSDP2: fully_shard each block, then the root (the embedding, the final norm and lm_head), in place: each
    param becomes a DTensor of which each rank holds about 1/world_size of the rows, all-gathered for each block's
    forward and backward, its gradients reduce-scattered. dtype=mixed keeps fp32 params (and reduces gradients in
    fp32) and computes in bf16 by FSDP's MixedPrecisionPolicy, instead of autocast; bfloat16 and float32 compute in
    the params' dtypes."""
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.dtype == "mixed"
              else MixedPrecisionPolicy())
    weights = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    for module in [*model.layers, model]:
        # FSDP all-gathers a group's params in one buffer of one dtype: the submodules of params of another dtype
        # (fp32 norm gains among bf16 weights) are sharded as a group of their own (a DTensor is sharded already)
        apart = [m for m in module.modules() if m is not module and any(
            p.dtype != weights and not isinstance(p, DTensor) for p in m.parameters(recurse=False))]
        if apart:
            fully_shard(apart, mp_policy=policy)
        fully_shard(module, mp_policy=policy)


def train_step(model, batches, step, device, autocast, world_size, fsdp_root=None):
    """Forward and backward over grad_accum micro-batches -> the step's mean loss over all ranks, a 0-D tensor
    on device (reading it waits for the step to finish). fsdp_root: the FSDP-sharded model under model, if any."""
    loss_sum = torch.zeros((), device=device)
    for micro in range(batches.grad_accum):
        x, y = (to_device(t, device) for t in batches.get(step, micro))
        # DDP all-reduces and FSDP reduce-scatters gradients during backward: only the last micro-step needs to
        # (FSDP then holds unsharded gradients between micro-steps, as DDP does)
        last = micro == batches.grad_accum - 1
        if fsdp_root is not None:
            fsdp_root.set_requires_gradient_sync(last)  # reaches every block
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with autocast:
                _, loss = model(x, y)
            (loss / batches.grad_accum).backward()
        loss_sum += loss.detach()
    if world_size > 1:
        dist.all_reduce(loss_sum)
    return loss_sum / (batches.grad_accum * batches.world_size)


def to_device(t, device):
    """A CPU batch tensor on device; to a GPU from pinned memory, so the copy does not make the host wait."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


@torch.no_grad()
def evaluate(model, cfg, rank, world_size, device, autocast, log, split="val"):
    """-> mean per-token loss over the first eval_tokens tokens of a split (val unless told), its perplexity, and the
    seconds it took. The windows are split over ranks: the same tokens for any world size, but each batch's mean
    rounds in fp32, so the last digits depend on batch_size and world size. A long eval logs progress every 10 s."""
    t0 = last_report = time.time()
    batches = iter(val_batches(cfg.data_dir, cfg.seq_len, cfg.batch_size, cfg.eval_tokens, rank, world_size, split))
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of token losses, tokens
    while True:
        batch = next(batches, None)
        if isinstance(model, FSDPModule):
            # every forward all-gathers the weights from all ranks, so all run as many: until none has a batch
            # left, a rank that has none runs an uncounted one of zeros (ranks differ by at most one batch)
            left = torch.tensor(batch is not None, dtype=torch.int32, device=device)
            dist.all_reduce(left, op=dist.ReduceOp.MAX)
            if not left:
                break
        elif batch is None:
            break
        x, y = batch if batch is not None else (torch.zeros(1, cfg.seq_len, dtype=torch.long),) * 2
        with autocast:
            _, loss = model(to_device(x, device), to_device(y, device))
        if batch is None:
            continue
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
        if time.time() - last_report > 10:
            done = total[1].item() * world_size  # about: ranks hold the same number of windows, give or take one
            log(f"  evaluating: about {done:,.0f} of {cfg.eval_tokens:,} tokens, {time.time() - t0:.0f} s")
            last_report = time.time()
    if world_size > 1:
        dist.all_reduce(total)
    loss = total[0] / total[1]
    return loss.item(), loss.exp().item(), time.time() - t0


def process_device(local_rank):
    """This process's device: cuda:local_rank with GPUs, else the CPU. On CUDA, fp32 matmuls run in TF32; set by
    this API, which keeps torch's legacy and new TF32 flags consistent (with only the new one set, reading the
    legacy one raises, as the profiler and max-autotune do)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    torch.set_float32_matmul_precision("high")
    return torch.device(f"cuda:{local_rank}")


def autocast_for(dtype, device):
    """The forward's autocast context for a run's dtype: bf16 autocast for "mixed", none otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "mixed" else nullcontext()


def check_losses(losses, first_step, saved, ckpt_path):
    """The losses (0-D tensors) of steps first_step+1, ... -> as floats, after one wait for the device; raises
    FloatingPointError at the first that is not finite (all ranks see the same all-reduced losses)."""
    values = torch.stack(losses).tolist() if losses else []
    for step, loss in enumerate(values, first_step + 1):
        if not math.isfinite(loss):
            raise diverged(f"loss is {loss}", step, saved, ckpt_path)
    return values


def weights_finite(model, world_size, device):
    """Whether every weight is finite on every rank (under FSDP each rank checks its own shards)."""
    finite = torch.tensor(all(torch.isfinite(p).all() for p in local_shards(model.parameters())), device=device)
    if world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def bytes_held(tensors, world_size, device):
    """The most bytes of these tensors that any rank holds: of its local shards under FSDP, of all under DDP."""
    held = torch.tensor(sum(t.numel() * t.element_size() for t in local_shards(tensors)), device=device)
    if world_size > 1:
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
    return held.item()


def rank_memory(model, optimizers, world_size, device):
    """The most bytes of params, of grads and of optimizer state that any rank holds (bytes_held), at the end of a
    step, before zero_grad -> a dict of ints."""
    state = state_tensors(optimizers)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return dict(rank_param_bytes=bytes_held(model.parameters(), world_size, device),
                rank_grad_bytes=bytes_held(grads, world_size, device),
                rank_state_bytes=bytes_held(state, world_size, device))


def diverged(what, step, saved, ckpt_path):
    kept = "no checkpoint was written" if saved is None else f"{ckpt_path} (step {saved}) is the last good checkpoint"
    return FloatingPointError(f"{what} at step {step}: training diverged, stopped; {kept}. Lower lr or set grad_clip")


def git_commit():
    """The checkout's commit (+ '-dirty' with uncommitted changes to tracked files), or None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=here, capture_output=True).returncode
    except OSError:  # no git
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "") if head.returncode == 0 else None


def check_inputs(cfg, rank=0, world_size=1):
    """Check the data and the model shape of a config before anything runs -> (TrainBatches, LLaMAConfig).
    A data_dir named after a bundled sample (data/kjv_byte) is first prepared from it if it has no dataset yet.
    Raises DataError or ValueError with a one-line message."""
    if cfg.warmup_steps > cfg.max_steps:
        raise ValueError(f"warmup_steps={cfg.warmup_steps} is more than max_steps={cfg.max_steps}: the lr would never "
                         f"reach its peak; pass --warmup_steps={cfg.max_steps // 10} (10%, as the paper) or fewer")
    source = bundled_source(cfg.data_dir)
    if source:  # on first use; safe for all ranks (or runs) at once
        prepare_once(cfg.data_dir, source)
    batches = TrainBatches(cfg.data_dir, cfg.seq_len, cfg.batch_size, cfg.total_batch_size, rank, world_size, cfg.seed)
    val_batches(cfg.data_dir, cfg.seq_len, cfg.batch_size, cfg.eval_tokens, rank, world_size)  # checks when called
    return batches, LLaMAConfig.from_config(vars(cfg), batches.vocab_size)


def claim_out_dir(cfg, master):
    """Make out_dir this run's before anything is written to it -> a context manager: on rank 0 the open
    out_dir/.lock, locked until it is closed, so a second run writing there fails at once. Without resume=True,
    an out_dir that holds another run (a checkpoint or a log) is refused, unless overwrite=True, which deletes it."""
    previous = [] if cfg.resume else [n for n in (CKPT, PREV_CKPT, LOG) if os.path.exists(os.path.join(cfg.out_dir, n))]
    if previous and not cfg.overwrite:
        raise ValueError(f"{cfg.out_dir} holds another run ({', '.join(previous)}); continue it with --resume=True, "
                         "delete it and start over with --overwrite=True, or use another --out_dir")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:  # a file of that name, a parent that is a file, no permission
        raise ValueError(f"cannot use out_dir {cfg.out_dir}: {e.strerror}; pass another --out_dir") from None
    if dist.is_initialized():
        dist.barrier()  # every rank has looked before rank 0 writes there (else a late rank sees this run's log)
    if not master:
        return nullcontext()
    lock = open(os.path.join(cfg.out_dir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ValueError(f"another run is writing to {cfg.out_dir} (it holds {cfg.out_dir}/.lock); wait for it "
                         "to end or stop it, or use another --out_dir") from None
    for name in previous:  # overwrite=True
        os.remove(os.path.join(cfg.out_dir, name))
    if previous:
        print(f"overwrite=True: deleted the previous run's {', '.join(previous)} in {cfg.out_dir}", flush=True)
    return lock


def resume_message(path, step, changed, cfg):
    """The line a resumed run prints: where it continues, and what the command line changed."""
    text = f"resuming from {path} at step {step}"
    if not changed:
        return text
    text += "; changed since the checkpoint: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
    schedule = ("lr", "warmup_steps", "max_steps", "min_lr_ratio")
    if any(k in changed for k in schedule):
        old = {k: changed[k][0] if k in changed else getattr(cfg, k) for k in schedule}
        lr_then = old["lr"] * lr_factor(step, old["warmup_steps"], old["max_steps"], old["min_lr_ratio"])
        lr_now = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        text += f" (the lr schedule is recomputed: step {step + 1} runs at lr {lr_now:.3g}, was {lr_then:.3g})"
    return text


def train(cfg):
    rank, local_rank, world_size = init_distributed(cfg.fsdp)
    master = rank == 0
    if master:
        print("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in vars(cfg).items()), flush=True)
    device = process_device(local_rank)
    # dtype=mixed: bf16 autocast over fp32 params, or under FSDP its MixedPrecisionPolicy (see shard_model)
    autocast = autocast_for(cfg.dtype, device) if not cfg.fsdp else nullcontext()
    batches, model_cfg = check_inputs(cfg, rank, world_size)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    with device:
        model = LLaMA(model_cfg)
    set_param_dtypes(model, cfg.dtype, cfg.bf16)
    if cfg.fsdp:
        shard_model(model, cfg)  # before the optimizers, which then hold the sharded params
    optimizers = make_optimizers(model, cfg)

    with claim_out_dir(cfg, master):  # rank 0 holds out_dir/.lock until the run ends: no second run writes there
        ckpt_path = os.path.join(cfg.out_dir, CKPT)
        resume_path = latest_checkpoint(cfg.out_dir) if cfg.resume else None
        start_step, resumed = 0, resume_path is not None
        if resumed:
            ckpt = read_checkpoint(resume_path)
            changed = check_resume(ckpt, resume_path, cfg, batches.vocab_size)
            start_step = ckpt["step"]
            if start_step == cfg.max_steps:
                if master:
                    print(f"{resume_path} is at step {start_step} = max_steps: the run is finished; raise --max_steps "
                          "to train it further", flush=True)
                return
            load_checkpoint(ckpt, resume_path, model, optimizers)
            del ckpt
        log = Log(cfg, master, start_step if resumed else None)
        if resumed:
            log(resume_message(resume_path, start_step, changed, cfg), event="resume", step=start_step,
                changed={k: list(v) for k, v in changed.items()})
        elif cfg.resume:
            log(f"resume=True but there is no {ckpt_path} yet: starting from scratch")
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # of the whole model
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        held = bytes_held(model.parameters(), world_size, device)
        sharded = f"; fsdp: at most {held / 2**20:,.1f} MiB on a rank" if cfg.fsdp else ""
        log(f"{model.num_params():,} parameters ({param_bytes / 2**20:,.1f} MiB{sharded}), vocab {batches.vocab_size}, "
            f"{device}; total_batch_size {cfg.total_batch_size} = grad_accum {batches.grad_accum} x batch_size "
            f"{cfg.batch_size} x world_size {world_size}", event="start", step=start_step, config=vars(cfg), params=model.num_params(),
            param_bytes=param_bytes, rank_param_bytes=held, world_size=world_size, device=device_name,
            torch=torch.__version__, git_commit=git_commit())

        train_model = torch.compile(model) if cfg.compile else model
        if world_size > 1 and not cfg.fsdp:
            train_model = DDP(train_model, device_ids=[local_rank] if device.type == "cuda" else None)
        tokens_per_step = cfg.total_batch_size * cfg.seq_len
        flops_per_token = model.flops_per_token(cfg.seq_len)
        peak = peak_flops(device_name) if device.type == "cuda" else None
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        saved = start_step if resumed else None
        losses, logged_step, train_seconds, t0 = [], start_step, 0.0, time.time()  # the steps since the last log line
        signum, stop = 0, StopSignals()
        for step in range(start_step, cfg.max_steps + 1):
            last_step = step == cfg.max_steps
            # evaluate and checkpoint the weights after `step` optimizer steps (not again at a resumed run's first
            # step: the run that saved it did); their time is not training time
            evaluating = (step % cfg.eval_every == 0 or last_step) and not (resumed and step == start_step)
            saving = step > start_step and (step % cfg.ckpt_every == 0 or last_step or signum)
            if evaluating or saving:
                sync()
                train_seconds += time.time() - t0
                if evaluating:
                    # the eager model: no recompiles for no_grad or the shorter last batch
                    val_loss, val_ppl, seconds = evaluate(model, cfg, rank, world_size, device, autocast, log)
                    log(f"step {step} | val loss {val_loss:.4f} | val ppl {val_ppl:.2f} | eval {seconds:.1f} s",
                        event="eval", step=step, tokens=step * tokens_per_step, val_loss=val_loss, val_ppl=val_ppl,
                        eval_seconds=seconds)
                if saving:
                    # never replace the last good checkpoint with a diverged run; the losses can be finite while
                    # the last update made the weights inf or nan
                    check_losses(losses, logged_step, saved, ckpt_path)
                    if not weights_finite(model, world_size, device):
                        raise diverged("the weights are not finite", step, saved, ckpt_path)
                    save_checkpoint(cfg.out_dir, model, optimizers, step, cfg, batches, master)
                    saved = step
                t0 = time.time()
            if last_step:
                break
            if signum:
                raise Interrupted(signum, step, ckpt_path)

            # one optimizer step, from `step` to step + 1; its loss stays on the device until the next log line
            lr_mult = lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lr_mult
            losses.append(train_step(train_model, batches, step, device, autocast, world_size,
                                     model if cfg.fsdp else None))
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for opt in optimizers:
                opt.step()
            if step == start_step:  # the optimizer state exists now, and the grads still do
                memory = rank_memory(model, optimizers, world_size, device)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)

            # log: wait for the device once per log line; tokens/s over the steps since the last one
            done = step + 1  # optimizer steps taken
            if step == start_step:
                who = "" if world_size == 1 else f" (the most any of the {world_size} ranks holds)"
                log(f"memory{who}: params {memory['rank_param_bytes']:,}, grads {memory['rank_grad_bytes']:,}, "
                    f"optimizer state {memory['rank_state_bytes']:,} bytes (AdamW's: "
                    f"{2 * memory['rank_param_bytes']:,})", event="memory", step=done, **memory)
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                loss = check_losses(losses, logged_step, saved, ckpt_path)[-1]
                train_seconds += time.time() - t0
                tokens_per_s = (done - logged_step) * tokens_per_step / train_seconds
                mfu = flops_per_token * tokens_per_s / (peak * world_size) if peak else None
                peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                lr = optimizers[0].param_groups[0]["lr"]  # what the optimizer ran at (the schedule over initial_lr)
                text = f"step {done} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s"
                text += f" | mfu {mfu:.1%}" if mfu else ""
                text += f" | peak mem {peak_mem / 2**30:.2f} GiB" if peak_mem else ""
                log(text, event="train", step=done, tokens=done * tokens_per_step, loss=loss,
                    lr=lr, tokens_per_s=tokens_per_s, mfu=mfu, peak_mem_bytes=peak_mem,
                    opt_state_bytes=state_bytes(optimizers))
                losses, logged_step, train_seconds, t0 = [], done, 0.0, time.time()
            if world_size == 1 or done % cfg.log_every == 0:  # where the ranks agree with no extra host sync
                signum = stop.agreed(world_size, device)


class StopSignals:
    """SIGINT and SIGTERM (Ctrl-C; a cluster's preemption) ask the loop to stop: it saves a checkpoint at the next
    step where the ranks agree (agreed) and exits 128 + the signal. A second signal, 1 s or more later, exits at once
    (sooner, it is the same one: torchrun forwards the Ctrl-C its ranks also got)."""

    def __init__(self):
        self.signum, self.at = 0, 0.0
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if not self.signum:
            self.signum, self.at = signum, time.time()
        elif time.time() - self.at >= 1:
            print(f"{signal.Signals(signum).name} again: exiting without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def agreed(self, world_size, device):
        """The signal any rank got (0 for none): a collective, so every rank calls it at the same step."""
        if world_size == 1:
            return self.signum
        signum = torch.tensor(self.signum, device=device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        return int(signum)


class Interrupted(Exception):
    def __init__(self, signum, step, path):
        self.signum, self.step, self.path = signum, step, path


def main(argv):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if {"-h", "--help"} & set(argv):  # with the values of the config files and keys given with it
            given = [arg for arg in argv if arg not in ("-h", "--help")]
            print(__doc__ + f"\nkeys, {'values of ' + ' '.join(given) if given else 'defaults'} and allowed values:\n"
                  + help_text(load_config(given)))
            return
        train(load_config(argv))
    except (ValueError, FloatingPointError) as e:  # bad input (DataError is a ValueError) or divergence
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)  # one line, from rank 0
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":
            launcher = "torchrun [its options] train.py" if "RANK" in os.environ else "python train.py"
            argv = [a for a in argv if not a.startswith("--resume=")] + ["--resume=True"]
            print(f"{signal.Signals(e.signum).name}: stopped at step {e.step}, saved {e.path}; resume with: "
                  f"{launcher} {shlex.join(argv)}", flush=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # before the loop, which saves
        print("interrupted before the first step: nothing was saved", file=sys.stderr)
        sys.exit(130)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            # FSDP's modules hold the process group in reference cycles: free them first, while Python still runs (a
            # process group left to interpreter shutdown can abort the process, SIGABRT, after a finished run)
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
